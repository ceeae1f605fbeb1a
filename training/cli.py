"""`nextgpt train ...`, `nextgpt eval ...` and `nextgpt export --official`: the training wing's commands.

The runtime's CLI (`bots/cli.py`) imports nothing from `training/`: it finds these functions through
the `nextgpt.training` entry-point group (pyproject.toml), so the arrows point from the wing into the
runtime only. Each takes the arguments after its command and returns an exit status. Imports stay
lazy so that `nextgpt train world --help` never loads torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bots.cli import UserError


def train(argv: list[str]) -> int:
    """`nextgpt train ...`: `world ...` trains the shapes-world encoder and decoders; anything else goes to
    the stage driver (`training.stages`)."""
    if argv[:1] == ["world"]:
        return train_world(argv[1:])
    from training.stages import main as train_main

    return train_main(argv)


def evaluate(argv: list[str]) -> int:
    """`nextgpt eval ...`: `world ...` scores the shapes-world weights; anything else goes to `training.evaluate`."""
    if argv[:1] == ["world"]:
        return eval_world(argv[1:])
    from training.evaluate import main as evaluate_main

    return evaluate_main(argv)


def export_official(argv: list[str]) -> int:
    """`nextgpt export --official SRC DST ...`: a trained checkpoint as the official pytorch_model.pt."""
    from training.stages import export_main

    return export_main(argv)


# ---- nextgpt train world / nextgpt eval world ----------------------------------------------------
# Both run, in this process, the wing's own entry points:
# `python -m training.world.encoder_train train|eval` (the encoder, into ROOT/imagebind) and
# `python -m training.decoders train|eval` (the decoders, into ROOT/{image,audio,video}).

WORLD_PARTS = ("encoder", "image", "audio", "video")
WORLD_DECODERS = ("image", "audio", "video")
WORLD_WEIGHTS = Path("weights/small")  # the committed weights (relative to the working folder, as the entry points)
_REPO_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "small"


def _world_parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    for p in parts:
        if p not in WORLD_PARTS:
            raise argparse.ArgumentTypeError(f"unknown part {p!r} (choose from {', '.join(WORLD_PARTS)})")
    if not parts:
        raise argparse.ArgumentTypeError(f"empty part list (choose from {', '.join(WORLD_PARTS)})")
    return parts


def _selected(only) -> tuple[str, ...]:
    chosen = {p for group in (only or [WORLD_PARTS]) for p in group}
    return tuple(p for p in WORLD_PARTS if p in chosen)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _add_world_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", action="append", type=_world_parts, metavar="PART",
                   help=f"only these parts: {', '.join(WORLD_PARTS)} (repeatable or comma-separated; default all)")  # fmt: skip
    p.add_argument("--threads", type=_positive, metavar="N", help="torch threads (default: each entry point's own)")
    p.add_argument("--seed", type=int, metavar="N", help="seed passed to both the encoder and the decoders (default: each one's own)")


def build_world_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nextgpt train world",
        description="Train the shapes-world ImageBind-small encoder (OUT/imagebind) and the image, audio and video "
        "decoders (OUT/image, OUT/audio, OUT/video); resumable: an interrupted run continues where it stopped. "
        "Same as `make train-world`.",
    )
    _add_world_common(p)
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long run at toy size; writes under the cache dir unless --out, never into weights/small")  # fmt: skip
    p.add_argument("--out", type=Path, metavar="DIR", help="weights root (default: weights/small; with --smoke: WORK/weights)")
    p.add_argument("--work", type=Path, metavar="DIR",
                   help="decoder checkpoint folder (default: $NEXTGPT_CACHE/world-decoders/full, or .../smoke with --smoke)")  # fmt: skip
    p.add_argument("--no-resume", action="store_true",
                   help="encoder only: start over even if a checkpoint exists (the decoders resume from --work: "
                   "give a new --work to start them over)")  # fmt: skip
    p.add_argument("--encoder-steps", type=_positive, metavar="N", help="encoder training steps (default: its recipe's)")
    p.add_argument("--no-eval", action="store_true", help="skip the encoder's retrieval evaluation after a full run")
    p.add_argument("--eval-n", type=_positive, metavar="N", help="encoder evaluation pairs per modality (default 100)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def build_world_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nextgpt eval world",
        description="Score the shapes-world weights on fresh samples: the encoder by top-1 caption retrieval, the "
        "decoders by the attribute analyzer (plus one timed generation each). Same as `make eval-world`. "
        "Exit status 1 when a decoder misses its target.",
    )
    _add_world_common(p)
    p.add_argument("--weights", type=Path, metavar="DIR",
                   help="weights root holding imagebind/, image/, audio/, video/ (default: weights/small; "
                   "with --smoke: where `nextgpt train world --smoke` writes)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="evaluate the output of `nextgpt train world --smoke`")
    p.add_argument("--n", type=_positive, help="samples per modality (default: encoder 100; decoders image 36, audio 18, video 24)")
    return p


def _smoke_root(work: Path | None) -> Path:
    from training.decoders.train import default_work

    return (work if work is not None else default_work() / "smoke") / "weights"


def _is_committed(root: Path) -> bool:
    return root.resolve() in (WORLD_WEIGHTS.resolve(), _REPO_WEIGHTS)


def world_train_plan(argv: list[str]) -> tuple[argparse.Namespace, Path, list[tuple[str, list[str]]]]:
    """Parse `nextgpt train world` arguments into [(entry point, argv), ...] without running anything."""
    args = build_world_train_parser().parse_args(argv)
    parts = _selected(args.only)
    root = args.out if args.out is not None else (_smoke_root(args.work) if args.smoke else WORLD_WEIGHTS)
    if args.smoke and _is_committed(root):
        raise UserError(f"refusing to write smoke weights into {root} (the committed weights): pick another --out")
    decoders = [m for m in WORLD_DECODERS if m in parts]
    if args.no_resume and decoders:
        raise UserError("--no-resume applies to the encoder only (add --only encoder); "
                        "the decoders resume from --work: give a new --work to start them over")  # fmt: skip
    common = ["--smoke"] if args.smoke else []
    common += ["--threads", str(args.threads)] if args.threads else []
    common += ["--seed", str(args.seed)] if args.seed is not None else []
    common += ["--quiet"] if args.quiet else []
    plan = []
    if "encoder" in parts:
        enc = ["train", "--out", str(root / "imagebind"), *common]
        enc += ["--steps", str(args.encoder_steps)] if args.encoder_steps else []
        enc += ["--no-resume"] if args.no_resume else []
        enc += ["--no-eval"] if args.no_eval else []
        enc += ["--eval-n", str(args.eval_n)] if args.eval_n else []
        plan.append(("encoder", enc))
    for m in ["all"] if len(decoders) == len(WORLD_DECODERS) else decoders:
        dec = ["train", "--modality", m, "--out", str(root), *common]
        dec += ["--work", str(args.work)] if args.work is not None else []
        plan.append(("decoders", dec))
    return args, root, plan


def train_world(argv: list[str]) -> int:
    args, root, plan = world_train_plan(argv)
    for kind, argv_ in plan:
        if kind == "encoder":
            from training.world.encoder_train import main as encoder_main

            print(f"== encoder (ImageBind-small) → {root / 'imagebind'}", flush=True)
            try:
                rc = encoder_main(argv_)
            except RuntimeError as e:
                if "another recipe" not in str(e):
                    raise
                raise UserError(f"{e} (or run `nextgpt train world --only encoder --no-resume`)") from None
        else:
            from training.decoders.train import main as decoder_main

            which = argv_[argv_.index("--modality") + 1]
            print(f"== decoders ({'image, audio, video' if which == 'all' else which}) → {root}", flush=True)
            rc = decoder_main(argv_)
        if rc:
            return rc
    print(f"world weights: {root}")
    return 0


def world_eval_plan(argv: list[str]) -> tuple[argparse.Namespace, Path, list[tuple[str, list[str]]]]:
    """Parse `nextgpt eval world` arguments into [(entry point, argv), ...]; checks the weights are there."""
    args = build_world_eval_parser().parse_args(argv)
    parts = _selected(args.only)
    root = args.weights if args.weights is not None else (_smoke_root(None) if args.smoke else WORLD_WEIGHTS)
    missing = []
    if "encoder" in parts and not (root / "imagebind" / "model.safetensors").is_file():
        missing.append(f"encoder ({root / 'imagebind' / 'model.safetensors'})")
    decoders = [m for m in WORLD_DECODERS if m in parts]
    missing += [f"{m} ({root / m / 'model_index.json'})" for m in decoders if not (root / m / "model_index.json").is_file()]
    if missing:
        hint = "nextgpt train world --smoke" if args.smoke else "nextgpt train world"
        raise UserError(f"no trained weights for {', '.join(missing)}: run `{hint}` first or pass --weights")
    common = ["--threads", str(args.threads)] if args.threads else []
    common += ["--seed", str(args.seed)] if args.seed is not None else []
    common += ["--n", str(args.n)] if args.n else []
    plan = []
    if "encoder" in parts:
        plan.append(("encoder", ["eval", "--weights", str(root / "imagebind"), *common]))
    for m in ["all"] if len(decoders) == len(WORLD_DECODERS) else decoders:
        plan.append(("decoders", ["eval", "--weights", str(root), "--modality", m, *common]))
    return args, root, plan


def eval_world(argv: list[str]) -> int:
    _, root, plan = world_eval_plan(argv)
    worst = 0
    for kind, argv_ in plan:  # every part is scored even when an earlier one misses its target
        if kind == "encoder":
            from training.world.encoder_train import main as encoder_main

            print(f"== encoder: {root / 'imagebind'}", flush=True)
            rc = encoder_main(argv_)
        else:
            from training.decoders.train import main as decoder_main

            print(f"== decoders: {root}", flush=True)
            rc = decoder_main(argv_)
        worst = max(worst, rc)
    if worst == 1:
        print("nextgpt eval world: below target (the rows marked ✗ above)", file=sys.stderr)
    return worst
