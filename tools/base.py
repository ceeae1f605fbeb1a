"""The decoder tools' common part: lazy pipeline loading, embeddings in, content-addressed files out.

NExT-GPT's output projectors turn the LLM's signal-token states into `prompt_embeds` for a
diffusion decoder; a `DecoderTool` renders media from them. It never sees prompt text and never
names a file after one: every file is named by the SHA-256 of its bytes.

torch and diffusers are imported on first use, so building the tools (and importing this package)
stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import secrets
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from nextgpt.config import DecoderConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

ProgressCallback = Callable[[int, int], None]


@dataclass
class MediaOutput:
    """One rendered file. `path` is `<output_dir>/<sha256>.<ext>`."""

    modality: str
    path: Path
    mime: str
    sha256: str
    width: int | None = None  # image, video
    height: int | None = None  # image, video
    frames: int | None = None  # video
    fps: float | None = None  # video
    duration: float | None = None  # seconds: audio, video
    sample_rate: int | None = None  # audio
    preview_path: Path | None = None  # video: an animated GIF (also content-addressed)
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None


class ContentWithheld(Exception):
    """The pipeline's safety checker flagged what a call rendered: nothing of that call is written.
    `rows`: the flagged batch rows (a batch's other rows can be rendered again on their own)."""

    def __init__(self, modality: str, rows: list[int]):
        self.modality, self.rows = modality, list(rows)
        which = "" if rows == [0] else f" (batch rows {', '.join(map(str, rows))})"
        super().__init__(f"the {modality} was withheld: the decoder's safety checker flagged it as not safe for work{which}")


# --------------------------------------------------------------------------------------------------
# files


def write_bytes_addressed(data: bytes, output_dir: Path, ext: str) -> tuple[Path, str]:
    """Write `data` to `output_dir/<sha256>.<ext>` atomically; reuse an identical existing file."""
    sha = hashlib.sha256(data).hexdigest()
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{sha}.{ext}"
    if path.is_file() and path.stat().st_size == len(data):
        return path, sha
    fd, tmp = tempfile.mkstemp(dir=output_dir, prefix=".tmp-", suffix=f".{ext}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path, sha


def adopt_file_addressed(tmp: Path, output_dir: Path, ext: str) -> tuple[Path, str]:
    """Move a finished temp file (in `output_dir`) to `<sha256>.<ext>` atomically."""
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    sha = h.hexdigest()
    path = output_dir / f"{sha}.{ext}"
    if path.is_file() and path.stat().st_size == tmp.stat().st_size:
        tmp.unlink()
    else:
        os.replace(tmp, path)
    return path, sha


@contextlib.contextmanager
def _quiet_loading():
    """No tqdm bars from diffusers/transformers while a pipeline loads (restored afterwards)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    states = [(m, m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for m, _ in states:
        m.disable_progress_bar()
    # TextToVideoSD and AudioLDM are the decoders NExT-GPT uses; their "deprecated" notice is noise
    notice = dlog.get_logger("diffusers.pipelines.pipeline_utils")
    notice.addFilter(_drop_deprecated_notice)
    try:
        yield
    finally:
        notice.removeFilter(_drop_deprecated_notice)
        for m, was in states:
            if was:
                m.enable_progress_bar()


@contextlib.contextmanager
def _onednn(enabled: bool):
    """Run PyTorch's CPU convolutions through oneDNN or not (`DecoderConfig.onednn`), then restore the
    setting. Set directly: `torch.backends.mkldnn.flags` also resets the other flags and warns about TF32."""
    import torch

    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _drop_deprecated_notice(record) -> bool:
    return "has been deprecated and will not receive" not in record.getMessage()


# --------------------------------------------------------------------------------------------------
# the tool


class DecoderTool:
    """Renders one modality from `prompt_embeds` with a diffusers pipeline.

    The pipeline is loaded on first use (`load()` / `.pipeline`) and kept on the instance. A
    `source` of `"tiny"` builds the toy pipeline from `tools.tiny` into `cache_dir/tiny/<name>`
    once and then always loads it from there with `from_pretrained`, like real weights.
    """

    modality: ClassVar[str]
    pipeline_class_name: ClassVar[str]  # attribute of the `diffusers` package
    extension: ClassVar[str]
    mime: ClassVar[str]
    size_keys: ClassVar[tuple[str, ...]] = ()  # keyword overrides accepted by __call__
    size_aliases: ClassVar[dict[str, str]] = {}  # pipeline spelling → ours
    load_kwargs: ClassVar[dict[str, Any]] = {}  # extra from_pretrained keywords

    def __init__(self, cfg: DecoderConfig, cache_dir: str | os.PathLike, output_dir: str | os.PathLike):
        self.cfg = cfg
        self.cache_dir = Path(cache_dir).expanduser()
        self.output_dir = Path(output_dir).expanduser()
        self._pipe = None
        self._negative = None  # cached unconditional embedding (on CPU)
        self._lock = threading.RLock()
        self.device: str | None = None  # resolved on load
        self.dtype = None  # torch dtype, resolved on load
        self.offloaded = False  # True while an offloading tool's pipeline sits on the CPU
        self.load_count = 0

    def __repr__(self) -> str:
        state = "loaded" if self._pipe is not None else "not loaded"
        return f"<{type(self).__name__} source={self.cfg.source!r} {state}>"

    # ---- loading ---------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    @property
    def pipeline(self):
        return self.load()

    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    def tiny_dir(self) -> Path:
        return self.cache_dir / "tiny" / self.modality

    def _ensure_tiny(self) -> Path:
        """Build and save the toy pipeline once; later calls (and processes) reuse the folder."""
        from tools import tiny

        target = self.tiny_dir()
        stamp = {"builder": "tools.tiny", "name": self.modality, "version": tiny.TINY_VERSION}
        marker = target / "nextgpt_tiny.json"
        if _read_json(marker) == stamp:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{self.modality}-"))
        try:
            with _quiet_loading():
                tiny.build_tiny(self.modality).save_pretrained(tmp)
            (tmp / "nextgpt_tiny.json").write_text(json.dumps(stamp))
            if target.exists():  # stale build (other version) or a concurrent builder's result
                if marker.is_file() and _read_json(marker) == stamp:
                    shutil.rmtree(tmp)
                    return target
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:  # another process got there first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def load(self):
        """The pipeline, loaded (once) and moved to the configured device."""
        if self._pipe is not None:
            return self._pipe
        with self._lock:
            if self._pipe is not None:
                return self._pipe
            from nextgpt.devices import resolve  # imports torch: only when a pipeline loads

            torch_device, dtype = resolve(self.cfg.device, self.cfg.dtype)
            device = str(torch_device)
            cls = self.pipeline_class()
            kwargs: dict[str, Any] = self._load_kwargs()
            if self.cfg.source == "tiny":
                source: str | Path = self._ensure_tiny()
            else:
                source = self.cfg.source
                p = Path(source).expanduser()
                if p.exists():
                    source = p
                elif self.cfg.revision:
                    kwargs["revision"] = self.cfg.revision
            with _quiet_loading(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                pipe = cls.from_pretrained(source, torch_dtype=dtype, **kwargs)
            pipe.set_progress_bar_config(disable=True)
            # an offloading tool waits on the CPU until its first call
            pipe.to("cpu" if self.cfg.offload else device)
            self._loaded(pipe)
            self.device, self.dtype = device, dtype
            self._pipe = pipe
            self.offloaded = bool(self.cfg.offload)
            self.load_count += 1
            return pipe

    def _load_kwargs(self) -> dict[str, Any]:
        return dict(self.load_kwargs)

    def _loaded(self, pipe) -> None:
        """Called once the pipeline is loaded (and placed)."""

    def to_cpu(self) -> None:
        """Move the pipeline to the CPU (it goes back to its device on the next call)."""
        with self._lock:
            if self._pipe is not None:
                self._pipe.to("cpu")
                self.offloaded = True
                if self.device != "cpu":
                    _empty_cache(self.device)

    def to_device(self) -> None:
        with self._lock:
            pipe = self.load()
            if self.offloaded:
                pipe.to(self.device)
                self.offloaded = False

    # ---- embeddings ------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        """D, the width of the `prompt_embeds` this pipeline takes (loads the pipeline)."""
        return int(self._embed_dim(self.load()))

    @property
    def expected_embeds_shape(self) -> tuple[int | None, int]:
        """Shape of one batch row of `prompt_embeds`; None = any length (loads the pipeline)."""
        return (None, self.embed_dim)

    def _embed_dim(self, pipe) -> int:
        raise NotImplementedError

    def _check_embeds(self, prompt_embeds) -> "torch.Tensor":
        """Validate (B, Q, D) and return it as a float tensor (not yet cast / moved)."""
        import torch

        e = _as_tensor(prompt_embeds)
        d = self.embed_dim
        if e.ndim != 3 or e.shape[0] < 1 or e.shape[1] < 1 or e.shape[2] != d:
            raise ValueError(
                f"{self.modality} decoder expects prompt_embeds of shape (batch, tokens, {d}), "
                f"got {tuple(e.shape)}; check the {self.modality} output projector's out_dim"
            )
        if not torch.isfinite(e).all():
            raise ValueError(f"{self.modality} decoder: prompt_embeds contain NaN or inf")
        return e

    def _encode_text(self, pipe, text: str) -> "torch.Tensor":
        """A text's embedding with the pipeline's own tokenizer and text encoder."""
        prompt_embeds, _ = pipe.encode_prompt(text, self.device, 1, False)
        return prompt_embeds

    def text_embeds(self, text: str) -> "torch.Tensor":
        """The decoder's own text-encoder output for `text` (1, L, D) / (1, D), on the CPU: what
        the output projectors learn to imitate, and how a plain text prompt drives the tool."""
        import torch

        with self._lock, torch.inference_mode():
            pipe = self.load()
            was_offloaded = self.offloaded
            self.to_device()
            try:
                return self._encode_text(pipe, text).detach().to("cpu")
            finally:
                if was_offloaded:
                    self.to_cpu()

    def negative_embeds(self) -> "torch.Tensor":
        """Cached unconditional embedding (the empty prompt's), on the CPU, in the pipeline dtype."""
        if self._negative is None:
            self._negative = self.text_embeds("")
        return self._negative

    def _negative_for(self, embeds: "torch.Tensor") -> "torch.Tensor":
        """The unconditional embedding shaped like `embeds` (same batch, same token count).

        The pipelines require equal shapes. A projector with fewer queries than the tokenizer's
        length (the tiny profile: 8 vs 77) gets the first Q positions; more queries repeat the
        last (padding) position.
        """
        neg = self.negative_embeds().to(device=embeds.device, dtype=embeds.dtype)
        if neg.ndim == 3:
            q, length = embeds.shape[1], neg.shape[1]
            if q < length:
                neg = neg[:, :q]
            elif q > length:
                neg = _pad_tokens(neg, q)
        return neg.expand(embeds.shape[0], *neg.shape[1:]).contiguous()

    @property
    def rows_independent(self) -> bool:
        """Whether a batch row renders as it would alone (same embeddings and seed), up to float32
        rounding (the CPU's matrix kernels round differently for different batch sizes, so a few
        values may differ in the last bit, and a PNG pixel by one level). False when a pipeline
        component says `rows_independent = False` (e.g. a vocoder that draws one noise tensor for
        the whole batch). Loads the pipeline."""
        return all(getattr(c, "rows_independent", True) for c in self.load().components.values())

    # ---- sizes -----------------------------------------------------------------------------------

    def _sizes(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = set(overrides) - set(self.size_keys) - set(self.size_aliases)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword(s) {', '.join(sorted(unknown))}; "
                f"size overrides: {', '.join(self.size_keys) or 'none'}"
            )
        out = {}
        for k, v in overrides.items():
            if v is not None:
                out[self.size_aliases.get(k, k)] = v
        return out

    # ---- generation ------------------------------------------------------------------------------

    def __call__(
        self,
        prompt_embeds,
        *,
        seed: int | Sequence[int | None] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        callback: ProgressCallback | None = None,
        safety_checker: bool | None = None,
        **size_overrides,
    ) -> list[MediaOutput]:
        """Render one file per batch row of `prompt_embeds`.

        `seed` seeds a CPU `torch.Generator` (None → a random seed, reported in the outputs): the
        same seed, embeddings and settings give byte-identical files. `callback(step, total)` is
        called after each denoising step with step = 1..total; an exception it raises aborts the
        generation. Size overrides: see the subclass (`height`, `width`, `frames`, `fps`, `seconds`).

        Per-row seeds: a list or tuple `seed` holds one seed per batch row (None → random) and each
        row gets its own generator, so row i renders as `prompt_embeds[i:i+1]` alone with
        `seed=seed[i]` would (up to float32 rounding, when `rows_independent`); each output reports
        its own seed. This is how several requests share one decoder call.

        `safety_checker`: run the pipeline's safety checker on this call (None: the config's
        `safety_checker`); a pipeline that ships none has nothing to run. When it flags a row,
        `ContentWithheld` is raised and nothing of the call is written.
        """
        import torch

        steps = int(self.cfg.steps if steps is None else steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        guidance = float(self.cfg.guidance if guidance is None else guidance)
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        sizes = self._resolve_sizes(self._sizes(size_overrides))
        per_row = isinstance(seed, (list, tuple))
        if per_row:
            seeds = [secrets.randbits(63) if s is None else int(s) for s in seed]
        else:
            if seed is None:
                seed = secrets.randbits(63)
            seed = int(seed)

        with self._lock:
            pipe = self.load()
            embeds = self._check_embeds(prompt_embeds)
            if per_row and len(seeds) != embeds.shape[0]:
                raise ValueError(f"{len(seeds)} seeds for {embeds.shape[0]} rows of prompt_embeds; give one seed per row")
            self.to_device()
            try:
                embeds = embeds.to(device=self.device, dtype=self.dtype)
                negative = self._negative_for(embeds) if guidance > 1 else None
                if per_row:
                    generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                else:
                    generator = torch.Generator("cpu").manual_seed(seed)
                with torch.inference_mode(), _onednn(self.cfg.onednn or self.device != "cpu"):
                    rows = self._generate(
                        pipe,
                        embeds,
                        negative,
                        generator=generator,
                        steps=steps,
                        guidance=guidance,
                        sizes=sizes,
                        progress=self._progress_kwargs(pipe, callback),
                    )
                    check = self.cfg.safety_checker if safety_checker is None else bool(safety_checker)
                    unsafe = self._unsafe_rows(rows) if check else []
                if unsafe:
                    raise ContentWithheld(self.modality, unsafe)
            finally:
                if self.cfg.offload:
                    self.to_cpu()

        if per_row:
            return [self._write(row, sizes, {"seed": s, "steps": steps, "guidance": guidance}) for row, s in zip(rows, seeds)]
        meta = {"seed": seed, "steps": steps, "guidance": guidance}
        return [self._write(row, sizes, meta) for row in rows]

    def _resolve_sizes(self, sizes: dict[str, Any]) -> dict[str, Any]:
        return sizes

    def _unsafe_rows(self, rows) -> list[int]:
        """Indices of the rendered rows the pipeline's safety checker flags (none: no checker)."""
        return []

    def _generate(self, pipe, embeds, negative, *, generator, steps, guidance, sizes, progress) -> list:
        raise NotImplementedError

    def _write(self, row, sizes: dict[str, Any], meta: dict[str, Any]) -> MediaOutput:
        raise NotImplementedError

    @staticmethod
    def _progress_kwargs(pipe, callback: ProgressCallback | None) -> dict[str, Any]:
        """Pipeline keywords that report each denoising step to `callback(step, total)`.

        StableDiffusionPipeline takes `callback_on_step_end(pipe, i, t, kwargs)` (called every
        timestep); TextToVideoSDPipeline and AudioLDMPipeline (diffusers 0.42) only the legacy
        `callback(i, t, latents)` with `callback_steps`, called once per scheduler-order steps.
        """
        if callback is None:
            return {}
        params = inspect.signature(pipe.__call__).parameters
        done = [0]

        def total(order: int = 1) -> int:
            timesteps = getattr(pipe.scheduler, "timesteps", None)
            n = 0 if timesteps is None else len(timesteps)
            return max(-(-n // max(order, 1)), done[0])

        if "callback_on_step_end" in params:

            def on_step_end(_pipe, _i, _t, _kwargs):
                done[0] += 1
                callback(done[0], total())
                return {}

            return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": []}

        if "callback" in params:

            def legacy(_i, _t, _latents):
                done[0] += 1
                callback(done[0], total(getattr(pipe.scheduler, "order", 1)))

            return {"callback": legacy, "callback_steps": 1}

        return {}


# --------------------------------------------------------------------------------------------------
# helpers


def _as_tensor(x) -> "torch.Tensor":
    import torch

    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"prompt_embeds must be a tensor, got {type(x).__name__}") from e
    if not x.is_floating_point():
        raise ValueError(f"prompt_embeds must be a floating-point tensor, got {x.dtype}")
    return x.detach()


def _pad_tokens(neg: "torch.Tensor", q: int) -> "torch.Tensor":
    import torch

    return torch.cat([neg, neg[:, -1:].expand(-1, q - neg.shape[1], -1)], dim=1)


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _empty_cache(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    elif device == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def to_uint8(x) -> "Any":
    """Float array in [0, 1] → uint8 (as diffusers' numpy_to_pil: round(x·255))."""
    import numpy as np

    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)
