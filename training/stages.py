"""`nextgpt train`: the three NExT-GPT training stages from the command line.

    python -m training.stages --stage 1 --data runs/world/image_pairs.json --output runs/stage1
    python -m training.stages --stage 2 --data runs/world/image_pairs.json --init runs/stage1 --output runs/stage2
    python -m training.stages --stage 3 --data runs/world/dialogs.json --init runs/stage2 --output runs/stage3

    # data-parallel on CPU cores (gloo): torchrun underneath; `accelerate launch --cpu` would start
    # one process only (accelerate's multi-CPU launcher needs an MPI hostfile)
    accelerate launch --config_file configs/accelerate_cpu.yaml -m training.stages --stage 1 ...
    accelerate launch --multi_gpu --num_processes 2 -m training.stages --stage 1 ...     # same, no config
    # GPUs, ZeRO-2 fp16 as the official code
    accelerate launch --use_deepspeed --deepspeed_config_file configs/deepspeed_zero2.json \\
        --num_processes 8 --mixed_precision fp16 -m training.stages --stage 3 --data dialogs.json ...

    python -m training.stages export --official runs/stage3 out/nextgpt_official    # pytorch_model.pt

This is the front end: it reads the config and the data, computes the output projectors' targets
with the decoder tools (each decoder's own text encoder, once per caption, cached under
`<cache_dir>/train-targets/`), encodes every input file once with the frozen encoder (cached under
`<cache_dir>/train-features/`, `training/trainer/features.py`), and runs `training.trainer.Trainer`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

PROG = "nextgpt train"


class UserError(Exception):
    pass


def _groups(text: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in text.split(",") if g.strip())


def _scales(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected MODALITY=VALUE, got {part!r}")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: not a number") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train NExT-GPT: stage 1 (encoding-side alignment on X-caption pairs), stage 2 (decoding-side "
        "alignment on captions), stage 3 (instruction tuning on dialogs, LoRA).",
        epilog="`nextgpt train export --official SRC DST` writes a checkpoint in the official pytorch_model.pt layout; "
        "`nextgpt train world` trains the shapes-world encoder and decoders (`nextgpt train world --help`).",
    )
    p.add_argument("--stage", type=int, choices=(1, 2, 3), required=True)
    p.add_argument("--profile", "-p", help="profile from config.yaml (default: its default_profile)")
    p.add_argument("--config", help="config.yaml to use")
    p.add_argument("--data", action="append", required=True, metavar="JSON",
                   help="pair file (stages 1-2) or dialog file (stage 3); repeatable")  # fmt: skip
    p.add_argument("--media-root", help="folder the *_name fields are relative to (default: beside the JSON)")
    p.add_argument("--output", "-o", help="output folder (default: runs/stage<N>-<profile>)")
    p.add_argument("--init", help="checkpoint to start from (default: the profile's `checkpoint`; 'none' for none)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="STEP_DIR",
                   help="continue the run in --output (its latest checkpoint, or the given checkpoints/step-N)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes over the data)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-minutes", type=float, metavar="M",
                   help="time budget: after 10 timed steps the step count is cut to what fits in M minutes (the LR decay follows)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=4, help="per process (default 4)")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--weight-decay", type=float, default=1e-3)
    g.add_argument("--warmup", type=int, default=10, help="warmup steps (then linear decay to 0)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 = off")
    g.add_argument("--max-length", type=int, default=512)
    g.add_argument("--group-by-length", type=int, default=0, metavar="N",
                   help="batches of similar length, sorted within windows of N batches (less padding; default 0 = off)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, help="also checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="default: accelerate's config")
    g.add_argument("--cpu", action="store_true", default=None, help="train on the CPU even if a GPU is present")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    g.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="torch.profiler over N steps after the first: where a step's time goes, in OUTPUT/profile.txt")
    t = p.add_argument_group("what is trained")
    t.add_argument("--train", type=_groups, metavar="GROUPS",
                   help="comma-separated: input_proj, output_projectors, new_rows, embed_rows (the input side of new_rows only), lora (default: the stage's)")  # fmt: skip
    t.add_argument("--lora-r", type=int, default=32)
    t.add_argument("--lora-alpha", type=float, default=32.0)
    t.add_argument("--lora-dropout", type=float, default=0.1)
    t.add_argument("--lora-targets", type=_groups, default=("q_proj", "k_proj", "v_proj", "o_proj"), metavar="MODULES")
    t.add_argument("--loss-scale", type=_scales, metavar="M=X,...", help="projector loss weights (default 1; stage 3 video 2)")
    t.add_argument("--targets", help="folder for the precomputed decoder text embeddings (default: <cache_dir>/train-targets)")
    t.add_argument("--features", help="folder for the input files' encoder vectors, computed before training (default: <cache_dir>/train-features)")
    p.add_argument("--dump-rank-state", action="store_true", help=argparse.SUPPRESS)  # tests: per-process tensors
    return p


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} export", description="Write a checkpoint in the official NExT-GPT v0 pytorch_model.pt layout.")
    p.add_argument("--official", nargs=2, metavar=("SRC", "DST"), required=True, help="our checkpoint folder → folder for pytorch_model.pt")
    p.add_argument("--profile", "-p", help="profile whose LLM the checkpoint belongs to")
    p.add_argument("--config", help="config.yaml to use")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32", "keep"), default="float16", help="official: float16")
    p.add_argument("--lora-rank", type=int, help="rank of the zero LoRA tensors written when SRC has no adapter (default 32)")
    p.add_argument("--overwrite", action="store_true")
    return p


# --------------------------------------------------------------------------------------------------


def _settings(args):
    from nextgpt.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
        name = settings.profile_name(args.profile)
    except ConfigError as e:
        raise UserError(str(e)) from None
    return settings, name, settings.profile(name)


def _target_dirs(settings, profile, folder: str | None) -> dict[str, Path]:
    """One folder per modality and decoder (source, revision, dtype): another decoder, another cache."""
    root = Path(folder).expanduser() if folder else settings.cache_path / "train-targets"
    out = {}
    for m, dec in profile.decoders.items():
        ident = json.dumps({"source": dec.source, "revision": dec.revision, "dtype": dec.dtype}, sort_keys=True)
        out[m] = root / f"{m}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    return out


def compute_targets(settings, profile, needed: list[tuple[str, str]], folder: str | None, accelerator, log):
    """The decoder text embeddings of every (modality, caption), computed once (main process) and cached."""
    from training.trainer import TargetCache

    dirs = _target_dirs(settings, profile, folder)
    with accelerator.main_process_first():
        cache = TargetCache(dirs)
        missing = cache.missing(needed)
        n = sum(len(v) for v in missing.values())
        if n and accelerator.is_main_process:
            from tools import build_tools

            log(f"computing {n} decoder text embedding(s) for the projector targets ({', '.join(sorted(missing))})")
            with tempfile.TemporaryDirectory() as out:
                tools = build_tools({m: profile.decoders[m] for m in missing}, settings.cache_path, out)
                with _bar(n, "targets") as advance:
                    cache.fill(needed, lambda m, cap: tools[m].text_embeds(cap), progress=advance)
                del tools
            cache.save()
        elif n:
            raise UserError(f"targets missing after the main process computed them ({n}); are {sorted(map(str, dirs.values()))} on a shared filesystem?")
    return cache


def compute_features(settings, model, items: list[tuple[str, Path]], folder: str | None, accelerator, log):
    """Every input file's encoder vector, computed once before training (main process) and cached in the
    folder of this encoder (`<folder>/<encoder key>/`): the collator then reads vectors instead of
    decoding and encoding the batch's media at every step."""
    from training.trainer.features import MediaFeatures, encoder_key

    root = Path(folder).expanduser() if folder else settings.cache_path / "train-features"
    with accelerator.main_process_first():
        feats = MediaFeatures(root / encoder_key(model.encoder), model.encoder.encode)
        todo = feats.missing(items)
        if todo and accelerator.is_main_process:
            log(f"encoding {len(todo)} input file(s) once, before training ({feats.folder})")
            from nextgpt.media import AttachmentError

            try:
                with _bar(len(todo), "inputs") as advance:
                    feats.fill(todo, progress=advance)
            except AttachmentError as e:  # "{path}: {problem}"; the vectors encoded before it are kept
                feats.save()
                raise UserError(f"an input file cannot be encoded: {e}") from None
        elif todo:
            raise UserError(f"input vectors missing after the main process computed them ({len(todo)}); is {feats.folder} on a shared filesystem?")
    return feats


