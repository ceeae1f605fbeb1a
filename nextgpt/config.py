"""Configuration: `config.yaml` holds named profiles; pydantic validates every key and value.

A profile names every component of the stack (LLM, encoder, projectors, decoders) by a hub id,
a local path, or `tiny` (built at toy size from a config, saved with `save_pretrained` under the
cache dir and loaded back through the same `from_pretrained` path as the real stack).

This module imports no torch, so that `nextgpt --help` and the memory commands stay fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nextgpt.tokens import MODALITIES

Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["float32", "float16", "bfloat16"]
ModalityName = Literal["image", "video", "audio"]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class LLMConfig(_Strict):
    source: str = Field(description="hub id, local directory, GGUF file's directory, or 'tiny'")
    gguf_file: str | None = Field(None, description="GGUF file name inside `source` (transformers gguf_file=)")
    revision: str | None = None
    template: Literal["vicuna_v0", "chat"] = "vicuna_v0"
    system_prompt: str | None = None
    device: Device = "auto"
    dtype: DType = "float32"
    backend: Literal["transformers", "llama_cpp", "auto"] = Field(
        "transformers", description="who runs the LLM: transformers, llama.cpp on a GGUF source (nextgpt/llama_backend.py), "
        "or auto: llama.cpp for a GGUF source on a CPU where llama-cpp-python is installed, else transformers")

    @property
    def is_gguf(self) -> bool:
        """The source is a GGUF file (`source: x.gguf`, or a folder + `gguf_file`)."""
        return self.source.endswith(".gguf") or bool(self.gguf_file)

    def resolved_backend(self) -> Literal["transformers", "llama_cpp"]:
        """Who runs this LLM (`backend_choice` without its reason)."""
        return self.backend_choice()[0]

    def backend_choice(self) -> tuple[Literal["transformers", "llama_cpp"], str]:
        """(who runs this LLM, why). `auto`: llama.cpp when the source is a GGUF, the LLM runs on a CPU
        (device cpu, or auto without a CUDA/MPS GPU) and llama-cpp-python is installed; transformers
        otherwise (a GPU runs the transformers path; without the package there is nothing else)."""
        if self.backend != "auto":
            return self.backend, "set in the profile"
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            return "transformers", "auto: llama-cpp-python is not installed (`make setup` builds it)"
        if not self.is_gguf:
            return "transformers", "auto: the source is not a GGUF file"
        if self.device not in ("cpu", "auto"):
            return "transformers", f"auto: the LLM runs on {self.device}"
        if self.device == "auto" and _torch_may_see_a_gpu():
            import torch

            mps = getattr(torch.backends, "mps", None)
            if torch.cuda.is_available() or (mps is not None and mps.is_available()):
                return "transformers", "auto: the LLM runs on a GPU"
        return "llama_cpp", "auto: a GGUF source on the CPU, llama-cpp-python installed"


def _torch_may_see_a_gpu() -> bool:
    """False when the installed torch is a CPU-only build (no CUDA / ROCm library beside libtorch, not macOS,
    where MPS is built in): then `auto` needs no torch import (~2-3 s) to know there is no GPU."""
    import importlib.util

    if sys.platform == "darwin":
        return True
    spec = importlib.util.find_spec("torch")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(any((Path(p) / "lib").glob(f"libtorch_{gpu}*")) for p in spec.submodule_search_locations for gpu in ("cuda", "hip"))


class EncoderConfig(_Strict):
    source: str = Field(description="'imagebind_huge' (official weights), a .pth/.safetensors file, or 'tiny'")
    arch: dict = Field(default_factory=dict, description="ImageBindModel keyword arguments for a non-huge encoder")
    device: Device = "auto"
    dtype: DType = "float32"
    video_clips: int = Field(5, ge=1)
    audio_clips: int = Field(3, ge=1)
    clip_seconds: float = Field(2.0, gt=0)


class ProjectorConfig(_Strict):
    """The official transformer output projector ("TextFcLayer"); N comes from the modality."""

    num_queries: int = Field(ge=1)
    out_dim: int = Field(ge=1)
    d_model: int = Field(512, ge=1)
    num_heads: int = Field(4, ge=1)
    num_encoder_layers: int = Field(4, ge=1)
    num_decoder_layers: int = Field(4, ge=1)
    dim_feedforward: int = Field(2048, ge=1)
    norm_first: bool = Field(True, description="pre-norm transformer layers, as the official layer (model/layers.py:44)")
    normalize: bool = Field(False, description="L2-normalise the output (the official code does not)")


class DecoderConfig(_Strict):
    source: str = Field(description="diffusers pipeline hub id, local directory, or 'tiny'")
    revision: str | None = None
    device: Device = "auto"
    dtype: DType = "float32"
    steps: int = Field(50, ge=1, le=500)
    guidance: float = Field(7.5, ge=0)
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    frames: int | None = Field(None, ge=1)
    fps: int = Field(8, ge=1)
    seconds: float | None = Field(None, gt=0)
    offload: bool = Field(False, description="move the pipeline to CPU between uses")
    onednn: bool = Field(
        True, description="on a CPU, run the pipeline's convolutions through oneDNN (PyTorch's default); false: PyTorch's "
        "native kernels, faster for tiny latents (the small image decoder's 16x16: 564 vs 695 ms a picture on 2 cores)")
    trace: bool = Field(
        False, description="on a CPU, once a long-running front end (chat, serve, Discord) has warmed the tool, run "
        "the UNet as TorchScript graphs traced per input shape (tools.base._TracedUNet): the same numbers without "
        "PyTorch's per-module Python, which dominates tiny UNets; ~1 s to trace at warm-up")
    safety_checker: bool = Field(
        True, description="run the pipeline's safety checker where it ships one (Stable Diffusion): a flagged image is "
        "withheld and the reply says so; pipelines without one (video, audio, tiny, small) need nothing")

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(246, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(0, ge=0, le=2**63 - 1)
    isolate_groups: bool | Literal["restated", "restated_all"] = Field(
        False, description="a reply's second and later signal groups take their states from the words since the previous "
        "group alone (true), or from those words re-read as a one-turn request of their own ('restated'; "
        "'restated_all': every group, the first too); see NextGPT.generate; off = the official way")

    def sampling(self, max_new_tokens: int | None = None) -> dict:
        """These settings as `NextGPT.generate` keywords (all but the seed, which a caller picks per reply)."""
        return dict(max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k, isolate_groups=self.isolate_groups)  # fmt: skip


class Profile(_Strict):
    description: str = ""
    llm: LLMConfig
    encoder: EncoderConfig
    projectors: dict[ModalityName, ProjectorConfig]
    decoders: dict[ModalityName, DecoderConfig]
    checkpoint: str | None = Field(None, description="directory written by `nextgpt convert` or training")
    generation: GenerationConfig = GenerationConfig()

    @field_validator("projectors", "decoders")
    @classmethod
    def _all_modalities(cls, v: dict) -> dict:
        missing = sorted(set(MODALITIES) - set(v))
        if missing:
            raise ValueError(f"missing modalities: {', '.join(missing)}")
        return v


class Settings(_Strict):
    default_profile: str
    cache_dir: str = "~/.cache/nextgpt"
    data_dir: str | None = Field(None, description="memory database and media; default: the XDG data dir")
    output_dir: str | None = Field(None, description="where `nextgpt ask` writes media; default: data_dir/outputs")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice)")
    profiles: dict[str, Profile]
    discord: dict = Field(default_factory=dict, description="`nextgpt discord` settings, validated by bots.discord.config")
    serve: dict = Field(default_factory=dict, description="`nextgpt serve` settings, validated by bots.serve.ServeConfig")
    source: Path | None = Field(None, exclude=True, description="the file these settings came from")

    def profile(self, name: str | None = None) -> Profile:
        name = name or os.environ.get("NEXTGPT_PROFILE") or self.default_profile
        if name not in self.profiles:
            raise ConfigError(f"unknown profile {name!r}; known profiles: {', '.join(self.profiles)}")
        return self.profiles[name]

    def profile_name(self, name: str | None = None) -> str:
        name = name or os.environ.get("NEXTGPT_PROFILE") or self.default_profile
        self.profile(name)
        return name

    @property
    def cache_path(self) -> Path:
        return Path(os.environ.get("NEXTGPT_CACHE") or self.cache_dir).expanduser()

    @property
    def data_path(self) -> Path:
        if os.environ.get("NEXTGPT_DATA"):
            return Path(os.environ["NEXTGPT_DATA"]).expanduser()
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        import platformdirs

        return Path(platformdirs.user_data_dir("nextgpt"))

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser() if self.output_dir else self.data_path / "outputs"


REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def config_path(path: str | os.PathLike | None = None) -> Path:
    """--config, then $NEXTGPT_CONFIG, then ./config.yaml, then the repository's config.yaml."""
    for candidate in (path, os.environ.get("NEXTGPT_CONFIG")):
        if candidate:
            p = Path(candidate).expanduser()
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            return p
    for p in (Path.cwd() / "config.yaml", REPO_CONFIG):
        if p.is_file():
            return p
    raise ConfigError("no config.yaml found: pass --config PATH or set NEXTGPT_CONFIG")


