"""Our checkpoint → the released NExT-GPT v0 `pytorch_model.pt` layout (the inverse of
`nextgpt.checkpoint.convert_official`), so that a model trained here loads in the official code.

- `input_proj.*` → `llama_proj.*`; `output_projectors.<m>.*` → `gen_text_hidden_fcs[_video|_audio].0.*`
- the whole embedding and lm_head matrices (the official file holds them whole): the base LLM's
  matrices with our 38 trained rows written into their last rows
- LoRA → `llama_model.base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`.
  The official code hard-codes r=32, α=32 in its config and `convert_official` assumes α=32, so
  lora_B is rescaled by α/32 when our adapter used another α (the merged weights are unchanged).
  Projections the adapter did not target get zero LoRA tensors (a no-op); a checkpoint without an
  adapter (stages 1–2) gets zero LoRA tensors of rank `lora_rank` (default 32) everywhere, since
  the official layout always has them. Targets other than q/k/v/o cannot be represented: error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from nextgpt.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_LORA_RANK,
    LORA_TARGETS,
    OFFICIAL_EMBED,
    OFFICIAL_FILE,
    OFFICIAL_INPUT_PREFIX,
    OFFICIAL_LAYER,
    OFFICIAL_LM_HEAD,
    OFFICIAL_PROJECTOR_PREFIX,
    CheckpointError,
    load_checkpoint,
    official_layout,
)
from nextgpt.tokens import NEW_TOKENS

OFFICIAL_LORA_ALPHA = 32.0
_ADAPTER_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w+)\.(lora_[AB])(?:\.default)?\.weight")


def _full_matrix(side: str, module, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    w = module.weight.detach().to("cpu").clone()
    if f"{side}.weight" in tensors:
        full = tensors[f"{side}.weight"]
        if tuple(full.shape) != tuple(w.shape):
            raise CheckpointError(f"{side}.weight: the checkpoint's {tuple(full.shape)} does not match the LLM's {tuple(w.shape)}")
        return full.to(w.dtype).clone()
    if f"{side}.new_rows" in tensors:
        rows = tensors[f"{side}.new_rows"]
        if tuple(rows.shape) != (len(NEW_TOKENS), w.shape[1]):
            raise CheckpointError(f"{side}.new_rows: expected ({len(NEW_TOKENS)}, {w.shape[1]}), got {tuple(rows.shape)}")
        w[-len(NEW_TOKENS):] = rows.to(w.dtype)
    return w


def official_state_dict(src: str | os.PathLike, llm, *, lora_rank: int | None = None) -> dict[str, torch.Tensor]:
    """The official-layout state dict of checkpoint `src`, over the base (resized) `llm`."""
    from safetensors.torch import load_file

    ckpt = load_checkpoint(src)
    t = ckpt.tensors
    out: dict[str, torch.Tensor] = {}
    for k, v in t.items():
        if k.startswith("input_proj."):
            out[OFFICIAL_INPUT_PREFIX + k[len("input_proj."):]] = v
        elif k.startswith("output_projectors."):
            m, rest = k[len("output_projectors."):].split(".", 1)
            if m not in OFFICIAL_PROJECTOR_PREFIX:
                raise CheckpointError(f"{k}: unknown modality {m!r}")
            out[OFFICIAL_PROJECTOR_PREFIX[m] + rest] = v
        elif k.split(".")[0] not in ("embed_tokens", "lm_head"):
            raise CheckpointError(f"{k}: no place for this key in the official layout")
    in_emb, out_emb = llm.get_input_embeddings(), llm.get_output_embeddings()
    out[OFFICIAL_EMBED] = _full_matrix("embed_tokens", in_emb, t)
    if out_emb is None:
        raise CheckpointError("the LLM has no output embedding (lm_head)")
    head_tensors = t if any(k.startswith("lm_head.") for k in t) else {
        k.replace("embed_tokens.", "lm_head."): v for k, v in t.items() if k.startswith("embed_tokens.")  # tied
    }
    out[OFFICIAL_LM_HEAD] = _full_matrix("lm_head", out_emb, head_tensors)

    cfg = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    layers = int(cfg.num_hidden_layers)
    lora: dict[tuple[int, str, str], torch.Tensor] = {}
    scale = 1.0
    rank = lora_rank
    if ckpt.adapter_dir is not None:
        acfg = json.loads((ckpt.adapter_dir / ADAPTER_CONFIG).read_text())
        if acfg.get("rank_pattern") or acfg.get("alpha_pattern") or acfg.get("use_rslora") or acfg.get("use_dora"):
            raise CheckpointError(f"{ckpt.adapter_dir}: rank/alpha patterns, rsLoRA and DoRA have no official equivalent")
        rank = int(acfg["r"])
        scale = float(acfg.get("lora_alpha", OFFICIAL_LORA_ALPHA)) / OFFICIAL_LORA_ALPHA
        bad = []
        for k, v in load_file(str(ckpt.adapter_dir / ADAPTER_WEIGHTS)).items():
            m = _ADAPTER_KEY.fullmatch(k)
            if not m or m.group(2) not in LORA_TARGETS or int(m.group(1)) >= layers:
                bad.append(k)
                continue
            lora[(int(m.group(1)), m.group(2), m.group(3))] = v
        if bad:
            raise CheckpointError(
                "the official layout holds LoRA on self_attn q/k/v/o_proj only", unexpected=bad
            )
    rank = int(rank or DEFAULT_LORA_RANK)
    for i in range(layers):
        attn = llm.get_submodule(f"model.layers.{i}.self_attn")
        for proj in LORA_TARGETS:
            lin = getattr(attn, proj)
            a = lora.get((i, proj, "lora_A"))
            b = lora.get((i, proj, "lora_B"))
            if a is None or b is None:
                a = torch.zeros(rank, lin.in_features)
                b = torch.zeros(lin.out_features, rank)
            elif scale != 1.0:
                b = b * scale
            out[OFFICIAL_LAYER.format(i=i, proj=proj, ab="A")] = a
            out[OFFICIAL_LAYER.format(i=i, proj=proj, ab="B")] = b
    return out


def export_official(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    llm,
    *,
    tokenizer=None,
    projectors: Mapping | None = None,
    lora_rank: int | None = None,
    dtype: torch.dtype | None = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write `dst/pytorch_model.pt` (+ the tokenizer files when `tokenizer` is given).

    `llm`: the base LLM with the 38 tokens added (`nextgpt.llm.load_llm`), without the checkpoint
    applied; `projectors` (the profile's ProjectorConfigs) enables a strict check of the result
    against `official_layout`; `dtype` None keeps each tensor's dtype (official: float16).
    """
    state = official_state_dict(src, llm, lora_rank=lora_rank)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    if projectors is not None:
        import copy

        cfg = copy.deepcopy(llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config)
        cfg.vocab_size = int(state[OFFICIAL_EMBED].shape[0])
        rank = int(state[OFFICIAL_LAYER.format(i=0, proj="q_proj", ab="A")].shape[0])
        layout = official_layout(cfg, int(state[OFFICIAL_INPUT_PREFIX + "weight"].shape[1]), projectors, lora_rank=rank)
        missing = [k for k in layout if k not in state]
        unexpected = [k for k in state if k not in layout]
        mismatched = [f"{k}: expected {layout[k]}, got {tuple(state[k].shape)}" for k in layout if k in state and tuple(state[k].shape) != layout[k]]
        if missing or unexpected or mismatched:
            raise CheckpointError("export does not match the official layout", missing=missing, unexpected=unexpected, mismatched=mismatched)
    dst = Path(dst).expanduser()
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"{dst} already exists and is not empty; pass overwrite=True to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        torch.save(state, tmp / OFFICIAL_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst / OFFICIAL_FILE
