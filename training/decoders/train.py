"""Training of the world decoders: `python -m training.decoders train [--modality M] [--smoke]`.

Stages, each resumable (a checkpoint of safetensors + JSON every `--save-every` seconds and at the
end; no pickle), each seeded (step s of a stage draws everything from a generator seeded by
(seed, stage, s), so a resumed run reproduces an uninterrupted one):

  text_clip   CLIP text encoder (image + video captions): attribute classification from the pooled
              (end-of-text) state and the last (padding) state, then frozen
  text_clap   CLAP text encoder (audio captions): attribute classification from the L2-normalised
              pooled embedding AudioLDM conditions on, then frozen
  vae_image   AutoencoderKL on 64-px images and 32-px video frames (L1 + MSE + 1e-4·KL)
  vae_audio   AutoencoderKL on 64-bin log-mel crops (GriffinLimVocoder.mel)
  unet_image  UNet2DConditionModel, v-prediction, min-SNR(5) weights, 10% empty-prompt dropout
              (classifier-free guidance), EMA
  unet_audio  AudioLDM UNet (class-embedding conditioning), same objective, on 64-frame crops
  unet_video  UNet3DConditionModel on 8-frame 32-px clips, same objective
  unet_video_more  the same UNet trained on from unet_video's EMA weights (a second cosine cycle):
              800 steps leave the shapes blurred (shape 63 % by the analyzer); its own stage, so the
              committed pipeline can be trained on with `--from weights/small` without redoing the rest

Then each modality's pipeline is assembled (EMA weights) and written with `save_pretrained`
(safetensors) into `--out/<modality>` (default weights/small; with --smoke, a folder under --work).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from training.decoders import build as B
from training.decoders import data as D

MODALITIES = ("image", "audio", "video")
STAGES_FOR = {
    "image": ("text_clip", "vae_image", "unet_image"),
    "audio": ("text_clap", "vae_audio", "unet_audio"),
    "video": ("text_clip", "vae_image", "unet_video", "unet_video_more"),
}
SEED = 1234
P_UNCOND = 0.1
MIN_SNR = 5.0
EMA_DECAY = 0.999
PROBES = 4  # fixed batches on which each stage's loss is measured before and after training


@dataclass(frozen=True)
class StageRecipe:
    steps: int
    batch: int
    lr: float
    warmup: int = 50
    weighting: str = "min_snr"  # diffusion loss weights over timesteps: "min_snr" (γ = 5) or "uniform"


@dataclass(frozen=True)
class Recipe:
    arch: B.Arch
    text_clip: StageRecipe
    text_clap: StageRecipe
    vae_image: StageRecipe
    vae_audio: StageRecipe
    unet_image: StageRecipe
    unet_audio: StageRecipe
    unet_video: StageRecipe
    unet_video_more: StageRecipe

    def stage(self, name: str) -> StageRecipe:
        return getattr(self, name)


FULL_RECIPE = Recipe(
    arch=B.FULL,
    text_clip=StageRecipe(400, 64, 2e-3),
    text_clap=StageRecipe(250, 64, 2e-3),
    vae_image=StageRecipe(500, 16, 2e-3),
    vae_audio=StageRecipe(250, 16, 2e-3),
    unet_image=StageRecipe(1800, 32, 1e-3, warmup=100),
    unet_audio=StageRecipe(1200, 32, 1e-3),
    # uniform weights for video: under min-SNR, v-prediction's high-noise steps get weight ≈ SNR ≈ 0,
    # and those are where the frame order (which end a motion starts from) must be decided;
    # trained with min-SNR, the video UNet learned each motion's axis but took its sign from the noise
    unet_video=StageRecipe(800, 8, 1e-3, weighting="uniform"),
    unet_video_more=StageRecipe(2000, 8, 1e-3, weighting="uniform"),
)
SMOKE_RECIPE = Recipe(
    arch=B.SMOKE,
    text_clip=StageRecipe(30, 32, 3e-3, warmup=3),
    text_clap=StageRecipe(30, 32, 3e-3, warmup=3),
    vae_image=StageRecipe(12, 4, 3e-3, warmup=2),
    vae_audio=StageRecipe(12, 4, 3e-3, warmup=2),
    unet_image=StageRecipe(16, 8, 2e-3, warmup=2),
    unet_audio=StageRecipe(16, 8, 2e-3, warmup=2),
    unet_video=StageRecipe(10, 2, 2e-3, warmup=2, weighting="uniform"),
    unet_video_more=StageRecipe(10, 2, 2e-3, warmup=2, weighting="uniform"),
)


def recipe_dict(r: Recipe) -> dict:
    return json.loads(json.dumps(asdict(r)))


# ---- checkpoints ---------------------------------------------------------------------------------


def _atomic_dir_write(target: Path, write: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(tmp)
        old = target.with_name(f".{target.name}-old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """`path/state.safetensors` + `path/state.json`, replaced atomically."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")

    _atomic_dir_write(path, write)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError):
        return None
    return tensors, meta


