"""Checkpoints: convert the released NExT-GPT v0 `pytorch_model.pt`, load ours, apply it to a model.

Our on-disk format (`nextgpt-checkpoint/1`) is a directory:

- `nextgpt.safetensors`: `input_proj.{weight,bias}`, `output_projectors.{image,video,audio}.*`
  (the `OutputProjector` parameter names), and either the whole embedding matrices
  (`embed_tokens.weight`, `lm_head.weight`, [V, H]: what the official code trained) or only their
  38 new rows (`embed_tokens.new_rows`, `lm_head.new_rows`, [38, H]: the last 38 rows, in
  `nextgpt.tokens.NEW_TOKENS` order).
- `adapter/`: an ordinary peft LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`)
  for the LLM's q/k/v/o projections, loadable with `PeftModel.from_pretrained(llm, dst / "adapter")`.
- `meta.json`: `{"format": "nextgpt-checkpoint/1", "source", "llm_hidden", "vocab_size",
  "num_layers", "lora_rank", "encoder_dim", "projectors": {modality: ProjectorConfig dict}, ...}`.

The official loader uses `load_state_dict(strict=False)`, so a mismatched checkpoint (for example a
32042-row vocabulary from another Vicuna, NExT-GPT issue #47) loads silently and produces noise.
Here every step is strict: a missing, unexpected or mis-shaped key is a `CheckpointError` that lists
them all, and nothing is written or modified before validation has passed.

The released file is read with `torch.load(weights_only=True)` only: a file that needs full
unpickling (arbitrary Python objects, i.e. arbitrary code) is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from nextgpt.config import ProjectorConfig
from nextgpt.tokens import NEW_TOKENS

FORMAT = "nextgpt-checkpoint/1"
OFFICIAL_FILE = "pytorch_model.pt"
WEIGHTS_FILE = "nextgpt.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
META_FILE = "meta.json"

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_LORA_RANK = 32  # the official stage-3 rank; only used to describe a file without any LoRA key

# official key prefix -> our modality name
OFFICIAL_PROJECTOR_PREFIX = {
    "image": "gen_text_hidden_fcs.0.",
    "video": "gen_text_hidden_fcs_video.0.",
    "audio": "gen_text_hidden_fcs_audio.0.",
}
OFFICIAL_INPUT_PREFIX = "llama_proj."
OFFICIAL_LLM_PREFIX = "llama_model."  # the official PeftModel attribute; the rest is peft's naming
OFFICIAL_EMBED = "llama_model.base_model.model.model.embed_tokens.weight"
OFFICIAL_LM_HEAD = "llama_model.base_model.model.lm_head.weight"
OFFICIAL_LAYER = "llama_model.base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.weight"

_MAX_LISTED = 20  # per group in an error message
_DEFAULT_SEGMENT = re.compile(r"\.(lora_[AB])\.default\.weight$")
_LORA_A = re.compile(r"\.lora_A\.weight$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names every offending key.

    `missing`, `unexpected` and `mismatched` ("key: expected (a, b), got (c, d)") hold the full
    lists (the message shows at most 20 of each group).
    """

    def __init__(
        self,
        message: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
        other: Iterable[str] = (),
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        self.other = sorted(other)
        parts = [message]
        for title, items in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("mis-shaped keys", self.mismatched),
            ("other problems", self.other),
        ):
            if items:
                parts.append(_format_group(title, items))
        super().__init__("\n".join(parts))

    @property
    def has_problems(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched or self.other)


