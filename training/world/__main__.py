"""`python -m training.world generate --out DIR --modality image|audio|video|all --n N --seed S`."""

from __future__ import annotations

import argparse
import sys

from training.world.spec import MODALITIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.world", description="Shapes-world pair data.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write X-caption pairs in the official pair-data format")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--modality", choices=(*MODALITIES, "all"), default="all")
    gen.add_argument("--n", type=int, default=100, help="pairs per modality")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--side", type=int, default=64, help="image/video side in pixels (≥ 32)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 0 or args.seed < 0 or args.side < 32:
        print("--n and --seed must be ≥ 0 and --side ≥ 32", file=sys.stderr)
        return 2
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from training.world.dataset import write_pairs

    modalities = MODALITIES if args.modality == "all" else (args.modality,)
    written = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=args.quiet,
    ) as bar:
        for m in modalities:
            task = bar.add_task(f"{m:5s}", total=args.n)
            written[m] = write_pairs(
                args.out, m, args.n, args.seed, args.side, progress=lambda k, t=task: bar.advance(t, k)
            )
    for m, path in written.items():
        print(f"{m}: {args.n} pairs → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
