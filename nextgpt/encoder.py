"""ImageBind as the media encoder: each image, video or audio file → one vector.

The model code is Meta's (`imagebind-unofficial`, installed with --no-deps); its weights are
either the official `imagebind_huge.pth`, any compatible .pth/.safetensors file, or a toy-size
random model (`source: tiny`) built once into the cache and loaded back from its file like real
weights.

What `MediaEncoder.encode` returns matches what the released NExT-GPT was trained on: NExT-GPT's
copy of ImageBind L2-normalises each clip's embedding and averages the clips (video: 5 clips × 3
spatial crops; audio: 3 clips), WITHOUT normalising the average again and without ImageBind's ×20
logit scale on audio. So an image's vector has norm 1 and a video's or an audio's slightly less.
`encode(..., normalize=True)` gives unit vectors instead (for similarity search).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import threading
import types
from pathlib import Path

import torch

from nextgpt import media
from nextgpt.config import EncoderConfig

log = logging.getLogger(__name__)

IMAGEBIND_HUGE_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"

# `imagebind.models.imagebind_model.imagebind_huge` (Meta's release; ImageBindModel defaults for the rest)
HUGE_ARCH: dict = dict(
    vision_embed_dim=1280,
    vision_num_blocks=32,
    vision_num_heads=16,
    text_embed_dim=1024,
    text_num_blocks=24,
    text_num_heads=16,
    out_embed_dim=1024,
    audio_drop_path=0.1,
    imu_drop_path=0.7,
)

# Toy size: every modality's trunk is built by the class, so all of them are shrunk. Input
# geometry (224 px, 14 px patches, 2-frame video, 128 × 204 fbank) stays real, so the real
# preprocessing runs. ~1.7 M parameters (mostly the text vocabulary); a forward is milliseconds.
TINY_ARCH: dict = dict(
    out_embed_dim=32,
    vision_embed_dim=32, vision_num_blocks=1, vision_num_heads=2,
    audio_embed_dim=32, audio_num_blocks=1, audio_num_heads=2, audio_drop_path=0.0,
    text_embed_dim=32, text_num_blocks=1, text_num_heads=2,
    depth_embed_dim=16, depth_num_blocks=1, depth_num_heads=2,
    thermal_embed_dim=16, thermal_num_blocks=1, thermal_num_heads=2,
    imu_embed_dim=16, imu_num_blocks=1, imu_num_heads=2, imu_drop_path=0.0,
)  # fmt: skip

_OUR_MODALITIES = {"image": "vision", "video": "vision", "audio": "audio"}


# --------------------------------------------------------------------------------------------
# Importing Meta's model code without its heavy imports


def _drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


class DropPath(torch.nn.Module):
    """Stochastic depth, as timm's `DropPath`: drop whole samples (dim 0) of a residual branch."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        return _drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


@contextlib.contextmanager
def _timm_layers_standin():
    """Make `from timm.layers import DropPath, trunc_normal_` work while ImageBind's modules import.

    timm (whose `timm.layers` imports torchvision) is not installable beside our torch, and
    ImageBind only takes those two names from it. The stand-in is in sys.modules only for the
    duration of the import: left there, a `timm` without a spec would confuse libraries that
    probe for timm (transformers' `find_spec("timm")` raises on it).
    """
    try:
        import timm.layers  # noqa: F401  (the real one, when it works)

        yield
        return
    except Exception:
        pass
    saved = {name: sys.modules.get(name) for name in ("timm", "timm.layers")}
    timm = types.ModuleType("timm")
    layers = types.ModuleType("timm.layers")
    layers.DropPath = DropPath
    layers.drop_path = _drop_path
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    timm.layers = layers
    timm.__path__ = []  # a package, so that `timm.layers` resolves
    sys.modules["timm"], sys.modules["timm.layers"] = timm, layers
    try:
        yield
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def import_imagebind_model() -> types.ModuleType:
    """Return `imagebind.models.imagebind_model`, imported without running `imagebind/__init__.py`.

    That `__init__` imports `imagebind.data` (torchvision, torchaudio, pytorchvideo,
    pkg_resources), none of which can be installed beside our torch; the model code itself needs
    only torch, numpy, einops, ftfy, regex, iopath and two names from `timm.layers` (stood in for
    while importing, see `_timm_layers_standin`). So the `imagebind` package is registered in
    sys.modules as a bare namespace whose `__path__` is the installed folder, and the model
    module is imported through it. On failure, every `imagebind` module this call added is
    removed again, so that no broken half-package stays behind.
    """
    name = "imagebind.models.imagebind_model"
    if name in sys.modules:
        return sys.modules[name]
    before = {k for k in sys.modules if k == "imagebind" or k.startswith("imagebind.")}
    try:
        if "imagebind" not in sys.modules:
            spec = importlib.util.find_spec("imagebind")  # locates the package; runs nothing
            if spec is None or not spec.submodule_search_locations:
                raise ImportError(
                    "ImageBind's model code is not installed: pip install --no-deps imagebind-unofficial==0.1.1"
                )
            pkg = types.ModuleType("imagebind", "Meta's ImageBind (package __init__ bypassed by nextgpt.encoder)")
            pkg.__path__ = list(spec.submodule_search_locations)
            pkg.__package__ = "imagebind"
            pkg.__file__ = spec.origin
            pkg.__spec__ = spec  # so that find_spec("imagebind") keeps working (nothing reloads it)
            sys.modules["imagebind"] = pkg
        with _timm_layers_standin():
            return importlib.import_module(name)
    except BaseException:
        for k in [k for k in sys.modules if (k == "imagebind" or k.startswith("imagebind.")) and k not in before]:
            del sys.modules[k]
        raise