def _format_group(title: str, items: list[str]) -> str:
    lines = [f"{title} ({len(items)}):"]
    lines += [f"  {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        lines.append(f"  ... and {len(items) - _MAX_LISTED} more")
    return "\n".join(lines)


def _shape(s: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in s) + ")"


def _mismatch(key: str, expected: Iterable[int], got: Iterable[int]) -> str:
    return f"{key}: expected {_shape(expected)}, got {_shape(got)}"


# --------------------------------------------------------------------------------------------------
# the official layout


def _llm_dims(llm_config) -> dict[str, int]:
    cfg = llm_config.get_text_config() if hasattr(llm_config, "get_text_config") else llm_config
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    return {
        "hidden": hidden,
        "layers": int(cfg.num_hidden_layers),
        "vocab": int(cfg.vocab_size),
        "q_out": heads * head_dim,
        "kv_out": kv_heads * head_dim,
    }


def _projector_shapes(hidden: int, cfg: ProjectorConfig) -> dict[str, tuple[int, ...]]:
    from nextgpt.projectors import OutputProjector

    with torch.device("meta"):
        proj = OutputProjector(hidden, cfg)
    return {k: tuple(v.shape) for k, v in proj.state_dict().items()}


def official_layout(
    llm_config,
    encoder_dim: int,
    projectors: Mapping[str, ProjectorConfig],
    *,
    lora_rank: int = DEFAULT_LORA_RANK,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released `pytorch_model.pt` for this LLM / encoder / projector setup.

    `llm_config` is a transformers config (hidden_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, vocab_size), or the dims dict `describe_official` reads from a file. Its `vocab_size` must be the RESIZED vocabulary,
    i.e. the number of embedding rows in the file: base vocab + 38 new tokens (32000 + 38 = 32038
    for Vicuna-7B v0). A stock Vicuna `config.json` says 32000: set `vocab_size` to
    `len(tokenizer)` after adding `nextgpt.tokens.NEW_TOKENS` before calling this.

    LoRA keys use the `lora_A.weight` / `lora_B.weight` spelling (no `.default.` segment);
    `lora_rank` is usually inferred from the file (`convert_official` does that).
    """
    d = dict(llm_config) if isinstance(llm_config, Mapping) else _llm_dims(llm_config)
    hidden, r = d["hidden"], int(lora_rank)
    layout: dict[str, tuple[int, ...]] = {
        OFFICIAL_INPUT_PREFIX + "weight": (hidden, int(encoder_dim)),
        OFFICIAL_INPUT_PREFIX + "bias": (hidden,),
    }
    for modality, prefix in OFFICIAL_PROJECTOR_PREFIX.items():
        if modality not in projectors:
            raise CheckpointError(f"no projector config for modality {modality!r}")
        for k, s in _projector_shapes(hidden, projectors[modality]).items():
            layout[prefix + k] = s
    layout[OFFICIAL_EMBED] = (d["vocab"], hidden)
    layout[OFFICIAL_LM_HEAD] = (d["vocab"], hidden)
    in_out = {
        "q_proj": (hidden, d["q_out"]),
        "k_proj": (hidden, d["kv_out"]),
        "v_proj": (hidden, d["kv_out"]),
        "o_proj": (d["q_out"], hidden),
    }
    for i in range(d["layers"]):
        for proj, (n_in, n_out) in in_out.items():
            layout[OFFICIAL_LAYER.format(i=i, proj=proj, ab="A")] = (r, n_in)
            layout[OFFICIAL_LAYER.format(i=i, proj=proj, ab="B")] = (n_out, r)
    return layout


# --------------------------------------------------------------------------------------------------
# reading the official file


def read_official(src: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of a released `pytorch_model.pt` (a file, or a directory holding one).

    Loaded with `torch.load(weights_only=True)` on CPU; a top-level `{"state_dict": ...}` or
    `{"module": ...}` wrapper is removed. Key names are returned as stored (see `normalise_keys`).
    """
    path = Path(src).expanduser()
    if path.is_dir():
        path = path / OFFICIAL_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to load: the file holds Python objects other than tensors and plain "
            f"containers, which would need full (unsafe, code-executing) unpickling; only "
            f"weights_only loading is allowed ({_unpickling_reason(e)})"
        ) from None
    except Exception as e:  # corrupt / truncated / not a torch file
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {type(e).__name__}: {e}") from None
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "module") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    bad = [f"{k}: not a tensor ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, Tensor)]
    bad += [f"{k!r}: key is not a string" for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: not a plain state dict", other=bad)
    return dict(obj)


def _unpickling_reason(e: Exception) -> str:
    """The informative line of torch's weights_only error (e.g. "Unsupported global: GLOBAL x.Y ...")."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    for ln in lines:
        if "WeightsUnpickler error:" in ln:
            return ln.split("WeightsUnpickler error:", 1)[1].split(" was not an allowed global")[0].strip()
    return next((ln for ln in lines if ln), type(e).__name__)


def normalise_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`...lora_A.default.weight` -> `...lora_A.weight` (peft's adapter-name segment), same for B.

    Two keys that normalise to the same name are an error.
    """
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    dupes = []
    for k, v in state_dict.items():
        nk = _DEFAULT_SEGMENT.sub(r".\1.weight", k)
        if nk in out:
            dupes.append(f"{origin[nk]} and {k} both name {nk}")
            continue
        out[nk] = v
        origin[nk] = k
    if dupes:
        raise CheckpointError("duplicate keys (with and without the '.default.' segment)", other=dupes)
    return out


def infer_lora_rank(state_dict: Mapping[str, Tensor]) -> int | None:
    """The LoRA rank r shared by every `lora_A.weight` [r, in]; None when there is no LoRA key."""
    ranks = {k: int(v.shape[0]) for k, v in state_dict.items() if _LORA_A.search(k) and v.dim() >= 1}
    if not ranks:
        return None
    counts = Counter(ranks.values())
    if len(counts) == 1:
        return next(iter(counts))
    majority = counts.most_common(1)[0][0]
    summary = ", ".join(f"r={r}: {n} keys" for r, n in sorted(counts.items()))
    raise CheckpointError(
        f"inconsistent LoRA ranks ({summary}); every lora_A must have the same rank",
        other=[f"{k}: rank {r} (most keys have {majority})" for k, r in ranks.items() if r != majority],
    )


def _validate(
    state_dict: Mapping[str, Tensor], layout: Mapping[str, tuple[int, ...]], what: str, hint: str = ""
) -> None:
    missing = [k for k in layout if k not in state_dict]
    unexpected = [k for k in state_dict if k not in layout]
    mismatched = [
        _mismatch(k, s, state_dict[k].shape) for k, s in layout.items() if k in state_dict and tuple(state_dict[k].shape) != s
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            what + (f"\n{hint}" if hint else ""), missing=missing, unexpected=unexpected, mismatched=mismatched
        )


def _vocab_hint(state_dict: Mapping[str, Tensor], vocab: int) -> str:
    t = state_dict.get(OFFICIAL_EMBED)
    if t is None or t.dim() != 2 or t.shape[0] == vocab:
        return ""
    rows = int(t.shape[0])
    return (
        f"note: the file's vocabulary has {rows} rows but llm_config.vocab_size is {vocab}. vocab_size must "
        f"be the resized vocabulary (base vocab + {len(NEW_TOKENS)} new tokens); a different row count "
        f"(e.g. 32042 vs 32038) means the checkpoint was made with another tokenizer."
    )


def describe_official(state_dict: Mapping[str, Tensor]) -> dict:
    """What a file in the official layout says about the model it was made for, read from its
    shapes alone (`nextgpt convert --check`): `llm` dims (as `_llm_dims`; None where a key is
    missing), `encoder_dim`, `lora_rank`, per-modality projector sizes, dtypes, and the keys that
    belong to no known group. Raises nothing for an odd file: what cannot be read is None."""
    sd = normalise_keys(state_dict)

    def shape(key: str, dim: int) -> int | None:
        t = sd.get(key)
        return int(t.shape[dim]) if t is not None and t.dim() > dim else None

    layers = {int(m.group(1)) for k in sd if (m := re.match(r"llama_model\.base_model\.model\.model\.layers\.(\d+)\.", k))}
    try:
        rank = infer_lora_rank(sd)
    except CheckpointError:
        rank = None
    projectors = {}
    for modality, prefix in OFFICIAL_PROJECTOR_PREFIX.items():
        keys = [k for k in sd if k.startswith(prefix)]
        if not keys:
            continue

        def count(stack: str) -> int:  # transformer layers: tfm.encoder.layers.{i}.* / tfm.decoder.layers.{i}.*
            return len({m.group(1) for k in keys if (m := re.match(re.escape(prefix) + rf"tfm\.{stack}\.layers\.(\d+)\.", k))})

        projectors[modality] = {
            "llm_hidden": shape(prefix + "fc.weight", 1),
            "d_model": shape(prefix + "fc.weight", 0),
            "num_queries": shape(prefix + "query_embs", 1),
            "out_dim": shape(prefix + "model.weight", 0),
            "num_encoder_layers": count("encoder"),
            "num_decoder_layers": count("decoder"),
            "dim_feedforward": shape(prefix + "tfm.encoder.layers.0.linear1.weight", 0),
            "keys": len(keys),
        }
    known = [OFFICIAL_INPUT_PREFIX, *OFFICIAL_PROJECTOR_PREFIX.values()]
    other = [k for k in sd if not k.startswith(tuple(known)) and k not in (OFFICIAL_EMBED, OFFICIAL_LM_HEAD)
             and not (k.startswith(OFFICIAL_LLM_PREFIX) and ".lora_" in k)]  # fmt: skip
    return {
        "tensors": len(sd),
        "parameters": sum(t.numel() for t in sd.values()),
        "bytes": sum(t.numel() * t.element_size() for t in sd.values()),
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in sd.values())),
        "encoder_dim": shape(OFFICIAL_INPUT_PREFIX + "weight", 1),
        "llm": {
            "hidden": shape(OFFICIAL_INPUT_PREFIX + "weight", 0),
            "layers": len(layers) or None,
            "vocab": shape(OFFICIAL_EMBED, 0),
            "q_out": shape(OFFICIAL_LAYER.format(i=0, proj="q_proj", ab="B"), 0),  # lora_B: [out, r]
            "kv_out": shape(OFFICIAL_LAYER.format(i=0, proj="k_proj", ab="B"), 0),
        },
        "lora_rank": rank,
        "lora_keys": sum(1 for k in sd if ".lora_" in k),
        "projectors": projectors,
        "other_keys": sorted(other),
    }


