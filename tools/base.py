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
import logging
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
log = logging.getLogger(__name__)
# one pipeline loads at a time, whatever the tool: diffusers resolves its classes through lazy modules that
# another thread's import can leave half-made (a chat's loader warming the image tool while a reply loaded
# the video one: "module 'diffusers' has no attribute 'TextToVideoSDPipeline'"). Taken inside a tool's lock.
_LOADING = threading.Lock()


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
    with open(tmp, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
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


class _TracedUNet:
    """A UNet's forward run through TorchScript graphs, one per input signature (`DecoderConfig.trace`).

    A tiny UNet on a CPU spends most of a step in Python: module calls, diffusers' argument plumbing (the
    small image decoder's 16 steps: 0.62 s eager vs 0.37 s traced, byte-identical pictures). `torch.jit.trace`
    records the aten calls of one forward; the graph then runs them without Python. A signature is the
    shapes and dtypes of the sample, the timestep and the tensor keywords given, so a graph only ever runs
    on inputs shaped like the ones it was traced on (the UNet's shape-dependent branches stay right).
    Anything else (gradients on, a non-tensor keyword, a non-CPU tensor, a trace that fails, more than
    `limit` signatures) runs the eager forward. Installed on the instance (`unet.forward`) by
    `DecoderTool.warm`; `remove()` puts the class's forward back.

    torch.jit.trace is deprecated in favour of torch.compile / torch.export; on this UNet inductor compiled
    for 108 s and ran 0.56 s, and torch.export's graph ran at eager speed (docs/performance.md, session 20).
    """

    def __init__(self, unet, limit: int = 8):
        self.unet = unet
        self.limit = limit
        self.graphs: dict[tuple, tuple | None] = {}  # signature -> (graph, output class), or None: eager
        unet.forward = self

    def remove(self) -> None:
        if self.unet.__dict__.get("forward") is self:
            del self.unet.forward

    def eager(self, *args, **kwargs):
        return type(self.unet).forward(self.unet, *args, **kwargs)

    def __call__(self, sample, timestep, *args, return_dict: bool = True, **kwargs):
        import torch

        given = {k: v for k, v in kwargs.items() if v is not None}
        plain = (
            not args and not torch.is_grad_enabled() and torch.is_tensor(timestep)
            and all(torch.is_tensor(v) for v in given.values())
            and all(x.device.type == "cpu" for x in (sample, timestep, *given.values()))
        )
        if not plain:
            return self.eager(sample, timestep, *args, return_dict=return_dict, **kwargs)
        names = tuple(sorted(given))
        nones = tuple(sorted(set(kwargs) - set(given)))  # passed as None (some are required parameters)
        inputs = (sample, timestep, *(given[k] for k in names))
        key = (names, nones, tuple((tuple(x.shape), x.dtype) for x in inputs))
        if key not in self.graphs:
            self.graphs[key] = self._trace(names, nones, inputs) if len(self.graphs) < self.limit else None
        if self.graphs[key] is None:
            return self.eager(sample, timestep, return_dict=return_dict, **kwargs)
        graph, output = self.graphs[key]
        with torch.jit.optimized_execution(False):  # no profiling runs: the first call is as fast as the next
            out = graph(*inputs)
        return output(sample=out) if return_dict else (out,)

    def _trace(self, names: tuple[str, ...], nones: tuple[str, ...], inputs: tuple) -> tuple | None:
        import torch

        tool, output = self, []  # the UNet's output class, seen by the one forward the trace runs

        class Forward(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.unet = tool.unet  # a submodule, so the graph reads its parameters instead of copying them

            def forward(self, sample, timestep, *tensors):
                out = tool.eager(sample, timestep, return_dict=True, **dict.fromkeys(nones), **dict(zip(names, tensors)))
                output.append(type(out))
                return out.sample

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the deprecation notice and TracerWarnings about baked-in shapes
                graph = torch.jit.trace(Forward().eval(), inputs, check_trace=False)
            return graph, output[0]
        except Exception:  # e.g. a torch without torch.jit, or an untraceable UNet: that signature runs eager
            log.debug("tracing the UNet failed; it runs eager", exc_info=True)
            return None


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
            with _LOADING:
                pipe = self._from_pretrained(dtype)
            # an offloading tool waits on the CPU until its first call
            pipe.to("cpu" if self.cfg.offload else device)
            self._loaded(pipe)
            self.device, self.dtype = device, dtype
            self._pipe = pipe
            self.offloaded = bool(self.cfg.offload)
            self.load_count += 1
            return pipe

    def _from_pretrained(self, dtype):
        """The configured pipeline from disk or the hub (the toy one built first for `tiny`)."""
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
            embeds = self._check_embeds(prompt_embeds)
            if per_row and len(seeds) != embeds.shape[0]:
                raise ValueError(f"{len(seeds)} seeds for {embeds.shape[0]} rows of prompt_embeds; give one seed per row")
            if per_row:
                generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            else:
                generator = torch.Generator("cpu").manual_seed(seed)
            check = self.cfg.safety_checker if safety_checker is None else bool(safety_checker)
            rows = self._render(embeds, generator, steps=steps, guidance=guidance, sizes=sizes, callback=callback, check=check)

        if per_row:
            return [self._write(row, sizes, {"seed": s, "steps": steps, "guidance": guidance}) for row, s in zip(rows, seeds)]
        meta = {"seed": seed, "steps": steps, "guidance": guidance}
        return [self._write(row, sizes, meta) for row in rows]

    def _render(self, embeds, generator, *, steps: int, guidance: float, sizes: dict[str, Any], callback=None,
                check: bool = False) -> list:
        """One pipeline call on the tool's device: the rows, before they are written. Under the tool's lock."""
        import torch

        pipe = self.load()
        self.to_device()
        try:
            embeds = embeds.to(device=self.device, dtype=self.dtype)
            negative = self._negative_for(embeds) if guidance > 1 else None
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
                unsafe = self._unsafe_rows(rows) if check else []
            if unsafe:
                raise ContentWithheld(self.modality, unsafe)
            return rows
        finally:
            if self.cfg.offload:
                self.to_cpu()

    def warm(self, queries: int | None = None) -> None:
        """Ready a `trace` tool for a run of calls (the chat, `nextgpt serve` and the Discord bot call it once,
        in the background): loads the pipeline and, on a CPU, installs the traced UNet (`_TracedUNet`) and
        renders one throwaway step at the configured size from `queries` zero tokens (the output projector's
        count; ignored by decoders that take one vector), so the usual signature is traced before the first
        request. Nothing is written. Without `trace` it does nothing: the pipeline loads on first use, as
        before (a 7B profile's three decoders are not all put on the GPU at start). A one-off `nextgpt ask`
        never warms, so it never pays a trace."""
        import torch

        if not self.cfg.trace:
            return
        with self._lock:
            pipe = self.load()
            if self.device != "cpu" or isinstance(pipe.unet.__dict__.get("forward"), _TracedUNet):
                return
            _TracedUNet(pipe.unet)
            q, d = self.expected_embeds_shape
            embeds = self._check_embeds(torch.zeros(1, q or queries or 1, d))
            sizes = self._resolve_sizes(self._sizes({}))
            self._render(embeds, torch.Generator("cpu").manual_seed(0), steps=1, guidance=float(self.cfg.guidance), sizes=sizes)

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