# --------------------------------------------------------------------------------------------
# Loading weights


@contextlib.contextmanager
def _no_init_on_meta():
    """torch.nn.init's functions (also where imported by name: nn.MultiheadAttention's module, the
    trunc_normal_ ImageBind takes from timm) skip meta tensors: their meta kernels run through
    torch._refs, whose first call imports torch._dynamo (~1 s of every start, for values the
    checkpoint replaces). Real tensors, e.g. in another thread, are still initialised."""
    import torch.nn.modules.activation

    def skip(fn):
        return lambda tensor, *a, **k: tensor if getattr(tensor, "is_meta", False) else fn(tensor, *a, **k)

    owners = [torch.nn.init, torch.nn.modules.activation]
    owners += [m for m in (sys.modules.get(f"imagebind.models.{n}") for n in ("multimodal_preprocessors", "transformer")) if m]
    saved = [(o, n, f) for o in owners for n, f in vars(o).items()
             if n.endswith("_") and not n.startswith("_") and callable(f) and "init" in n + getattr(f, "__module__", "")]
    try:
        for owner, name, fn in saved:
            setattr(owner, name, skip(fn))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _build(arch: dict, *, meta: bool = False) -> torch.nn.Module:
    ib = import_imagebind_model()
    try:
        if meta:  # parameters on the meta device (no memory, no real init): the checkpoint's are assigned
            from accelerate import init_empty_weights

            with init_empty_weights(), _no_init_on_meta():
                return ib.ImageBindModel(**arch)
        return ib.ImageBindModel(**arch)
    except TypeError as e:
        raise ValueError(f"encoder.arch: not valid ImageBindModel arguments: {e}") from None


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not the zip format: mmap unsupported
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):  # a training checkpoint wrapping the weights
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict (got {type(sd).__name__})")
    return sd