# --------------------------------------------------------------------------------------------------
# converting


def _to_ours(key: str) -> str:
    if key.startswith(OFFICIAL_INPUT_PREFIX):
        return "input_proj." + key[len(OFFICIAL_INPUT_PREFIX) :]
    for modality, prefix in OFFICIAL_PROJECTOR_PREFIX.items():
        if key.startswith(prefix):
            return f"output_projectors.{modality}." + key[len(prefix) :]
    if key == OFFICIAL_EMBED:
        return "embed_tokens.weight"
    if key == OFFICIAL_LM_HEAD:
        return "lm_head.weight"
    raise KeyError(key)


def _storable(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors with no shared storage (what safetensors needs); dtype unchanged."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        out[k] = t
    return out


def _check_dst(dst: Path, overwrite: bool) -> None:
    if not dst.exists() and not dst.is_symlink():
        return
    empty_dir = dst.is_dir() and not any(dst.iterdir())
    if not empty_dir and not overwrite:
        raise CheckpointError(f"{dst} already exists and is not empty; pass overwrite=True to replace it")


def _replace(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move the finished temp dir into place (same filesystem: a rename)."""
    _check_dst(dst, overwrite)
    old = None
    if dst.exists() or dst.is_symlink():
        if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
            dst.rmdir()
        else:
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dst, old)
    os.rename(tmp, dst)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def convert_official(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    llm_config,
    encoder_dim: int,
    projectors: Mapping[str, ProjectorConfig],
    lora_alpha: float = 32,
    lora_dropout: float = 0.1,
    *,
    overwrite: bool = False,
) -> Path:
    """Convert the released NExT-GPT v0 `pytorch_model.pt` into our checkpoint directory `dst`.

    The file is validated strictly against `official_layout` (with the LoRA rank inferred from the
    file); any missing, unexpected or mis-shaped key raises `CheckpointError` listing them all, and
    then nothing is written. `llm_config.vocab_size` must be the resized vocab (see
    `official_layout`). The directory is written to a temp dir beside `dst` and renamed into place;
    an existing non-empty `dst` is replaced only with `overwrite=True`. Returns `dst`.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    dst = Path(dst).expanduser()
    _check_dst(dst, overwrite)

    raw = read_official(src)
    sd = normalise_keys(raw)
    rank = infer_lora_rank(sd)
    layout = official_layout(llm_config, encoder_dim, projectors, lora_rank=rank or DEFAULT_LORA_RANK)
    dims = _llm_dims(llm_config)
    _validate(
        sd,
        layout,
        f"{src}: does not match the official NExT-GPT v0 layout (llm hidden {dims['hidden']}, "
        f"{dims['layers']} layers, vocab {dims['vocab']}, encoder dim {encoder_dim}, LoRA rank "
        f"{rank if rank is not None else 'unknown: no lora_A key'})",
        _vocab_hint(sd, dims["vocab"]),
    )
    assert rank is not None  # the layout has LoRA keys for every layer, so validation found them

    ours, adapter = {}, {}
    for k, t in sd.items():
        if k.startswith(OFFICIAL_LLM_PREFIX) and ".lora_" in k:
            adapter[k[len(OFFICIAL_LLM_PREFIX) :]] = t  # peft's on-disk name: base_model.model.model.layers...
        else:
            ours[_to_ours(k)] = t
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()})
    meta = {
        "format": FORMAT,
        "source": "official-v0",
        "llm_hidden": dims["hidden"],
        "vocab_size": dims["vocab"],
        "num_layers": dims["layers"],
        "lora_rank": rank,
        "lora_alpha": lora_alpha,
        "encoder_dim": int(encoder_dim),
        "projectors": {m: projectors[m].model_dump() for m in OFFICIAL_PROJECTOR_PREFIX},
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
    }
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
        bias="none",
    )

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        save_file(_storable(ours), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / ADAPTER_DIR).mkdir()
        lora_config.save_pretrained(str(tmp / ADAPTER_DIR))
        save_file(_storable(adapter), str(tmp / ADAPTER_DIR / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _replace(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# --------------------------------------------------------------------------------------------------
# loading and applying


@dataclass
class Checkpoint:
    tensors: dict[str, Tensor]
    adapter_dir: Path | None = None
    meta: dict = field(default_factory=dict)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a `nextgpt-checkpoint/1` directory (as written by `convert_official` or training)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {root}")
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{root}: no {META_FILE}; not a nextgpt checkpoint (convert one with `nextgpt convert`)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON: {e}") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise CheckpointError(f"{meta_path}: format is {fmt!r}, expected {FORMAT!r}")
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{root}: {WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot read: {e}") from None
    adapter_dir = root / ADAPTER_DIR
    if adapter_dir.exists():
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (adapter_dir / name).is_file():
                raise CheckpointError(f"{adapter_dir}: {name} is missing")
    else:
        adapter_dir = None
    return Checkpoint(tensors=tensors, adapter_dir=adapter_dir, meta=meta)


def _check_module(prefix: str, module: nn.Module, tensors: Mapping[str, Tensor], err: dict[str, list]) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for k, s in expected.items():
        if k not in tensors:
            err["missing"].append(prefix + k)
        elif tuple(tensors[k].shape) != s:
            err["mismatched"].append(_mismatch(prefix + k, s, tensors[k].shape))
    err["unexpected"] += [prefix + k for k in tensors if k not in expected]


def _strict_load(module: nn.Module, tensors: Mapping[str, Tensor], what: str) -> None:
    try:
        module.load_state_dict(dict(tensors), strict=True)
    except RuntimeError as e:  # pre-validated, so only reachable through something unusual
        raise CheckpointError(f"cannot load {what}: {e}") from None


def _lora_targets_of(llm: nn.Module, target_modules) -> list[str] | None:
    if isinstance(target_modules, str):  # a regex: leave matching to peft
        return None
    targets = tuple(target_modules or ())
    return [n for n, m in llm.named_modules() if n and any(n == t or n.endswith("." + t) for t in targets)]


def _check_adapter(adapter_dir: Path, llm: nn.Module, err: dict[str, list]) -> None:
    """Every adapter key names a LoRA A/B of a module the LLM has, with the right shape; no target left out."""
    from safetensors import safe_open

    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    r = int(cfg.get("r", 0))
    prefix = "base_model.model."
    where = f"{ADAPTER_DIR}/"
    seen: dict[str, set[str]] = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            m = re.fullmatch(re.escape(prefix) + r"(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
            module = None
            if m:
                try:
                    module = llm.get_submodule(m.group(1))
                except AttributeError:
                    module = None
            if module is None or not hasattr(module, "in_features"):
                err["unexpected"].append(where + key)
                continue
            seen.setdefault(m.group(1), set()).add(m.group(2))
            if cfg.get("rank_pattern"):
                continue
            want = (r, module.in_features) if m.group(2) == "lora_A" else (module.out_features, r)
            got = tuple(f.get_slice(key).get_shape())
            if got != want:
                err["mismatched"].append(_mismatch(where + key, want, got))
    targets = _lora_targets_of(llm, cfg.get("target_modules"))
    for name in targets or []:
        for ab in ("lora_A", "lora_B"):
            if ab not in seen.get(name, ()):
                err["missing"].append(f"{where}{prefix}{name}.{ab}.weight")


def _untie(llm: nn.Module, out_emb: nn.Module) -> None:
    """Give the output embedding its own Parameter and stop transformers from re-tying it."""
    name = next((n for n, m in llm.named_modules() if m is out_emb), None)
    old = out_emb.weight
    out_emb.weight = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
    configs = [getattr(llm, "config", None)]
    if configs[0] is not None and hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    for c in configs:
        if c is not None and getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    tied = getattr(llm, "all_tied_weights_keys", None)
    if isinstance(tied, dict) and name is not None:
        tied.pop(f"{name}.weight", None)


def apply_checkpoint(ckpt: Checkpoint, *, input_proj: nn.Module, output_projectors: nn.ModuleDict, llm):
    """Load `ckpt` into the projectors and the LLM; returns the LLM (a new object if LoRA was merged).

    - `input_proj.*` and `output_projectors.<modality>.*` are loaded strictly.
    - `embed_tokens.weight` / `lm_head.weight` ([V, H]) replace the LLM's input / output embedding
      matrices (shapes must match exactly); `embed_tokens.new_rows` / `lm_head.new_rows` ([38, H])
      replace only their last 38 rows. Tied embeddings that the checkpoint gives different values
      are untied first.
    - `ckpt.adapter_dir` (a peft LoRA adapter) is applied with `PeftModel.from_pretrained` and
      merged (`merge_and_unload()`); the merged model is returned.

    Everything is validated before anything is modified; problems raise `CheckpointError`.
    """
    err: dict[str, list] = {"missing": [], "unexpected": [], "mismatched": [], "other": []}
    groups: dict[str, dict[str, Tensor]] = {"input_proj.": {}, "output_projectors.": {}}
    emb: dict[str, Tensor] = {}
    emb_keys = ("embed_tokens.weight", "embed_tokens.new_rows", "lm_head.weight", "lm_head.new_rows")
    for k, t in ckpt.tensors.items():
        g = next((p for p in groups if k.startswith(p)), None)
        if g is not None:
            groups[g][k[len(g) :]] = t
        elif k in emb_keys:
            emb[k] = t
        else:
            err["unexpected"].append(k)
    _check_module("input_proj.", input_proj, groups["input_proj."], err)
    _check_module("output_projectors.", output_projectors, groups["output_projectors."], err)

    in_emb = llm.get_input_embeddings()
    out_emb = llm.get_output_embeddings()
    n_new = len(NEW_TOKENS)
    plan: dict[str, tuple[str, Tensor]] = {}  # "embed_tokens" | "lm_head" -> ("weight" | "new_rows", tensor)
    for side, module in (("embed_tokens", in_emb), ("lm_head", out_emb)):
        full, rows = emb.get(f"{side}.weight"), emb.get(f"{side}.new_rows")
        if full is None and rows is None:
            continue
        if module is None or not isinstance(getattr(module, "weight", None), Tensor):
            err["other"].append(f"{side}: the LLM has no {'input' if side == 'embed_tokens' else 'output'} embedding to load it into")
            continue
        if full is not None and rows is not None:
            err["other"].append(f"{side}: both {side}.weight and {side}.new_rows are present; keep one")
            continue
        shape = tuple(module.weight.shape)
        if full is not None:
            if tuple(full.shape) != shape:
                err["mismatched"].append(_mismatch(f"{side}.weight", shape, full.shape))
            plan[side] = ("weight", full)
        else:
            want = (n_new, shape[1])
            if tuple(rows.shape) != want or shape[0] < n_new:
                err["mismatched"].append(_mismatch(f"{side}.new_rows", want, rows.shape))
            plan[side] = ("new_rows", rows)
    if ckpt.adapter_dir is not None:
        from peft import PeftModel

        if isinstance(llm, PeftModel):
            err["other"].append("the LLM already carries a peft adapter; pass the base model")
        else:
            _check_adapter(Path(ckpt.adapter_dir), llm, err)
    if any(err.values()):
        raise CheckpointError("checkpoint does not fit the model", **err)

    _strict_load(input_proj, groups["input_proj."], "input_proj")
    _strict_load(output_projectors, groups["output_projectors."], "output_projectors")

    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    if tied and "embed_tokens" in plan and "lm_head" in plan:
        (ka, a), (kb, b) = plan["embed_tokens"], plan["lm_head"]
        if ka != kb or not torch.equal(a, b):
            _untie(llm, out_emb)
    with torch.no_grad():
        for side, module in (("embed_tokens", in_emb), ("lm_head", out_emb)):
            if side not in plan:
                continue
            kind, t = plan[side]
            w = module.weight
            if kind == "weight":
                w.copy_(t)
            else:
                w[-n_new:].copy_(t)

    if ckpt.adapter_dir is None:
        return llm
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(llm, str(ckpt.adapter_dir))
    for w in caught:
        if "missing adapter keys" in str(w.message):
            raise CheckpointError(f"{ckpt.adapter_dir}: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model.merge_and_unload()