def _recipe_key(r: StageRecipe) -> dict:
    d = _jsonable(asdict(r))
    if d.get("weighting") == "min_snr":  # the default: left out (checkpoints from before the field)
        del d["weighting"]
    return d


def _jsonable(x):
    return json.loads(json.dumps(x))


def _prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in sd.items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---- the training loop ---------------------------------------------------------------------------


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """Everything random in step `step` of `stage` comes from this (and the global RNG seeded alike)."""
    s = (seed * 1_000_003 + zlib.crc32(stage.encode()) * 7919 + step) % (2**63 - 1)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def lr_at(step: int, r: StageRecipe) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    p = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


class Reporter:
    """A rich progress bar per stage (loss, ETA), or nothing when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None
        if not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description:<11}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.progress.start()

    def task(self, name: str, total: int, done: int):
        if self.progress is None:
            return None
        return self.progress.add_task(name, total=total, completed=done, loss=float("nan"))

    def update(self, task, done: int, loss: float) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, completed=done, loss=loss)

    def log(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.console.print(msg)
        elif not self.quiet:
            print(msg)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@dataclass
class StageResult:
    name: str
    steps: int
    seconds: float
    losses: list[float]  # mean loss over each logging window
    resumed_from: int
    probe_before: float | None = None  # the loss on fixed probe batches at step 0 ...
    probe_after: float | None = None  # ... and at the end (no sampling noise: comparable)


def run_stage(
    name: str,
    modules: dict[str, torch.nn.Module],
    loss_fn: Callable[[int, torch.Generator], torch.Tensor],
    recipe: StageRecipe,
    ckpt: Path,
    *,
    seed: int,
    ema: bool,
    reporter: Reporter,
    save_every: float,
    stop_after: int | None = None,
    config: dict | None = None,
) -> tuple[StageResult, dict[str, torch.nn.Module]]:
    """Train `modules` for `recipe.steps` steps of `loss_fn` (resuming from `ckpt`); returns the
    result and the modules to keep (their EMA copies when `ema`)."""
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    ema_modules = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()} if ema else {}
    step, losses, elapsed, window = 0, [], 0.0, []
    probe_before = None
    log_every = max(1, recipe.steps // 50)
    previous = load_checkpoint(ckpt)
    if previous is not None:
        tensors, meta = previous
        if meta.get("recipe") != _recipe_key(recipe) or meta.get("config") != _jsonable(config) or meta.get("seed") != seed:
            reporter.log(f"[{name}] checkpoint at {ckpt} is from another recipe: starting over")
        else:
            for k, m in modules.items():
                m.load_state_dict(_unprefixed(f"model.{k}", tensors))
            for k, m in ema_modules.items():
                m.load_state_dict(_unprefixed(f"ema.{k}", tensors))
            load_optimizer(opt, tensors, meta["param_groups"])
            step, losses, elapsed = int(meta["step"]), list(meta["losses"]), float(meta["seconds"])
            window = list(meta.get("window", []))
            probe_before = meta.get("probe_before")
    resumed_from = step

    def probe() -> float:
        """Mean loss over PROBES fixed batches (fixed data, noise and timesteps), eval mode."""
        for m in modules.values():
            m.eval()
        with torch.no_grad():
            value = float(np.mean([float(loss_fn(-1 - i, step_generator(seed, name + "/probe", i))) for i in range(PROBES)]))
        for m in modules.values():
            m.train()
        return value

    if step == 0:
        probe_before = probe()
    for m in modules.values():
        m.train()

    def checkpoint() -> None:
        tensors: dict[str, torch.Tensor] = {}
        for k, m in modules.items():
            tensors.update(_prefixed(f"model.{k}", m.state_dict()))
        for k, m in ema_modules.items():
            tensors.update(_prefixed(f"ema.{k}", m.state_dict()))
        opt_t, groups = optimizer_tensors(opt)
        tensors.update(opt_t)
        meta = {
            "stage": name,
            "step": step,
            "total": recipe.steps,
            "seed": seed,
            "recipe": _recipe_key(recipe),
            "config": config,
            "losses": losses,
            "window": window,
            "probe_before": probe_before,
            "log_every": log_every,
            "seconds": elapsed,
            "param_groups": groups,
            "done": step >= recipe.steps,
        }
        save_checkpoint(ckpt, tensors, meta)

    task = reporter.task(name, recipe.steps, step)
    if losses:
        reporter.update(task, step, losses[-1])
    last_save = time.monotonic()
    t0 = time.monotonic() - elapsed
    while step < recipe.steps:
        if stop_after is not None and step - resumed_from >= stop_after:
            break
        gen = step_generator(seed, name, step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        loss = loss_fn(step, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema:
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, m in modules.items():
                    for pe, p in zip(ema_modules[k].parameters(), m.parameters()):
                        pe.lerp_(p.detach(), 1 - decay)
        step += 1
        window.append(float(loss.detach()))
        if len(window) == log_every or step == recipe.steps:
            losses.append(float(np.mean(window)))
            window = []
        elapsed = time.monotonic() - t0
        reporter.update(task, step, losses[-1] if losses else float("nan"))
        if time.monotonic() - last_save > save_every:
            checkpoint()
            last_save = time.monotonic()
    if previous is None or step != resumed_from:
        checkpoint()
    probe_after = probe() if step >= recipe.steps and step != resumed_from else None
    for m in (*modules.values(), *ema_modules.values()):
        m.eval()
    result = StageResult(name, step, elapsed, losses, resumed_from, probe_before, probe_after)
    return result, (ema_modules if ema else modules)


# ---- stages --------------------------------------------------------------------------------------


class Trainer:
    """Builds, trains (or loads finished stages) and assembles the world decoders."""

    def __init__(self, recipe: Recipe, work: Path, *, seed: int = SEED, quiet: bool = False, save_every: float = 60.0):
        self.recipe = recipe
        self.arch = recipe.arch
        self.work = Path(work)
        self.seed = seed
        self.reporter = Reporter(quiet)
        self.save_every = save_every
        self.results: dict[str, StageResult] = {}
        self._done: dict[str, dict[str, torch.nn.Module]] = {}
        self._tok: dict[str, Any] = {}
        self.stop_after: int | None = None  # for tests: interrupt each stage after this many steps
        self.loaded: dict[str, dict] = {}  # stage → its record in the saved pipeline it was loaded from (load_saved)

    # -- helpers
    def ckpt(self, stage: str) -> Path:
        return self.work / "checkpoints" / stage

    def config(self, stage: str) -> dict:
        """What a stage's checkpoint must match besides its recipe: the sizes, and for stages that
        read text, the tokenizer (a checkpoint trained on other token ids is started over)."""
        config = {"arch": B.arch_dict(self.arch), "stage": stage}
        kind = {"text_clip": "clip", "unet_image": "clip", "unet_video": "clip", "unet_video_more": "clip", "text_clap": "roberta", "unet_audio": "roberta"}
        if stage in kind:
            config["tokenizer"] = B.tokenizer_fingerprint(self.tokenizer(kind[stage]))
        return config

    def _run(self, name, modules, loss_fn, *, ema=False):
        result, kept = run_stage(
            name,
            modules,
            loss_fn,
            self.recipe.stage(name),
            self.ckpt(name),
            seed=self.seed,
            ema=ema,
            reporter=self.reporter,
            save_every=self.save_every,
            stop_after=self.stop_after,
            config=self.config(name),
        )
        self.results[name] = result
        if result.steps >= self.recipe.stage(name).steps:
            self._done[name] = kept
        return kept

    def finished(self, name: str) -> bool:
        return name in self._done

    def tokenizer(self, kind: str):
        if kind not in self._tok:
            build = B.clip_tokenizer if kind == "clip" else B.roberta_tokenizer
            self._tok[kind] = build(self.arch.max_length)
        return self._tok[kind]

    def _tokens(self, kind: str, texts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(kind)
        enc = tok(texts, padding="max_length", max_length=self.arch.max_length, truncation=True, return_tensors="pt")
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}

    # -- text encoders
    def text_clip(self):
        if "text_clip" in self._done:
            return self._done["text_clip"]["text"]
        torch.manual_seed(self.seed)
        model = B.clip_text_encoder(self.tokenizer("clip"), self.arch)
        keys = ("shape", "colour", "size", "position", "direction")
        heads = torch.nn.ModuleDict({k: torch.nn.Linear(self.arch.embed_dim, len(D.LABELS[k])) for k in keys})
        r = self.recipe.text_clip

        def loss_fn(step, gen):
            rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
            texts, labels = [], {k: [] for k in keys}
            for i in range(r.batch):
                text, named = D.sample_text("video" if i % 3 == 2 else "image", rng)
                texts.append(text)
                for k in keys:
                    labels[k].append(D.LABELS[k].index(named[k]) if k in named else D.IGNORE)
            out = model(input_ids=self._tokens("clip", texts)["input_ids"])
            states = (out.pooler_output, out.last_hidden_state[:, -1])
            loss = 0.0
            for k in keys:
                y = torch.tensor(labels[k])
                if (y != D.IGNORE).any():
                    for s in states:
                        loss = loss + torch.nn.functional.cross_entropy(heads[k](s), y, ignore_index=D.IGNORE)
            return loss / len(states)

        kept = self._run("text_clip", {"text": model, "heads": heads}, loss_fn)
        kept["text"].requires_grad_(False)
        return kept["text"]

    def text_clap(self):
        if "text_clap" in self._done:
            return self._done["text_clap"]["text"]
        torch.manual_seed(self.seed + 1)
        model = B.clap_text_encoder(self.tokenizer("roberta"), self.arch)
        keys = ("pitch", "timbre")
        heads = torch.nn.ModuleDict({k: torch.nn.Linear(self.arch.embed_dim, len(D.LABELS[k]), bias=False) for k in keys})
        r = self.recipe.text_clap

        def loss_fn(step, gen):
            rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
            pairs = [D.sample_text("audio", rng) for _ in range(r.batch)]
            emb = torch.nn.functional.normalize(model(**self._tokens("roberta", [t for t, _ in pairs])).text_embeds, dim=-1)
            loss = 0.0
            for k in keys:
                y = torch.tensor([D.LABELS[k].index(n[k]) for _, n in pairs])
                w = torch.nn.functional.normalize(heads[k].weight, dim=-1)
                loss = loss + torch.nn.functional.cross_entropy(10.0 * emb @ w.T, y)
            return loss

        kept = self._run("text_clap", {"text": model, "heads": heads}, loss_fn)
        kept["text"].requires_grad_(False)
        return kept["text"]

    @torch.no_grad()
    def embed(self, kind: str, texts: list[str], batch: int = 256) -> torch.Tensor:
        """Frozen text-encoder outputs as the pipelines compute them: CLIP last_hidden_state
        (N, L, D); CLAP normalised text_embeds (N, D)."""
        model = self.text_clip() if kind == "clip" else self.text_clap()
        model.eval()
        out = []
        for i in range(0, len(texts), batch):
            tok = self._tokens(kind, texts[i : i + batch])
            if kind == "clip":
                out.append(model(input_ids=tok["input_ids"]).last_hidden_state)
            else:
                out.append(torch.nn.functional.normalize(model(**tok).text_embeds, dim=-1))
        return torch.cat(out)

    # -- VAEs
    def _vae_loss(self, vae, x: torch.Tensor) -> torch.Tensor:
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / x[0].numel()
        return (rec - x).abs().mean() + ((rec - x) ** 2).mean() + 1e-4 * kl

    def vae_image(self):
        if "vae_image" in self._done:
            return self._done["vae_image"]["vae"]
        torch.manual_seed(self.seed + 2)
        vae = B.vae(self.arch)
        images = torch.from_numpy(D.image_array_batch(D.image_specs(), self.arch.image_side))
        frames = torch.from_numpy(D.video_frames_unique(self.arch.video_side, self.arch.video_frames))
        r = self.recipe.vae_image

        def loss_fn(step, gen):
            a = images[torch.randint(0, len(images), (r.batch,), generator=gen)]
            b = frames[torch.randint(0, len(frames), (r.batch,), generator=gen)]
            return self._vae_loss(vae, a) + self._vae_loss(vae, b)

        return self._run("vae_image", {"vae": vae}, loss_fn)["vae"]

    def vocoder(self):
        if "vocoder" not in self._tok:
            self._tok["vocoder"] = B.vocoder()
        return self._tok["vocoder"]

    def mels(self) -> torch.Tensor:
        """(6, 1, T, n_mels) normalised log-mels of 2-s clips of the 6 sounds."""
        return self.vocoder().mel(torch.from_numpy(D.audio_waves(2.0)))[:, None]

    def vae_audio(self):
        if "vae_audio" in self._done:
            return self._done["vae_audio"]["vae"]
        torch.manual_seed(self.seed + 3)
        vae = B.vae(self.arch, audio=True)
        mels = self.mels()
        r, crop = self.recipe.vae_audio, self.arch.mel_frames

        def loss_fn(step, gen):
            which = torch.randint(0, len(mels), (r.batch,), generator=gen)
            starts = torch.randint(0, mels.shape[2] - crop + 1, (r.batch,), generator=gen)
            x = torch.stack([mels[w, :, s : s + crop] for w, s in zip(which.tolist(), starts.tolist())])
            return self._vae_loss(vae, x)

        return self._run("vae_audio", {"vae": vae}, loss_fn)["vae"]

    @torch.no_grad()
    def latents(self, vae, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
        return torch.cat([vae.encode(x[i : i + batch]).latent_dist.mode() for i in range(0, len(x), batch)])

    @staticmethod
    def set_scaling(vae, z: torch.Tensor) -> float:
        scale = float(1.0 / z.std())
        vae.register_to_config(scaling_factor=scale)
        return scale

    # -- UNets
    def _diffusion_loss(self, unet, x0, gen, forward, weighting: str = "min_snr") -> torch.Tensor:
        sched = self._train_sched
        b = x0.shape[0]
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t)
        pred = forward(xt, t)
        ac = sched.alphas_cumprod[t]
        snr = ac / (1 - ac)
        if weighting == "uniform":
            w = torch.ones_like(snr)
        else:  # min-SNR-γ for v-prediction: min(snr, γ) / (snr + 1)
            w = torch.clamp(snr, max=MIN_SNR) / (snr + 1)
        per = ((pred - target) ** 2).reshape(b, -1).mean(dim=1)
        return (w * per).mean()

    @property
    def _train_sched(self):
        if "sched" not in self._tok:
            self._tok["sched"] = B.train_scheduler()
        return self._tok["sched"]

    @staticmethod
    def _drop(cond: torch.Tensor, uncond: torch.Tensor, gen) -> torch.Tensor:
        keep = torch.rand(cond.shape[0], generator=gen) >= P_UNCOND
        shape = (-1,) + (1,) * (cond.ndim - 1)
        return torch.where(keep.reshape(shape), cond, uncond.expand_as(cond))

    def unet_image(self):
        if "unet_image" in self._done:
            return self._done["unet_image"]["unet"]
        vae = self.vae_image()
        specs = D.image_specs()
        z = self.latents(vae, torch.from_numpy(D.image_array_batch(specs, self.arch.image_side)))
        scale = self.set_scaling(vae, z)
        z = z * scale
        bank = D.caption_bank("image", specs)
        cond = self.embed("clip", bank.texts)
        uncond = self.embed("clip", [""])
        torch.manual_seed(self.seed + 4)
        unet = B.image_unet(self.arch)
        r = self.recipe.unet_image
        owner = torch.from_numpy(bank.owner)

        def loss_fn(step, gen):
            k = torch.randint(0, len(bank.texts), (r.batch,), generator=gen)
            c = self._drop(cond[k], uncond, gen)
            return self._diffusion_loss(unet, z[owner[k]], gen, lambda xt, t: unet(xt, t, encoder_hidden_states=c).sample)

        return self._run("unet_image", {"unet": unet}, loss_fn, ema=True)["unet"]

    def _video_data(self):
        """(latents (N, C, F, h, w), caption conditions, the empty caption's, caption → clip index)."""
        vae = self.vae_image()
        a = self.arch
        specs = D.video_specs(a.video_frames)
        frames = torch.from_numpy(D.video_array_batch(specs, a.video_side))  # (N, F, 3, s, s)
        n, f = frames.shape[:2]
        z = self.latents(vae, frames.reshape(n * f, *frames.shape[2:]))
        z = z.reshape(n, f, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()  # (N, C, F, h, w)
        # the video pipeline shares the image VAE (and its scaling); the scale of its own latents
        # differs little, and one scaling keeps the two pipelines' VAEs identical
        scale = self.set_scaling(vae, self.latents(vae, torch.from_numpy(D.image_array_batch(D.image_specs(), a.image_side))))
        bank = D.caption_bank("video", specs)
        return z * scale, self.embed("clip", bank.texts), self.embed("clip", [""]), torch.from_numpy(bank.owner)

    def _train_video(self, name: str, unet):
        z, cond, uncond, owner = self._video_data()
        r = self.recipe.stage(name)

        def loss_fn(step, gen):
            k = torch.randint(0, len(cond), (r.batch,), generator=gen)
            c = self._drop(cond[k], uncond, gen)
            return self._diffusion_loss(
                unet, z[owner[k]], gen, lambda xt, t: unet(xt, t, encoder_hidden_states=c).sample, r.weighting
            )

        return self._run(name, {"unet": unet}, loss_fn, ema=True)["unet"]

    def unet_video(self):
        if "unet_video" in self._done:
            return self._done["unet_video"]["unet"]
        torch.manual_seed(self.seed + 5)
        return self._train_video("unet_video", B.video_unet(self.arch))

    def unet_video_more(self):
        if "unet_video_more" in self._done:
            return self._done["unet_video_more"]["unet"]
        first = self.unet_video()
        if not self.finished("unet_video"):  # interrupted (stop_after): nothing to go on from yet
            return first
        return self._train_video("unet_video_more", copy.deepcopy(first).requires_grad_(True))

    def unet_audio(self):
        if "unet_audio" in self._done:
            return self._done["unet_audio"]["unet"]
        vae = self.vae_audio()
        mels = self.mels()
        usable = (mels.shape[2] // 4) * 4
        z = self.latents(vae, mels[:, :, :usable])  # (6, C, T/4, n_mels/4)
        scale = self.set_scaling(vae, z)
        z = z * scale
        bank = D.caption_bank("audio", D.audio_specs(1.0))
        cond = self.embed("roberta", bank.texts)
        uncond = self.embed("roberta", [""])
        torch.manual_seed(self.seed + 6)
        unet = B.audio_unet(self.arch)
        r, crop = self.recipe.unet_audio, self.arch.mel_frames // 4
        owner = torch.from_numpy(bank.owner)

        def loss_fn(step, gen):
            k = torch.randint(0, len(bank.texts), (r.batch,), generator=gen)
            starts = torch.randint(0, z.shape[2] - crop + 1, (r.batch,), generator=gen)
            x0 = torch.stack([z[o, :, s : s + crop] for o, s in zip(owner[k].tolist(), starts.tolist())])
            c = self._drop(cond[k], uncond, gen)
            return self._diffusion_loss(unet, x0, gen, lambda xt, t: unet(xt, t, encoder_hidden_states=None, class_labels=c).sample)

        return self._run("unet_audio", {"unet": unet}, loss_fn, ema=True)["unet"]

    # -- going on from saved pipelines
    def load_saved(self, modality: str, root: Path) -> list[str]:
        """Take the stages that the pipeline saved in `root/<modality>` holds (its nextgpt_world.json) as
        finished: its text encoder, VAE and UNet, so that `train` runs only the stages after them (the
        committed video pipeline + `unet_video_more`). Returns the stages loaded."""
        import diffusers

        import tools.world.vocoder  # noqa: F401 - the audio pipeline's vocoder class
        from tools.base import _quiet_loading

        folder = Path(root) / modality
        try:
            stamp = json.loads((folder / "nextgpt_world.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder} holds no saved world pipeline (nextgpt_world.json: {e})") from None
        if B.arch_from_dict(stamp.get("arch", {})) != self.arch:
            raise ValueError(f"{folder} was trained at other sizes than this recipe's ({stamp.get('arch')})")
        with _quiet_loading():
            pipe = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        holds = {"text_clip": {"text": pipe.text_encoder}, "text_clap": {"text": pipe.text_encoder},
                 "vae_image": {"vae": pipe.vae}, "vae_audio": {"vae": pipe.vae}}  # fmt: skip
        loaded = [s for s in STAGES_FOR[modality] if s in stamp.get("stages", {})]
        for s in loaded:
            self._done[s] = holds.get(s, {"unet": pipe.unet})  # the last UNet stage saved is the pipeline's
            self.loaded[s] = stamp["stages"][s]
        return loaded

    # -- assembly
    def parts(self, modality: str) -> B.Parts:
        if modality == "image":
            return B.Parts(self.tokenizer("clip"), self.text_clip(), self.vae_image(), self.unet_image())
        if modality == "video":
            return B.Parts(self.tokenizer("clip"), self.text_clip(), self.vae_image(), self.unet_video_more())
        if modality == "audio":
            return B.Parts(self.tokenizer("roberta"), self.text_clap(), self.vae_audio(), self.unet_audio(), self.vocoder())
        raise ValueError(modality)

    def train(self, modality: str) -> B.Parts | None:
        """Run (or resume) the modality's stages; the parts when every stage finished, else None."""
        for stage in STAGES_FOR[modality]:
            getattr(self, stage)()
            if not self.finished(stage):
                return None
        return self.parts(modality)

    def save(self, modality: str, parts: B.Parts, out: Path) -> Path:
        import warnings

        from tools.base import _quiet_loading

        target = Path(out) / modality
        with _quiet_loading():
            pipe = B.pipeline(modality, copy.deepcopy(parts))
        stamp = {
            "builder": "training.decoders",
            "modality": modality,
            "seed": self.seed,
            "arch": B.arch_dict(self.arch),
            "recipe": {s: asdict(self.recipe.stage(s)) for s in STAGES_FOR[modality]},
            "stages": {s: self.loaded[s] if s in self.loaded else
                       {"steps": self.results[s].steps, "seconds": round(self.results[s].seconds, 1),
                        "final_loss": self.results[s].losses[-1] if self.results[s].losses else None}
                       for s in STAGES_FOR[modality] if s in self.results or s in self.loaded},
        }

        def write(tmp: Path) -> None:
            with _quiet_loading(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe.save_pretrained(tmp, safe_serialization=True)
            for config in tmp.glob("*/config.json"):  # parts loaded with --from name the folder they came from: not kept
                c = json.loads(config.read_text())
                if c.pop("_name_or_path", None) is not None:
                    config.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
            (tmp / "nextgpt_world.json").write_text(json.dumps(stamp, indent=1) + "\n")

        _atomic_dir_write(target, write)
        return target


# ---- CLI -----------------------------------------------------------------------------------------


def default_work() -> Path:
    base = os.environ.get("NEXTGPT_CACHE") or "~/.cache/nextgpt"
    return Path(base).expanduser() / "world-decoders"


def train(
    modalities=MODALITIES,
    *,
    smoke: bool = False,
    work: Path | None = None,
    out: Path | None = None,
    seed: int = SEED,
    quiet: bool = False,
    threads: int | None = 1,
    stop_after: int | None = None,
    save_every: float = 60.0,
    start_from: Path | None = None,
) -> dict[str, Any]:
    """Train (resume) and save the decoders; returns {"trainer", "saved": {modality: path}}. `start_from`:
    a folder of saved pipelines (weights/small) whose finished stages are loaded instead of trained."""
    if threads:
        torch.set_num_threads(int(threads))
    recipe = SMOKE_RECIPE if smoke else FULL_RECIPE
    work = Path(work) if work is not None else default_work() / ("smoke" if smoke else "full")
    if out is None:
        out = work / "weights" if smoke else Path("weights/small")
    trainer = Trainer(recipe, work, seed=seed, quiet=quiet, save_every=save_every)
    trainer.stop_after = stop_after
    saved: dict[str, Path] = {}
    t0 = time.monotonic()
    try:
        for m in modalities:
            if start_from is not None:
                trainer.reporter.log(f"{m}: stages loaded from {Path(start_from) / m}: {', '.join(trainer.load_saved(m, start_from))}")
            parts = trainer.train(m)
            if parts is not None:
                saved[m] = trainer.save(m, parts, Path(out))
                trainer.reporter.log(f"{m}: saved → {saved[m]}")
    finally:
        trainer.reporter.close()
    if not quiet:
        for name, r in trainer.results.items():
            last = f"{r.losses[-1]:.4f}" if r.losses else "-"
            print(f"{name:<11} {r.steps:>5} steps  {r.seconds:7.1f} s  final loss {last}")
        print(f"total {time.monotonic() - t0:.1f} s (this run)")
    return {"trainer": trainer, "saved": saved}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.decoders", description="Train and evaluate the shapes-world decoders.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) the decoders and save their pipelines")
    t.add_argument("--modality", choices=(*MODALITIES, "all"), default="all")
    t.add_argument("--smoke", action="store_true", help="seconds-long run at toy size (CI)")
    t.add_argument("--work", type=Path, default=None, help="checkpoint folder (default: $NEXTGPT_CACHE/world-decoders)")
    t.add_argument("--out", type=Path, default=None, help="pipelines folder (default: weights/small; --smoke: WORK/weights)")
    t.add_argument("--seed", type=int, default=SEED)
    t.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--from", dest="start_from", type=Path, default=None, metavar="DIR",
                   help="go on from the pipelines saved in DIR (e.g. weights/small): the stages they hold are loaded, "
                        "only the later ones trained (the committed video pipeline → unet_video_more)")
    e = sub.add_parser("eval", help="generate from canonical captions through the decoder tools and score")
    from training.decoders.evaluate import add_arguments

    add_arguments(e)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        mods = MODALITIES if args.modality == "all" else (args.modality,)
        train(mods, smoke=args.smoke, work=args.work, out=args.out, seed=args.seed, quiet=args.quiet, threads=args.threads or None,
              start_from=args.start_from)
        return 0
    from training.decoders.evaluate import run_from_args

    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