def _summarise(keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_model(path: Path, arch: dict) -> torch.nn.Module:
    """ImageBindModel(**arch) with weights from `path`, strictly: every key present, none extra."""
    sd = _load_state(path)
    model = _build(arch, meta=True)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_summarise(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_summarise(unexpected)})")
        raise ValueError(f"{path}: weights do not fit the ImageBind architecture {arch}: {'; '.join(parts)}")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path}: weights do not fit the ImageBind architecture {arch}: {e}") from None
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"{path}: tensors left uninitialised: {_summarise(leftover)}")
    model.eval()
    model.requires_grad_(False)
    model.nextgpt_arch = dict(arch)  # the ImageBindModel kwargs it was built with
    return model


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` beside `path`, then rename into place: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _build_tiny(folder: Path, arch: dict) -> Path:
    """Build the toy model once (seed 0) into folder/model.safetensors + arch.json; return the file."""
    from safetensors.torch import save_file

    weights, arch_file = folder / "model.safetensors", folder / "arch.json"
    if weights.is_file() and arch_file.is_file():
        try:
            if json.loads(arch_file.read_text()) == arch:
                return weights
        except (OSError, ValueError):
            pass
    log.info("building the tiny ImageBind into %s", folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _build(arch)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(weights, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_atomic(arch_file, lambda p: p.write_text(json.dumps(arch, indent=1, sort_keys=True)))
    return weights


def load_imagebind(cfg: EncoderConfig, cache_dir: str | os.PathLike) -> torch.nn.Module:
    """ImageBindModel on the CPU in eval mode with requires_grad False, per `cfg.source`:

    - `tiny`: TINY_ARCH updated with `cfg.arch`, built under seed 0 the first time into
      cache_dir/tiny/imagebind/{model.safetensors, arch.json}, and always loaded from that file.
    - `imagebind_huge`: Meta's weights at cache_dir/imagebind_huge.pth, downloaded on first use.
    - a path to a .safetensors or .pth/.pt file: architecture from `cfg.arch`, else from an
      arch.json beside the file, else the huge one.
    Loading is strict: missing or unexpected keys are an error that names them.
    """
    cache_dir = Path(cache_dir).expanduser()
    source = cfg.source
    if source == "tiny":
        arch = {**TINY_ARCH, **cfg.arch}
        return _load_model(_build_tiny(cache_dir / "tiny" / "imagebind", arch), arch)
    if source == "imagebind_huge":
        path = cache_dir / "imagebind_huge.pth"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            log.warning("downloading ImageBind huge weights (4.5 GB) to %s", path)
            try:
                torch.hub.download_url_to_file(IMAGEBIND_HUGE_URL, str(path), progress=True)
            except Exception as e:
                raise RuntimeError(
                    f"could not download {IMAGEBIND_HUGE_URL} to {path} ({e}); download it by hand, "
                    "or set encoder.source to a local weights file"
                ) from None
        return _load_model(path, {**HUGE_ARCH, **cfg.arch})
    path = Path(source).expanduser()
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(
            f"encoder.source must be 'tiny', 'imagebind_huge' or a .safetensors/.pth weights file, got {source!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"encoder.source: no such weights file: {path}")
    arch = cfg.arch
    if not arch:
        side = path.with_name("arch.json")
        arch = json.loads(side.read_text()) if side.is_file() else HUGE_ARCH
    return _load_model(path, dict(arch))


# --------------------------------------------------------------------------------------------
# The encoder


class MediaEncoder:
    """Frozen ImageBind: files → one vector each (see the module docstring for what the vector is).

    Not an nn.Module on purpose: it is never trained, and must not show up among a model's
    parameters or in its state dict.
    """

    clips_per_forward = 16  # images or clips per forward pass (bounds activation memory)
    video_spatial_crops = 3  # ImageBind's (and so NExT-GPT's) 3 crops per video clip; 1 = centre only

    def __init__(self, cfg: EncoderConfig, cache_dir: str | os.PathLike, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.device = torch.device(device)
        self.dtype = dtype
        self._model: torch.nn.Module | None = None
        self._lock = threading.Lock()

    @property
    def model(self) -> torch.nn.Module:
        """ImageBind, loaded on first use: a chat whose first message has no media does not wait for it."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = load_imagebind(self.cfg, self.cache_dir).to(device=self.device, dtype=self.dtype)
        return self._model

    @property
    def _arch(self) -> dict:
        return self.model.nextgpt_arch

    @property
    def _video_frames(self) -> int:  # frames per clip
        return int(self._arch.get("video_frames", 2))

    @property
    def _mel_bins(self) -> int:
        return int(self._arch.get("audio_num_mel_bins", media.AUDIO_MEL_BINS))

    @property
    def _audio_frames(self) -> int:
        return int(self._arch.get("audio_target_len", media.AUDIO_TARGET_FRAMES))

    @property
    def out_dim(self) -> int:
        return int(self.model.modality_heads["vision"][-1].out_features)

    # -- tensors ------------------------------------------------------------------------------

    def _embed(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) single images/clips → (N, out_dim) L2-normalised embeddings, in chunks.

        ImageBind's forward for one modality, minus its postprocessor's logit scale."""
        m, outs = self.model, []
        for chunk in x.split(self.clips_per_forward):
            pre = m.modality_preprocessors[key](**{key: chunk.to(device=self.device, dtype=self.dtype)})
            v = m.modality_heads[key](m.modality_trunks[key](**pre["trunk"]), **pre["head"])
            outs.append(torch.nn.functional.normalize(v, dim=-1))
        return torch.cat(outs)

    def encode_tensors(self, modality: str, batch: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Preprocessed inputs → (B, out_dim), as NExT-GPT's ImageBind forward: per-clip
        L2-normalised embeddings averaged over the clips (no ×20 audio scale).

        image: (B, 3, 224, 224); video: (B, S, 3, 2, 224, 224) (S clips, e.g. from `video_clips`);
        audio: (B, S, 1, 128, 204) (from `audio_clips`). Runs under inference_mode; the result is
        an ordinary tensor (usable in autograd) on the encoder's device and dtype.
        """
        if modality not in _OUR_MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(_OUR_MODALITIES)}, got {modality!r}")
        want = {"image": 4, "video": 6, "audio": 5}[modality]
        if batch.ndim != want:
            raise ValueError(f"{modality} batch must have {want} dimensions, got shape {tuple(batch.shape)}")
        with torch.inference_mode():
            if modality == "image":
                out = self._embed("vision", batch)
            else:
                b, s = batch.shape[:2]
                out = self._embed(_OUR_MODALITIES[modality], batch.reshape(b * s, *batch.shape[2:]))
                out = out.reshape(b, s, -1).mean(dim=1)
            if normalize:
                out = torch.nn.functional.normalize(out, dim=-1)
        return out.clone()  # outside inference mode: an inference tensor can't be saved for backward

    # -- files ----------------------------------------------------------------------------------

    def preprocess(self, modality: str, path: str | os.PathLike) -> torch.Tensor:
        """One file → its encoder input: image (3, 224, 224); video (S, 3, 2, 224, 224);
        audio (S, 1, 128, 204). Raises media.AttachmentError for an unusable file."""
        cfg = self.cfg
        if modality == "image":
            return media.image_tensor(media.load_image(path))
        if modality == "video":
            frames, fps = media.load_video(path)
            return media.video_clips(frames, fps, cfg.video_clips, cfg.clip_seconds, frames_per_clip=self._video_frames,
                                     spatial_crops=self.video_spatial_crops)  # fmt: skip
        if modality == "audio":
            wave, sr = media.load_audio(path)
            return media.audio_clips(wave, sr, cfg.audio_clips, cfg.clip_seconds, self._mel_bins, self._audio_frames)
        raise ValueError(f"modality must be one of {', '.join(_OUR_MODALITIES)}, got {modality!r}")

    def encode(self, items: list[tuple[str, str | os.PathLike]], normalize: bool = False) -> torch.Tensor:
        """[(modality, path), ...] → (len(items), out_dim): one row per item, in order.

        modality is 'image', 'video' or 'audio' (a video file's sound track is accepted as audio).
        Rows are NExT-GPT's ImageBind vectors (see the module docstring); `normalize=True` makes
        every row unit length. Raises media.AttachmentError for an unusable file, or one whose
        content is not of the stated modality.
        """
        if not items:
            return torch.zeros(0, self.out_dim, device=self.device, dtype=self.dtype)
        inputs = []
        for modality, path in items:
            if modality not in _OUR_MODALITIES:
                raise ValueError(f"modality must be one of {', '.join(_OUR_MODALITIES)}, got {modality!r}")
            inputs.append(self.preprocess(modality, path))
        rows: list[torch.Tensor | None] = [None] * len(items)
        # images in one batch; video/audio clips of all items of a modality in one batch, then split
        for modality in ("image", "video", "audio"):
            idx = [i for i, (m, _) in enumerate(items) if m == modality]
            if not idx:
                continue
            if modality == "image":
                out = self.encode_tensors("image", torch.stack([inputs[i] for i in idx]), normalize)
                for i, v in zip(idx, out):
                    rows[i] = v
                continue
            key = _OUR_MODALITIES[modality]
            clips = torch.cat([inputs[i] for i in idx])
            with torch.inference_mode():
                emb = self._embed(key, clips)
                pooled = [e.mean(dim=0) for e in emb.split([len(inputs[i]) for i in idx])]
            for i, v in zip(idx, pooled):
                v = v.clone()
                rows[i] = torch.nn.functional.normalize(v, dim=-1) if normalize else v
        return torch.stack(rows)  # type: ignore[arg-type]