class _bar:
    def __init__(self, total: int, title: str):
        self.total, self.title = total, title

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn(self.title), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        task = self.p.add_task(self.title, total=self.total)
        self.p.start()
        return lambda k=1: self.p.advance(task, k)

    def __exit__(self, *exc):
        self.p.stop()


def transformers_profile(profile):
    """The profile with its LLM on transformers: training needs its modules and gradients, whatever
    backend (`auto`, llama.cpp) the profile runs chats on."""
    return profile.model_copy(update={"llm": profile.llm.model_copy(update={"backend": "transformers"})})


def load_model(settings, profile, init: Path | None, log):
    """The profile's model without its checkpoint, then `init`'s tensors; returns (model, its adapter
    dir or None, whether it replaced the whole embedding matrices)."""
    from nextgpt.checkpoint import Checkpoint, apply_checkpoint, load_checkpoint
    from nextgpt.model import NextGPT

    model = NextGPT.from_profile(transformers_profile(profile).model_copy(update={"checkpoint": None}), settings.cache_path)
    if init is None:
        return model, None, False
    ckpt = load_checkpoint(init)
    apply_checkpoint(Checkpoint(ckpt.tensors, None, ckpt.meta), input_proj=model.input_proj,
                     output_projectors=model.output_projectors, llm=model.llm)  # fmt: skip
    log(f"starting from checkpoint {init}" + (" (with its LoRA adapter)" if ckpt.adapter_dir else ""))
    return model, ckpt.adapter_dir, any(k in ckpt.tensors for k in ("embed_tokens.weight", "lm_head.weight"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _train(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (resume with --resume)", file=sys.stderr)
        return 130


def _train(args) -> int:
    from nextgpt.checkpoint import CheckpointError
    from training.trainer import (
        STAGE_GROUPS, DataError, TemplateError, TrainConfig, Trainer, TrainError, load_stage_data, make_accelerator,
    )

    settings, name, profile = _settings(args)
    try:
        dialogs = load_stage_data(args.stage, args.data, args.media_root)  # validate before loading anything big
    except (DataError, ValueError) as e:
        raise UserError(str(e)) from None
    groups = args.train or STAGE_GROUPS[args.stage]
    find_unused = args.stage != 1 or "output_projectors" in groups  # stage 1: every batch uses every parameter
    accelerator = make_accelerator(args.grad_accum, args.mixed_precision, cpu=args.cpu, find_unused_parameters=find_unused)
    log = (lambda msg: print(msg, flush=True)) if accelerator.is_main_process else (lambda msg: None)
    log(f"{len(dialogs)} stage-{args.stage} examples from {', '.join(args.data)}")

    init = args.init if args.init is not None else profile.checkpoint
    init = None if init in (None, "", "none") else Path(init).expanduser()
    output = Path(args.output or f"runs/stage{args.stage}-{name}")
    try:
        cfg = TrainConfig(
            stage=args.stage, output_dir=output, train=args.train, max_steps=args.steps, max_minutes=args.max_minutes, epochs=args.epochs,
            batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
            warmup_steps=args.warmup, grad_clip=args.grad_clip or None, max_length=args.max_length, group_by_length=args.group_by_length,
            lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            lora_targets=tuple(args.lora_targets), loss_scale=args.loss_scale, save_every=args.save_every,
            log_every=args.log_every, seed=args.seed, progress=not args.no_progress, resume=args.resume,
            overwrite=args.overwrite, gradient_checkpointing=args.gradient_checkpointing,
            dump_rank_state=args.dump_rank_state, profile_steps=args.profile_steps,
        )  # fmt: skip
    except ValueError as e:
        raise UserError(str(e)) from None

    try:
        needed = [(o.modality, o.caption) for d in dialogs for o in d.outputs if o.caption]
        cache = compute_targets(settings, profile, needed, args.targets, accelerator, log) if needed else None
        model, adapter, full = load_model(settings, profile, init, log)
        meta = {"profile": name, "llm_source": profile.llm.source, "init": str(init) if init else None}
        inputs = [item for d in dialogs for item in d.media]
        feats = compute_features(settings, model, inputs, args.features, accelerator, log) if inputs else None
        trainer = Trainer(model, cfg, accelerator, init_adapter=adapter, full_embeddings=full, meta=meta, log=log)
        result = trainer.fit(dialogs, target_fn=cache.get if cache is not None else None, media_fn=feats)
    except (CheckpointError, DataError, TemplateError, TrainError) as e:
        raise UserError(str(e)) from None
    if result.losses:
        k = max(1, min(5, len(result.losses) // 3))
        first, last = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
        log(f"done: {result.step} steps; loss {first:.4f} → {last:.4f} (mean of the first / last {k})")
    log(f"checkpoint: {output} (set `checkpoint: {output}` in a profile to use it)")
    return 0


def export_main(argv: list[str]) -> int:
    args = build_export_parser().parse_args(argv)
    try:
        import torch

        from nextgpt.checkpoint import CheckpointError
        from nextgpt.devices import DTYPES
        from nextgpt.llm import load_llm
        from training.trainer.export import export_official

        settings, name, profile = _settings(args)
        dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
        load_dtype = dtype if dtype is not None else DTYPES[profile.llm.dtype]
        loaded = load_llm(profile.llm, settings.cache_path, torch.device("cpu"), load_dtype)
        src, dst = args.official
        try:
            path = export_official(src, dst, loaded.model, tokenizer=loaded.tokenizer, projectors=profile.projectors,
                                   lora_rank=args.lora_rank, dtype=dtype, overwrite=args.overwrite)  # fmt: skip
        except CheckpointError as e:
            raise UserError(str(e)) from None
    except UserError as e:
        print(f"{PROG} export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
