"""Evaluation of the world decoders through the real decoder tools: `python -m training.decoders eval`.

For each modality, N specs are drawn with a fresh seed; each one's canonical caption goes through
the pipeline's own text encoder (`tool.text_embeds`) and the tool renders a file
(`tool(embeds, seed=...)`: PNG, WAV, MP4 as users get them); the shapes-world analyzer reads the
attributes back. Targets: image colour and shape ≥ 95%, audio pitch ≥ 95%, video direction ≥ 90%.
One generation per modality is also timed (a benchmark, not a test): targets image ≤ 1 s,
1 s of audio ≤ 2 s, video ≤ 3 s on CPU at the settings of `SETTINGS`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODALITIES = ("image", "audio", "video")

# The decoder settings the small profile should use (DecoderConfig fields).
SETTINGS: dict[str, dict[str, Any]] = {
    "image": {"steps": 16, "guidance": 4.0, "height": 64, "width": 64},
    "audio": {"steps": 10, "guidance": 2.5, "seconds": 1.0},
    "video": {"steps": 15, "guidance": 1.0, "height": 32, "width": 32, "frames": 8, "fps": 8},
}
DEFAULT_N = {"image": 36, "audio": 18, "video": 24}
# (metric, threshold) per modality; and seconds for one generation
TARGETS = {"image": ("colour+shape", 0.95), "audio": ("pitch", 0.95), "video": ("direction", 0.90)}
TIME_TARGETS = {"image": 1.0, "audio": 2.0, "video": 3.0}
METRICS = {
    "image": ("colour", "shape", "colour+shape", "size", "position", "all"),
    "audio": ("pitch", "timbre", "all"),
    "video": ("direction", "colour", "shape", "all"),
}
EVAL_SEED = 20261122


def make_tool(modality: str, weights: str | Path, cache_dir: Path, output_dir: Path, **overrides):
    import tools.world.vocoder  # noqa: F401  (diffusers loads the audio pipeline's vocoder only if imported)
    from nextgpt.config import DecoderConfig
    from tools import TOOLS

    cfg = DecoderConfig(source=str(Path(weights) / modality), device="cpu", dtype="float32", **{**SETTINGS[modality], **overrides})
    return TOOLS[modality](cfg, cache_dir, output_dir)


def sample_specs(modality: str, n: int, seed: int) -> list:
    """n specs: the attribute combinations in a seeded random order (cycled when n exceeds them)."""
    from training.decoders import data as D

    rng = np.random.default_rng([seed, MODALITIES.index(modality)])
    if modality == "image":
        pool = D.image_specs()
    elif modality == "audio":
        pool = D.audio_specs(1.0)
    else:
        pool = D.video_specs(8)
    out: list = []
    while len(out) < n:
        out += [pool[i] for i in rng.permutation(len(pool))]
    return out[:n]


def _score(modality: str, truth: dict, found: dict) -> dict[str, bool]:
    from training.world import score

    keys = {"image": ("colour", "shape", "size", "position"), "audio": ("pitch", "timbre"), "video": ("direction", "colour", "shape")}[modality]
    row = {k: score(modality, found, truth, keys=(k,)) for k in keys}
    if modality == "image":
        row["colour+shape"] = row["colour"] and row["shape"]
    row["all"] = all(row[k] for k in keys)
    return row


def evaluate_modality(
    modality: str,
    weights: str | Path,
    n: int,
    seed: int = EVAL_SEED,
    *,
    output_dir: Path | None = None,
    time_it: bool = True,
    **overrides,
) -> dict[str, Any]:
    """Accuracy per attribute (fractions) over n canonical captions, plus timings (seconds)."""
    from training.world import analyze_audio, analyze_image, analyze_video, canonical_caption

    analyzer = {"image": analyze_image, "audio": analyze_audio, "video": analyze_video}[modality]
    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"world-eval-{modality}-")
        output_dir = Path(tmp.name)
    try:
        tool = make_tool(modality, weights, Path(output_dir) / "cache", Path(output_dir), **overrides)
        t0 = time.perf_counter()
        tool.load()
        load_s = time.perf_counter() - t0
        rows, samples, gen_times = [], [], []
        for i, spec in enumerate(sample_specs(modality, n, seed)):
            caption = canonical_caption(spec)
            t0 = time.perf_counter()
            media = tool(tool.text_embeds(caption), seed=seed * 1000 + i)[0]
            gen_times.append(time.perf_counter() - t0)
            found = analyzer(str(media.path))
            truth = spec.attributes()
            row = _score(modality, truth, found)
            rows.append(row)
            samples.append({"caption": caption, "path": str(media.path), **{k: found.get(k) for k in truth if k in found}, "ok": row})
        acc = {k: float(np.mean([r[k] for r in rows])) for k in METRICS[modality]}
        one = None
        if time_it:  # one more generation, timed alone (pipeline loaded, caption encoded before)
            embeds = tool.text_embeds(canonical_caption(sample_specs(modality, 1, seed + 1)[0]))
            t0 = time.perf_counter()
            tool(embeds, seed=seed + 7)
            one = time.perf_counter() - t0
        return {
            "modality": modality,
            "n": n,
            "seed": seed,
            "settings": {**SETTINGS[modality], **overrides},
            "accuracy": acc,
            "seconds_one": one,
            "seconds_mean": float(np.mean(gen_times)) if gen_times else None,
            "seconds_load": load_s,
            "samples": samples,
        }
    finally:
        if tmp is not None:
            tmp.cleanup()


def evaluate(weights="weights/small", modalities=MODALITIES, n: dict | int | None = None, seed: int = EVAL_SEED, **kw) -> dict:
    out = {}
    for m in modalities:
        k = n if isinstance(n, int) else (n or {}).get(m, DEFAULT_N[m])
        out[m] = evaluate_modality(m, weights, k, seed, **kw)
    return out


def print_report(results: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="world decoders: analyzer accuracy on canonical captions")
    for col in ("modality", "n", "metric", "accuracy", "target"):
        table.add_column(col)
    for m, r in results.items():
        target_metric, threshold = TARGETS[m]
        for metric, value in r["accuracy"].items():
            target = f"≥ {threshold:.0%}" if metric == target_metric else ""
            mark = ("✓" if value >= threshold else "✗") if target else ""
            table.add_row(m, str(r["n"]), metric, f"{value:.1%} {mark}", target)
    console.print(table)
    timing = Table(title="one generation (CPU, after loading)")
    for col in ("modality", "settings", "seconds", "mean over eval", "target"):
        timing.add_column(col)
    for m, r in results.items():
        s = r["seconds_one"]
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        mark = "" if s is None else ("✓" if s <= TIME_TARGETS[m] else "✗")
        timing.add_row(m, settings, "-" if s is None else f"{s:.2f} {mark}", f"{r['seconds_mean']:.2f}", f"≤ {TIME_TARGETS[m]:.0f} s")
    console.print(timing)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="weights/small", help="folder holding image/ audio/ video/ pipelines")
    p.add_argument("--modality", choices=(*MODALITIES, "all"), default="all")
    p.add_argument("--n", type=int, default=None, help="samples per modality (default: image 36, audio 18, video 24)")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--steps", type=int, default=None, help="override the denoising steps")
    p.add_argument("--guidance", type=float, default=None, help="override the guidance scale")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--keep", type=Path, default=None, help="write the media here (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")


def run_from_args(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    mods = MODALITIES if args.modality == "all" else (args.modality,)
    overrides = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance)) if v is not None}
    missing = [m for m in mods if not (Path(args.weights) / m / "model_index.json").is_file()]
    if missing:
        print(f"no trained pipeline for {', '.join(missing)} under {args.weights}: run `python -m training.decoders train` first")
        return 2
    results = {}
    for m in mods:
        results[m] = evaluate_modality(m, args.weights, args.n or DEFAULT_N[m], args.seed, output_dir=args.keep, **overrides)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    ok = all(r["accuracy"][TARGETS[m][0]] >= TARGETS[m][1] for m, r in results.items())
    return 0 if ok else 1