def _format_error(path: Path, err: ValidationError, prefix: str = "") -> str:
    """One line per problem, unknown keys first: a misspelt key (`defualt_profile`) is named, with
    the key it probably meant, instead of only "default_profile: Field required"."""
    import difflib

    errors = err.errors()
    missing = {tuple(e["loc"]) for e in errors if e["type"] == "missing"}
    meant = set()
    lines = []
    for e in sorted(errors, key=lambda e: e["type"] != "extra_forbidden"):
        loc = tuple(e["loc"])
        where = prefix + (".".join(str(x) for x in loc) or "(top level)")
        if e["type"] == "extra_forbidden":
            siblings = [str(m[-1]) for m in missing if m[:-1] == loc[:-1]]
            close = difflib.get_close_matches(str(loc[-1]), siblings, n=1) if loc else []
            if close:
                meant.add(loc[:-1] + (close[0],))
            lines.append(f"{path}: {where}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif loc not in meant:
            lines.append(f"{path}: {where}: {e['msg']}")
    return "\n".join(lines)


def _resolve_relative_paths(settings: Settings, base: Path) -> None:
    """Component sources and checkpoints written `./x` or `../x` are relative to the config file,
    so a profile can point at the repository's own weights/ whatever the current folder."""

    def fix(value: str | None) -> str | None:
        if value and value.startswith(("./", "../")):
            return str((base / value).resolve())
        return value

    for profile in settings.profiles.values():
        profile.llm.source = fix(profile.llm.source)
        profile.encoder.source = fix(profile.encoder.source)
        profile.checkpoint = fix(profile.checkpoint)
        for decoder in profile.decoders.values():
            decoder.source = fix(decoder.source)


def validate_section(settings: Settings, name: str, model: type[BaseModel]) -> BaseModel:
    """Validate a front end's own section of config.yaml (e.g. `discord:`) with its own schema."""
    try:
        return model.model_validate(getattr(settings, name) or {})
    except ValidationError as e:
        raise ConfigError(_format_error(settings.source or Path("config.yaml"), e, prefix=f"{name}.")) from None


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    p = config_path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    raw.pop("source", None)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(p, e)) from None
    settings.source = p
    _resolve_relative_paths(settings, p.parent)
    if settings.default_profile not in settings.profiles:
        raise ConfigError(f"{p}: default_profile: {settings.default_profile!r} is not one of the profiles")
    return settings
