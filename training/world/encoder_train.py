"""Train the `small` profile's ImageBind on the shapes world (contract: shared/reference/shapes-world.md).

No pretrained ImageBind can be had offline, so a small `ImageBindModel` (Meta's class, small
widths and depths, see `SMALL_ARCH`) is trained from scratch, contrastively, so that the
embedding of an image, a video or a sound lands next to the embedding of its caption through
ImageBind's own text branch (its CLIP BPE tokenizer ships inside the package).

Recipe (as ImageBind: symmetric InfoNCE between a modality and text, the text branch's learnable
logit scale as the temperature):

- every step draws, for each modality, `batch_size` fresh samples (image and video; audio has only
  6 distinct sounds, so `audio_batch` of them) and one caption each (canonical or a paraphrase,
  as the world's generator draws them). The batch is a pure function of (seed, step), so a resumed
  run sees exactly the batches it would have seen.
- the inputs go through the SAME preprocessing as inference (`nextgpt.media`: 224 px bicubic
  image transform; video: the first and last frame of a ≤ 2 s clip, which is what every one of
  `MediaEncoder`'s 5 × 3 clips of a shapes-world video holds; audio: the 128 × 204 log-mel
  fbank), rendered at a random side (32–128 px) and loudness, a share of them blurred and noised.
- many captions in a batch are true of several samples ("a red circle" of every red circle; two
  samples with the same attributes): the InfoNCE target of a row is uniform over every column
  whose caption is true of the sample (attributes parsed from the caption), instead of the
  diagonal only, so that no true caption is pushed away as a negative.
- half the images/videos of a batch are a one-attribute variant of another sample (`sibling`):
  hard negatives that differ only in position, size, direction, ...
- the vision and audio position embeddings (learnable, as ImageBind's) start from a 2-D
  sine-cosine code (`init_position_codes`, as MAE's fixed code), so that where a patch is is
  visible from step 0. Position and direction are the last attributes learned (at chance at
  step 300, right by step 600 in our runs).
- AdamW, linear warm-up then cosine decay; weight decay on matrices only.

Checkpoints (model + AdamW state + step + torch RNG state) are safetensors + a JSON (no pickle),
written atomically every `checkpoint_every` steps; `train(..., resume=True)` continues from one.
The result is `out_dir/model.safetensors` + `arch.json` (what `nextgpt.encoder.load_imagebind`
reads: `EncoderConfig(source=".../model.safetensors")`) + `train.json` (recipe and metrics).

    python -m training.world.encoder_train train [--out weights/small/imagebind] [--steps N] [--smoke]
    python -m training.world.encoder_train eval  [--weights weights/small/imagebind] [--n 100]

ImageBind's code is CC BY-NC-SA 4.0 (Meta); the weights trained here inherit that notice.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nextgpt import media
from nextgpt.encoder import write_atomic
from training.world.analyze import parse_caption
from training.world.captions import canonical_caption, caption
from training.world.render import draw_image, draw_video, synth_audio
from training.world.spec import (
    ATTRIBUTE_KEYS,
    COLOURS,
    DIRECTIONS,
    MODALITIES,
    PITCHES,
    POSITIONS,
    SAMPLE_RATE,
    SHAPES,
    SIZES,
    TIMBRES,
    VIDEO_FPS,
    AudioSpec,
    ImageSpec,
    VideoSpec,
    sample_spec,
)

DEFAULT_OUT = Path("weights/small/imagebind")

# The small ImageBind (3.07 M parameters, 12.3 MB in fp32). Every trunk is built by the class, so
# the unused ones (depth, thermal, IMU) are shrunk to nothing much. The input geometry stays
# ImageBind's (224 px, 2-frame video clips, 128 × 204 fbank), so `MediaEncoder.preprocess` feeds
# it unchanged; only the patch sizes differ: 28 px vision patches (8 × 8 = 64 tokens instead of
# 256: ~4× less trunk work, and a shapes-world picture of 64 px has no 14 px detail to lose) and
# 16 × 16 audio patches with stride 16 (96 tokens instead of 228). The text vocabulary
# (49408 × text_embed_dim) is most of the parameters: 48 keeps the fp32 file well under 15 MB.
SMALL_ARCH: dict[str, Any] = dict(
    out_embed_dim=128,
    video_frames=2, kernel_size=[2, 28, 28],
    vision_embed_dim=64, vision_num_blocks=3, vision_num_heads=4,
    audio_embed_dim=64, audio_num_blocks=2, audio_num_heads=4, audio_drop_path=0.0,
    audio_kernel_size=16, audio_stride=16,
    text_embed_dim=48, text_num_blocks=2, text_num_heads=4,
    depth_embed_dim=16, depth_num_blocks=1, depth_num_heads=2,
    thermal_embed_dim=16, thermal_num_blocks=1, thermal_num_heads=2,
    imu_embed_dim=16, imu_num_blocks=1, imu_num_heads=2, imu_drop_path=0.0,
)  # fmt: skip

DEFAULTS: dict[str, Any] = dict(
    steps=1500,
    batch_size=48,  # images and videos per step (each)
    audio_batch=16,  # sounds per step (there are only 6 distinct ones)
    lr=1.5e-3,
    min_lr_ratio=0.05,
    warmup=100,
    weight_decay=0.05,
    betas=(0.9, 0.98),
    grad_clip=1.0,
    sides=(32, 48, 64, 64, 96, 128),  # render sides (px) drawn uniformly: 64 twice as likely
    sibling_rate=0.5,  # share of image/video samples that are a one-attribute variant of another
    augment=0.3,  # share of samples blurred / noised (see make_batch)
    checkpoint_every=100,
)
SMOKE: dict[str, Any] = dict(steps=6, batch_size=4, audio_batch=4, warmup=1, checkpoint_every=3)
EVAL_SEED = 9_000_001  # never a training seed: training batches come from SeedSequence([_TRAIN_TAG, seed, step])
_TRAIN_TAG = 0x1B1D
_TRAINED_BRANCHES = ("vision", "audio", "text")


# --------------------------------------------------------------------------------------------
# Model, tokenizer, text branch


def imagebind_module():
    from nextgpt.encoder import import_imagebind_model

    return import_imagebind_model()


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """(rows·cols, dim) fixed 2-D sine-cosine position code (MAE's): half the channels encode
    the row, half the column, each as sin/cos at geometric frequencies."""

    def one(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / max(d // 2, 1))
        angle = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    half = dim // 2
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    code = torch.cat([one(half, r), one(dim - half, c)], dim=1)
    return code.float()


@torch.no_grad()
def init_position_codes(model: torch.nn.Module) -> None:
    """Start the vision and audio patch position embeddings (learnable) from a 2-D sine-cosine
    code instead of small noise: where a shape is (left/centre/right; the direction between a
    clip's two frames) and which mel band a tone falls in are then visible from step 0 instead
    of having to be learned into the embeddings first."""
    for key in ("vision", "audio"):
        helper = model.modality_preprocessors[key].pos_embedding_helper
        layout = [int(n) for n in helper.patches_layout]
        rows, cols = int(np.prod(layout[:-1])), layout[-1]
        pe = helper.pos_embed  # (1, cls + rows·cols, dim)
        pe[0, helper.num_cls_tokens :] = sincos_2d(pe.shape[-1], rows, cols)


def build_model(arch: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised ImageBindModel(**arch) (SMALL_ARCH by default), deterministic in
    seed, its vision and audio position embeddings started from `init_position_codes`."""
    ib = imagebind_module()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ib.ImageBindModel(**(SMALL_ARCH if arch is None else arch))
    init_position_codes(model)
    return model


@functools.lru_cache(maxsize=1)
def tokenizer():
    """ImageBind's (CLIP's) BPE tokenizer, from the vocabulary file inside the installed package."""
    ib = imagebind_module()
    from imagebind.models.multimodal_preprocessors import SimpleTokenizer

    bpe = Path(ib.__file__).resolve().parent.parent / "bpe" / "bpe_simple_vocab_16e6.txt.gz"
    return SimpleTokenizer(bpe_path=str(bpe))


@functools.lru_cache(maxsize=4096)
def _tokens_one(text: str) -> torch.Tensor:
    return tokenizer()([text, ""])[0].clone()  # a list of ≥ 2 so that the result stays 2-D


def tokenize(texts: Sequence[str]) -> torch.Tensor:
    """(len(texts), 77) int64 token ids (start, BPE, end, zero padding), cached per text."""
    return torch.stack([_tokens_one(t) for t in texts])


def text_embeddings(model: torch.nn.Module, tokens: torch.Tensor, *, fast: bool = True) -> torch.Tensor:
    """(B, 77) tokens → (B, out_dim) text embeddings (not normalised), ImageBind's text branch.

    fast=True runs the causal text transformer on the first L positions only, L = the longest
    caption (start … end token): with causal attention, the end token's output (which the head
    reads) does not depend on the padding after it, so this is the full forward's result with a
    fraction of the work. fast=False is the package's own forward over all 77 positions.
    """
    if not fast:
        pre = model.modality_preprocessors["text"](text=tokens)
        return model.modality_heads["text"](model.modality_trunks["text"](**pre["trunk"]), **pre["head"])
    pre = model.modality_preprocessors["text"]
    length = int(tokens.argmax(dim=-1).max()) + 1
    t = tokens[:, :length]
    x = pre.token_embedding(t) + pre.pos_embed[:, :length]
    x = model.modality_trunks["text"](tokens=x, attn_mask=pre.mask[:length, :length])
    return model.modality_heads["text"](x, seq_len=t.argmax(dim=-1))


def media_embeddings(model: torch.nn.Module, key: str, x: torch.Tensor) -> torch.Tensor:
    """One clip per row — vision (B, 3, [2,] 224, 224) or audio (B, 1, 128, 204) → (B, out_dim)."""
    pre = model.modality_preprocessors[key](**{key: x})
    return model.modality_heads[key](model.modality_trunks[key](**pre["trunk"]), **pre["head"])


def logit_scale(model: torch.nn.Module) -> torch.Tensor:
    """The text branch's learnable logit scale (1 / temperature), clipped as ImageBind does."""
    post = model.modality_postprocessors["text"][1]
    return torch.clip(post.log_logit_scale.exp(), max=post.max_logit_scale)


# --------------------------------------------------------------------------------------------
# Data


def preprocess_sample(spec, side: int = 64, gain: float = 1.0, noise: float = 0.0, noise_seed: int = 0) -> torch.Tensor:
    """A spec → the encoder input of one clip, exactly as `MediaEncoder.preprocess` makes it from
    the written file (minus PNG/WAV/H.264 coding): image (3, 224, 224); video (3, 2, 224, 224);
    audio (1, 128, 204). Audio only: the waveform is scaled by `gain` and gets white noise of
    standard deviation `noise` (seeded) before the fbank."""
    if isinstance(spec, ImageSpec):
        return media.image_tensor(draw_image(spec, side))
    if isinstance(spec, VideoSpec):
        return media.video_clips(draw_video(spec, side), VIDEO_FPS, 1, 2.0, frames_per_clip=2)[0]
    if isinstance(spec, AudioSpec):
        wave = synth_audio(spec) * np.float32(gain)
        if noise > 0:
            wave = wave + np.random.default_rng(noise_seed).normal(0.0, noise, wave.shape).astype(np.float32)
        return media.audio_clips(wave, SAMPLE_RATE, 1)[0]
    raise TypeError(f"not a shapes-world spec: {spec!r}")


def degrade(x: torch.Tensor, sigma: float, noise: float, seed: int) -> torch.Tensor:
    """Blur (Gaussian, `sigma` px at 224 px; separable, reflect padding) and add pixel noise
    (std `noise` in normalised units, ≈ noise × 0.27 × 255 grey levels) to a preprocessed image
    (3, 224, 224) or clip (3, T, 224, 224): robustness to imperfect (e.g. generated) media."""
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-2:])
    if sigma > 0:
        r = max(1, int(math.ceil(3 * sigma)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
        k = k / k.sum()
        y = F.pad(y, (r, r, r, r), mode="reflect")
        y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    if noise > 0:
        g = torch.Generator().manual_seed(int(seed))
        y = y + noise * torch.randn(y.shape, generator=g)
    return y.reshape(shape)


@functools.lru_cache(maxsize=2048)
def _vision_input(spec, side: int) -> torch.Tensor:
    """preprocess_sample of an image/video spec, cached in float16 (≈ 380 MB for the whole world
    at 5 sides). A video's encoder clip holds only its first and last frame, which do not depend
    on the frame count, so video specs are cached by (shape, colour, direction)."""
    return preprocess_sample(spec, side).to(torch.float16)


def vision_input(spec, side: int) -> torch.Tensor:
    if isinstance(spec, VideoSpec):
        spec = VideoSpec(spec.shape, spec.colour, spec.direction)
    return _vision_input(spec, int(side)).to(torch.float32)


_VARIABLE = {"image": ("shape", "colour", "size", "position"), "video": ("shape", "colour", "direction")}
_VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": POSITIONS,
           "direction": DIRECTIONS}  # fmt: skip


def sibling(spec, rng: np.random.Generator):
    """The spec with one attribute (drawn uniformly) changed to another value: a hard negative."""
    key = _VARIABLE[spec.modality][int(rng.integers(len(_VARIABLE[spec.modality])))]
    others = [v for v in _VALUES[key] if v != getattr(spec, key)]
    return type(spec)(**{**spec.attributes(), key: others[int(rng.integers(len(others)))]})


def compatibility(modality: str, specs: Sequence, captions: Sequence[str]) -> torch.Tensor:
    """(len(specs), len(captions)) bool: caption j is true of sample i (every attribute it names
    matches). A partial caption ("a red circle") is true of every red circle."""
    named = [parse_caption(c, modality) for c in captions]
    attrs = [s.attributes() for s in specs]
    return torch.tensor([[all(a.get(k) == v for k, v in n.items()) for n in named] for a in attrs])


def make_batch(
    seed: int,
    step: int,
    batch_size: int,
    audio_batch: int,
    sides: Sequence[int] = (64,),
    sibling_rate: float = 0.5,
    augment: float = 0.0,
) -> dict:
    """The training batch of one step: modality → {"x", "captions", "positives"}; deterministic.

    Images and videos: each sample after the first is, with probability `sibling_rate`, a copy of
    an earlier one with one attribute changed (`sibling`), so that every batch holds hard
    negatives (same picture but for the position, or the direction, ...). With probability
    `augment` a sample is degraded: images/videos blurred (σ ≤ 5 px at 224, 1.4 px at 64) and noised (`degrade`),
    sounds given white noise (std ≤ 0.01 against a peak ≤ 0.8); every sound's loudness is
    drawn in [0.25, 1] × the world's."""
    rng = np.random.default_rng(np.random.SeedSequence([_TRAIN_TAG, int(seed), int(step)]))
    out = {}
    for modality, n in (("image", batch_size), ("video", batch_size), ("audio", audio_batch)):
        specs, texts, xs = [], [], []
        for i in range(n):
            if modality != "audio" and i > 0 and rng.random() < sibling_rate:
                spec = sibling(specs[int(rng.integers(i))], rng)
                if isinstance(spec, VideoSpec):  # a fresh clip length (not seen by the encoder anyway)
                    spec = VideoSpec(spec.shape, spec.colour, spec.direction, int(rng.integers(8, 17)))
            else:
                spec = sample_spec(modality, rng)
            side = int(sides[int(rng.integers(len(sides)))])
            gain = float(rng.uniform(0.25, 1.0))
            degraded = bool(rng.random() < augment)
            sigma, noise = float(rng.uniform(0.0, 5.0)), float(rng.uniform(0.0, 0.1))
            noise_seed = int(rng.integers(2**31))
            specs.append(spec)
            texts.append(caption(spec, rng))
            if modality == "audio":
                xs.append(preprocess_sample(spec, side, gain, noise * 0.1 if degraded else 0.0, noise_seed))
            else:
                x = vision_input(spec, side)
                xs.append(degrade(x, sigma, noise, noise_seed) if degraded else x)
        pos = compatibility(modality, specs, texts)
        if not bool(pos.diagonal().all()):
            raise AssertionError(f"a caption is not true of its own sample: {texts}")
        out[modality] = {"x": torch.stack(xs), "captions": texts, "positives": pos}
    return out


def multi_positive_nce(x: torch.Tensor, t: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised x (B, D) and t (B, D); the target of each row
    (and column) is uniform over its positives (at least the diagonal)."""
    logits = scale * (x @ t.T)
    p = positives.float()
    loss_x = -(F.log_softmax(logits, dim=1) * (p / p.sum(1, keepdim=True))).sum(1).mean()
    loss_t = -(F.log_softmax(logits.T, dim=1) * (p.T / p.T.sum(1, keepdim=True))).sum(1).mean()
    return 0.5 * (loss_x + loss_t)


def batch_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over modalities of the symmetric multi-positive InfoNCE; also the per-modality values."""
    b_img, b_vid = len(batch["image"]["captions"]), len(batch["video"]["captions"])
    images = batch["image"]["x"].unsqueeze(2).repeat(1, 1, 2, 1, 1)  # as ImageBind's PadIm2Video
    vision = F.normalize(media_embeddings(model, "vision", torch.cat([images, batch["video"]["x"]])), dim=-1)
    audio = F.normalize(media_embeddings(model, "audio", batch["audio"]["x"]), dim=-1)
    texts = batch["image"]["captions"] + batch["video"]["captions"] + batch["audio"]["captions"]
    text = F.normalize(text_embeddings(model, tokenize(texts)), dim=-1)
    emb = {"image": vision[:b_img], "video": vision[b_img:], "audio": audio}
    txt = {"image": text[:b_img], "video": text[b_img : b_img + b_vid], "audio": text[b_img + b_vid :]}
    scale = logit_scale(model)
    parts = {m: multi_positive_nce(emb[m], txt[m], batch[m]["positives"], scale) for m in MODALITIES}
    loss = sum(parts.values()) / len(parts)
    return loss, {m: float(v.detach()) for m, v in parts.items()}


# --------------------------------------------------------------------------------------------
# Optimiser, checkpoints


def trained_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the vision, audio and text branches and the text logit scale."""
    out = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        branch = parts[0] in ("modality_preprocessors", "modality_trunks", "modality_heads")
        if branch and parts[1] in _TRAINED_BRANCHES:
            out.append((name, p))
        elif name == "modality_postprocessors.text.1.log_logit_scale":
            out.append((name, p))
    return out


def make_optimizer(model: torch.nn.Module, recipe: dict) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW; weight decay on weight matrices only (not biases, norms, position embeddings,
    CLS tokens or the logit scale). Returns the optimiser and its parameter names, in order."""
    named = trained_parameters(model)
    no_decay = lambda n, p: p.ndim < 2 or "pos_embed" in n or "cls_token" in n or "logit_scale" in n  # noqa: E731
    decay = [(n, p) for n, p in named if not no_decay(n, p)]
    rest = [(n, p) for n, p in named if no_decay(n, p)]
    opt = torch.optim.AdamW(
        [
            {"params": [p for _, p in decay], "weight_decay": recipe["weight_decay"]},
            {"params": [p for _, p in rest], "weight_decay": 0.0},
        ],
        lr=recipe["lr"],
        betas=tuple(recipe["betas"]),
    )
    return opt, [n for n, _ in decay] + [n for n, _ in rest]


def lr_at(step: int, recipe: dict) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to lr × min_lr_ratio at `steps`."""
    lr, warm, total = recipe["lr"], max(int(recipe["warmup"]), 0), int(recipe["steps"])
    if step < warm:
        return lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    lo = lr * recipe["min_lr_ratio"]
    return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * progress))


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8"))


def save_checkpoint(ckpt_dir: Path, model, opt, names: list[str], step: int, info: dict) -> None:
    """ckpt_dir/state.safetensors (model.*, optim.<name>.*, rng.torch) + state.json (step, recipe,
    history, AdamW param groups). The tensors file is written first; the JSON names the step."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    state = opt.state_dict()
    for i, name in enumerate(names):
        for k, v in state["state"].get(i, {}).items():
            tensors[f"optim.{name}.{k}"] = torch.as_tensor(v).detach().contiguous().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    write_atomic(ckpt_dir / "state.safetensors", lambda p: save_file(tensors, str(p), metadata={"step": str(step)}))
    _write_json(ckpt_dir / "state.json", {**info, "step": step, "param_names": names, "param_groups": groups})


def load_checkpoint(ckpt_dir: Path, model, opt, names: list[str]) -> dict | None:
    """Restore model, AdamW state and torch RNG from ckpt_dir; the JSON (with "step"), or None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    jpath, tpath = ckpt_dir / "state.json", ckpt_dir / "state.safetensors"
    if not (jpath.is_file() and tpath.is_file()):
        return None
    info = json.loads(jpath.read_text(encoding="utf-8"))
    with safe_open(str(tpath), "pt") as f:
        if (f.metadata() or {}).get("step") != str(info["step"]):
            raise RuntimeError(f"{ckpt_dir}: state.json and state.safetensors are from different steps")
    if info.get("param_names") != names:
        raise RuntimeError(f"{ckpt_dir}: checkpoint was made for other trained parameters")
    tensors = load_file(str(tpath), device="cpu")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for i, name in enumerate(names):
        keys = [k for k in ("step", "exp_avg", "exp_avg_sq") if f"optim.{name}.{k}" in tensors]
        entry = {k: tensors[f"optim.{name}.{k}"] for k in keys}
        if entry:
            state[i] = entry
    groups = [{**g_json, "params": g["params"]} for g_json, g in zip(info["param_groups"], sd["param_groups"])]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    return info


def save_weights(out_dir: Path, model: torch.nn.Module, arch: dict, info: dict) -> Path:
    """out_dir/model.safetensors (fp32, every tensor of the model, for strict loading) + arch.json
    + train.json. Returns the weights' path."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    weights = out_dir / "model.safetensors"
    write_atomic(weights, lambda p: (save_file(state, str(p), metadata={"format": "pt"}), p.chmod(0o644)))
    _write_json(out_dir / "arch.json", arch)
    _write_json(out_dir / "train.json", info)
    return weights


# --------------------------------------------------------------------------------------------
# Training


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]imagebind[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("T {task.fields[temp]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def train(
    out_dir: str | os.PathLike = DEFAULT_OUT,
    *,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    arch: dict | None = None,
    audio_batch: int | None = None,
    lr: float | None = None,
    warmup: int | None = None,
    checkpoint_every: int | None = None,
    stop_after: int | None = None,
    keep_checkpoint: bool = False,
    log_every: int = 50,
) -> dict[str, Any]:
    """Train the small ImageBind; save out_dir/{model.safetensors, arch.json, train.json}.

    Checkpoints (model + AdamW state + step + torch RNG; safetensors + JSON) go to
    `checkpoint_dir` (default out_dir/"checkpoint") every `checkpoint_every` steps. With
    resume=True a run continues from the checkpoint there (same recipe and arch required, else
    an error), and a run whose out_dir/train.json says it finished this recipe returns at once.
    `stop_after=k` stops once step k is done (checkpointed, no final weights: an interruption on
    purpose, e.g. to train in slices); the finished run deletes its checkpoint unless
    keep_checkpoint. Returns the metrics: {"finished", "steps", "step", "seconds", "losses_first",
    "losses_last", "final_loss", "loss_history", "logit_scale", "weights"}.
    """
    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoint"
    arch = dict(SMALL_ARCH if arch is None else arch)
    recipe = {
        **DEFAULTS,
        "steps": int(steps),
        "batch_size": int(batch_size),
        "audio_batch": int(audio_batch if audio_batch is not None else min(DEFAULTS["audio_batch"], batch_size)),
        "seed": int(seed),
    }
    for k, v in (("lr", lr), ("warmup", warmup), ("checkpoint_every", checkpoint_every)):
        if v is not None:
            recipe[k] = v
    recipe["betas"] = list(recipe["betas"])
    recipe["sides"] = list(recipe["sides"])
    if recipe["steps"] < 1 or recipe["batch_size"] < 2 or recipe["audio_batch"] < 2:
        raise ValueError("steps must be ≥ 1 and batch sizes ≥ 2")
    same = ("steps", "batch_size", "audio_batch", "seed", "lr", "warmup", "min_lr_ratio", "weight_decay",
            "betas", "sides", "grad_clip", "sibling_rate", "augment")  # fmt: skip

    done = out_dir / "train.json"
    if resume and done.is_file() and (out_dir / "model.safetensors").is_file():
        info = json.loads(done.read_text(encoding="utf-8"))
        if info.get("arch") == arch and all(info.get("recipe", {}).get(k) == recipe[k] for k in same):
            return {**info["metrics"], "resumed_finished": True}

    model = build_model(arch, seed)
    model.train()
    opt, names = make_optimizer(model, recipe)
    start, history, elapsed = 0, [], 0.0
    if resume:
        info = load_checkpoint(ckpt_dir, model, opt, names)
        if info is not None:
            if info.get("arch") != arch or any(info["recipe"].get(k) != recipe[k] for k in same):
                raise RuntimeError(
                    f"{ckpt_dir}: the checkpoint is for another recipe or architecture; "
                    "delete it or pass resume=False"
                )
            start, history, elapsed = int(info["step"]), list(info["history"]), float(info["seconds"])

    total = recipe["steps"]
    t0 = time.perf_counter() - elapsed
    losses: list[float] = [h["loss"] for h in history]

    def checkpoint(step: int) -> None:
        info = {"arch": arch, "recipe": recipe, "history": history, "seconds": time.perf_counter() - t0}
        save_checkpoint(ckpt_dir, model, opt, names, step, info)

    end = total if stop_after is None else max(start, min(total, int(stop_after)))
    with _progress(progress) as bar:
        task = bar.add_task("train", total=total, completed=start, loss="-", temp="-")
        for step in range(start, end):
            batch = make_batch(recipe["seed"], step, recipe["batch_size"], recipe["audio_batch"], recipe["sides"],
                               recipe["sibling_rate"], recipe["augment"])  # fmt: skip
            for g in opt.param_groups:
                g["lr"] = lr_at(step, recipe)
            loss, parts = batch_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trained_parameters(model)], recipe["grad_clip"])
            opt.step()
            value = float(loss.detach())
            losses.append(value)
            history.append({"step": step + 1, "loss": round(value, 5), **{m: round(v, 5) for m, v in parts.items()}})
            scale = float(logit_scale(model).detach())
            recent = float(np.mean(losses[-20:]))
            bar.update(task, advance=1, loss=f"{recent:.3f}", temp=f"{1 / scale:.3f}")
            if not progress and log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}/{total} loss {recent:.4f} T {1 / scale:.4f} "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
            if (step + 1) % recipe["checkpoint_every"] == 0 or step + 1 in (end, total):
                checkpoint(step + 1)

    seconds = time.perf_counter() - t0
    model.eval()
    k = max(1, min(20, len(losses) // 4))
    metrics = {
        "finished": end == total,
        "steps": total,
        "step": end,
        "seconds": round(seconds, 1),
        "final_loss": float(np.mean(losses[-k:])) if losses else float("nan"),
        "losses_first": float(np.mean(losses[:k])) if losses else float("nan"),
        "losses_last": float(np.mean(losses[-k:])) if losses else float("nan"),
        "loss_history": [h["loss"] for h in history],
        "losses_last_by_modality": {m: float(np.mean([h[m] for h in history[-k:]])) for m in MODALITIES}
        if history
        else {},
        "logit_scale": float(logit_scale(model).detach()),
        "weights": str(out_dir / "model.safetensors") if end == total else None,
    }
    if end < total:
        return metrics
    info = {
        "arch": arch,
        "recipe": recipe,
        "metrics": metrics,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    save_weights(out_dir, model, arch, info)
    if not keep_checkpoint:
        for name in ("state.safetensors", "state.json"):
            (ckpt_dir / name).unlink(missing_ok=True)
        try:
            ckpt_dir.rmdir()
        except OSError:
            pass
    return metrics


# --------------------------------------------------------------------------------------------
# Evaluation


def all_specs(modality: str) -> list:
    """One spec per distinct caption of a modality (image 108, video 72, audio 6)."""
    if modality == "image":
        return [ImageSpec(s, c, z, p) for s in SHAPES for c in COLOURS for z in SIZES for p in POSITIONS]
    if modality == "video":
        return [VideoSpec(s, c, d) for s in SHAPES for c in COLOURS for d in DIRECTIONS]
    if modality == "audio":
        return [AudioSpec(p, t) for p in PITCHES for t in TIMBRES]
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


def canonical_captions(modality: str) -> list[str]:
    return [canonical_caption(s) for s in all_specs(modality)]


def _load_encoder(weights_dir: Path, cache_dir: Path):
    from nextgpt.config import EncoderConfig
    from nextgpt.encoder import MediaEncoder

    cfg = EncoderConfig(source=str(weights_dir / "model.safetensors"))
    return MediaEncoder(cfg, cache_dir, "cpu", torch.float32)


def evaluate(
    weights_dir: str | os.PathLike = DEFAULT_OUT,
    *,
    seed: int = EVAL_SEED,
    n_per_modality: int = 100,
    modalities: Sequence[str] = MODALITIES,
    data_dir: str | os.PathLike | None = None,
    print_table: bool = True,
) -> dict[str, Any]:
    """Caption retrieval on fresh files: per modality, `n_per_modality` pairs are written with
    `write_pairs` (seed `seed`, PNG / WAV / H.264 MP4), encoded through `MediaEncoder` (the real
    inference path: file → preprocess → 5 × 3 video clips / 3 audio clips → pooled embedding) and
    matched by cosine similarity against the canonical captions of EVERY attribute combination
    of the modality (ImageBind's text branch). Top-1 counts when the best caption is the sample's
    canonical caption; per-attribute accuracy reads the attributes of the retrieved caption.

    Returns {modality: {"n", "top1", "top5", "candidates", "attributes": {key: acc}}, "seconds"}.
    """
    from training.world.dataset import read_pairs, write_pairs
    from training.world.spec import spec_from_attributes

    weights_dir = Path(weights_dir)
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="imagebind-eval-") as tmp:
        data = Path(data_dir) if data_dir is not None else Path(tmp) / "data"
        enc = _load_encoder(weights_dir, Path(tmp) / "cache")
        model = enc.model
        for modality in modalities:
            path = write_pairs(data, modality, n_per_modality, seed)
            records = read_pairs(path)
            specs = [spec_from_attributes(modality, r["attributes"]) for r in records]
            x = enc.encode([(modality, r["path"]) for r in records], normalize=True)
            cand_specs = all_specs(modality)
            with torch.inference_mode():
                t = F.normalize(text_embeddings(model, tokenize(canonical_captions(modality)), fast=False), dim=-1)
            sims = x @ t.T
            truth = torch.tensor([cand_specs.index(_canonical_spec(s)) for s in specs])
            top = sims.topk(min(5, sims.shape[1]), dim=1).indices
            pred = [cand_specs[int(i)] for i in top[:, 0]]
            keys = ATTRIBUTE_KEYS[modality]
            results[modality] = {
                "n": len(records),
                "candidates": len(cand_specs),
                "top1": float((top[:, 0] == truth).float().mean()),
                "top5": float((top == truth[:, None]).any(dim=1).float().mean()),
                "attributes": {
                    k: float(np.mean([getattr(p, k) == getattr(s, k) for p, s in zip(pred, specs)])) for k in keys
                },
            }
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if print_table:
        print_results(results)
    return results


def _canonical_spec(spec):
    """The spec with its non-caption fields (duration, frame count) at their defaults."""
    if isinstance(spec, AudioSpec):
        return AudioSpec(spec.pitch, spec.timbre)
    if isinstance(spec, VideoSpec):
        return VideoSpec(spec.shape, spec.colour, spec.direction)
    return spec


def results_table(results: dict[str, Any]):
    from rich.table import Table

    table = Table(title="ImageBind (small) caption retrieval, top-1 among all canonical captions")
    for col in ("modality", "n", "candidates", "top-1", "top-5", "per attribute"):
        table.add_column(col, justify="left" if col in ("modality", "per attribute") else "right")
    for m in MODALITIES:
        if m not in results:
            continue
        r = results[m]
        attrs = ", ".join(f"{k} {v:.1%}" for k, v in r["attributes"].items())
        table.add_row(m, str(r["n"]), str(r["candidates"]), f"{r['top1']:.1%}", f"{r['top5']:.1%}", attrs)
    return table


def print_results(results: dict[str, Any]) -> None:
    from rich.console import Console

    Console().print(results_table(results))


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.world.encoder_train",
        description="Train / evaluate the small ImageBind on the shapes world.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train (resumable) and save model.safetensors + arch.json")
    tr.add_argument("--out", default=str(DEFAULT_OUT), help="weights folder (default %(default)s)")
    tr.add_argument("--checkpoint-dir", default=None, help="checkpoint folder (default OUT/checkpoint)")
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--batch-size", type=int, default=None, help="images and videos per step (each)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    tr.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    tr.add_argument("--no-eval", action="store_true", help="skip the retrieval evaluation afterwards")
    tr.add_argument("--eval-n", type=int, default=100, help="evaluation pairs per modality")
    tr.add_argument("--smoke", action="store_true", help=f"a few steps on tiny batches (CI): {SMOKE}")
    tr.add_argument("--quiet", action="store_true", help="no progress bar (a log line every 50 steps)")
    ev = sub.add_parser("eval", help="caption retrieval per modality on fresh files")
    ev.add_argument("--weights", default=str(DEFAULT_OUT), help="folder with model.safetensors + arch.json")
    ev.add_argument("--seed", type=int, default=EVAL_SEED)
    ev.add_argument("--n", type=int, default=100, help="pairs per modality")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.command == "train" and args.smoke:
        torch.set_num_threads(1)  # tiny batches: a second thread only adds synchronisation
    if args.command == "train":
        kw: dict[str, Any] = {}
        if args.smoke:
            kw = {k: SMOKE[k] for k in ("audio_batch", "warmup", "checkpoint_every")}
            steps, batch = args.steps or SMOKE["steps"], args.batch_size or SMOKE["batch_size"]
        else:
            steps, batch = args.steps or DEFAULTS["steps"], args.batch_size or DEFAULTS["batch_size"]
        metrics = train(args.out, steps=steps, batch_size=batch, seed=args.seed, resume=not args.no_resume,
                        progress=not args.quiet, checkpoint_dir=args.checkpoint_dir, **kw)  # fmt: skip
        print(
            f"trained {metrics['steps']} steps in {metrics['seconds']:.0f} s: loss "
            f"{metrics['losses_first']:.3f} → {metrics['losses_last']:.3f}; weights {metrics['weights']}"
        )
        if not args.no_eval and not args.smoke:
            evaluate(args.out, n_per_modality=args.eval_n)
        return 0
    results = evaluate(args.weights, seed=args.seed, n_per_modality=args.n)
    if args.json:
        _write_json(Path(args.json), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
