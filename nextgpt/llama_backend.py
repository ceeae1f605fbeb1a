"""The llama.cpp LLM backend (`llm.backend: llama_cpp`): the same NExT-GPT turn, decoded by llama.cpp.

    first use:  the profile's GGUF + our checkpoint ──► cache_dir/llama_cpp/<name>-<key>/
                    model.gguf         the GGUF with the 38 new tokens appended (token_embd, output), the
                                       LoRA merged into attn_q/k/v/o and every layer matrix in F16 (the
                                       source's values; see `_encode_tensor`); norms copied byte for byte
                    parts.safetensors  fp32 input embeddings (base rows + new rows), the 38 new lm_head
                                       rows, the input projection and the output projectors
                    tokenizer/         the tokenizer with the 38 tokens
    every turn: prompt embeddings (media at their slots) ──llama_batch.embd──► llama.cpp
                each generated token ──► logits + last-layer hidden state (embeddings, pooling none)
                hidden state + the token's fp32 input embedding ──► output projector (as transformers)

The reference stays the transformers path: the merged LLM is loaded there once to build the GGUF (so
the new rows, untying and LoRA merge are exactly what that path does). The one generation loop,
`SignalLoop.generate` (nextgpt/loop.py: forced signal groups, `want`, stop strings, the repetition guard,
seeds, streaming, projection), runs on this backend too: this module supplies its LLM steps (`_prefill`,
`_feed`, `_cut`, `_full`, `_finish`) on llama.cpp, with prefix reuse of llama.cpp's own KV cache.

No torch for words: the prompt's token rows, the logits and the sampling are numpy; torch, ImageBind and
the projectors load on the first media input or signal group, or on `warm()`.

Faithfulness: every position is fed as an fp32 embedding (a token's row of our own matrix, as the
transformers path feeds `inputs_embeds`), so the new tokens' input rows are never quantised; the 38
new tokens' logits are recomputed in fp32 from the hidden state (the GGUF's output rows are Q8_0).
The build is keyed by the GGUF file, the checkpoint's content and the projector settings: retrained
weights rebuild it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from nextgpt.config import Profile
from nextgpt.loop import Run, Signal, SignalLoop
from nextgpt.tokens import MODALITIES, NEW_TOKENS

BUILD_VERSION = 3  # bump when the files written by `_build` change
MODEL_FILE, PARTS_FILE, TOKENIZER_DIR, META_FILE = "model.gguf", "parts.safetensors", "tokenizer", "meta.json"
MAX_CONTEXT = 4096  # llama.cpp context (KV cache) positions; the model's own limit when smaller


class BackendError(RuntimeError):
    """The llama.cpp backend cannot run this profile; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- building
def source_gguf(profile: Profile, cache_dir: Path) -> Path:
    from nextgpt.llm import resolve_source

    path, gguf_file = resolve_source(profile.llm, cache_dir)
    if not gguf_file:
        raise BackendError(f"llm.backend llama_cpp needs llm.source to be a GGUF file, got {profile.llm.source!r} "
                           "(convert a Hugging Face model with llama.cpp's convert_hf_to_gguf.py)")  # fmt: skip
    gguf = Path(path) / gguf_file
    if not gguf.is_file():
        raise BackendError(f"llm.source: GGUF file not found: {gguf}")
    return gguf


def _checkpoint_digest(path: str | None) -> str:
    """sha256 over every file of the checkpoint folder (names and bytes): retrained weights differ."""
    h = hashlib.sha256()
    if path:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise BackendError(f"checkpoint directory not found: {root}")
        for f in sorted(p for p in root.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(root).parts):
            h.update(str(f.relative_to(root)).encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def build_dir(profile: Profile, cache_dir: Path) -> Path:
    """Where the prepared files for this profile live (the key covers everything they depend on)."""
    gguf = source_gguf(profile, cache_dir)
    stat = gguf.stat()
    key = {
        "version": BUILD_VERSION,
        "gguf": [str(gguf.resolve()), stat.st_size, int(stat.st_mtime)],
        "checkpoint": _checkpoint_digest(profile.checkpoint),
        "projectors": {m: p.model_dump() for m, p in sorted(profile.projectors.items())},
        "encoder": [profile.encoder.source, profile.encoder.arch],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir / "llama_cpp" / f"{gguf.stem}-{digest}"


def prepare(profile: Profile, cache_dir: Path) -> Path:
    """The prepared folder for this profile, built on first use (one line on stderr says so)."""
    from nextgpt.llm import build_atomically

    out = build_dir(profile, cache_dir)
    if not (out / META_FILE).is_file():
        print(f"nextgpt: preparing the llama.cpp model once (new tokens, merged LoRA) into {out}", file=sys.stderr, flush=True)
        with quiet_libraries():
            build_atomically(out, lambda tmp: _build(profile, cache_dir, tmp))
    return out


@contextlib.contextmanager
def quiet_libraries():
    """No progress bars or warnings from transformers / huggingface_hub while building."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _build(profile: Profile, cache_dir: Path, tmp: Path) -> None:
    from safetensors.torch import save_file

    from nextgpt.model import NextGPT

    reference = profile.model_copy(deep=True)
    reference.llm.backend, reference.llm.device, reference.llm.dtype = "transformers", "cpu", "float32"
    reference.encoder.device = "cpu"
    model = NextGPT.from_profile(reference, cache_dir)  # the fp32 reference: checkpoint applied, LoRA merged
    llm = model.llm
    report = write_gguf(source_gguf(profile, cache_dir), llm, tmp / MODEL_FILE)
    parts = {
        "embed": llm.get_input_embeddings().weight,
        "lm_head_new": llm.get_output_embeddings().weight[-len(NEW_TOKENS):],
        **{f"input_proj.{k}": v for k, v in model.input_proj.state_dict().items()},
        **{f"output_projectors.{k}": v for k, v in model.output_projectors.state_dict().items()},
    }
    save_file({k: v.detach().float().contiguous().clone() for k, v in parts.items()}, str(tmp / PARTS_FILE))
    model.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    meta = {"version": BUILD_VERSION, "source": profile.llm.source, "checkpoint": profile.checkpoint,
            "encoder_dim": model.input_proj.in_features, "hidden": llm.config.get_text_config().hidden_size, **report}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Hugging Face q/k row order → llama.cpp's (as llama.cpp's convert_hf_to_gguf.py does)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode_tensor(src, target: np.ndarray) -> tuple[np.ndarray, object, str]:
    """(data, type, how) for one GGUF tensor given the reference model's fp32 values.

    The layers' matrices (`blk.*`, 2-D) are written in F16, whatever the source type: llama.cpp multiplies
    a block-quantised matrix (Q4_1, Q8_0, ...) with activations quantised to 8 bits in blocks of 32, and
    on the small profile that alone moved the signal states by ~3 % (simulated on the transformers path:
    the same 3 %) — which the image projector turns into cosine 0.88-0.92 vs fp32 on some prompts.
    An F16 matrix is multiplied with F16 activations: states within 0.1 %, projector cosine 1.000, and
    F16 (2 bytes a weight) holds the dequantised Q4_1 values to 11 bits. Other tensors: the source
    bytes when nothing changed; source bytes + new rows when only rows were appended (the vocabulary:
    block quantisation works row by row; these feed only the logits); else rewritten (F32)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    qtype = src.tensor_type
    if src.name.startswith("blk.") and target.ndim == 2:
        return quantize(np.ascontiguousarray(target), Q.F16), Q.F16, "copied" if qtype == Q.F16 and np.array_equal(
            dequantize(src.data, qtype).reshape(target.shape), target) else "F16"
    old = dequantize(src.data, qtype).reshape(-1, *target.shape[1:]) if target.ndim > 1 else dequantize(src.data, qtype).reshape(-1)
    if old.shape == target.shape and np.array_equal(old, target):
        return src.data, qtype, "copied"
    if target.ndim == 2 and old.shape[1:] == target.shape[1:] and target.shape[0] > old.shape[0] and np.array_equal(old, target[: old.shape[0]]):
        new = quantize(np.ascontiguousarray(target[old.shape[0]:]), qtype)
        return np.concatenate([np.asarray(src.data).reshape(old.shape[0], -1), new.reshape(target.shape[0] - old.shape[0], -1)]), qtype, "rows added"
    if qtype == Q.F16:
        return quantize(target, qtype), qtype, "rewritten"
    return quantize(np.ascontiguousarray(target), Q.F32), Q.F32, "rewritten"


def write_gguf(src: Path, llm, dst: Path) -> dict:
    """Write `llm` (a merged fp32 transformers model loaded from the GGUF `src`, vocabulary extended)
    as a GGUF: `src`'s metadata, the extended vocabulary, and each tensor per `_encode_tensor`."""
    import gguf

    reader = gguf.GGUFReader(src)
    field = lambda k: reader.get_field(k).contents() if reader.get_field(k) is not None else None  # noqa: E731
    arch = field("general.architecture")
    if arch not in ("llama",):
        raise BackendError(f"{src}: architecture {arch!r}; the llama.cpp backend writes LLaMA-family GGUFs only")
    n_blocks, n_head, n_head_kv = field(f"{arch}.block_count"), field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv")
    state = {k: v.detach().float().cpu().numpy() for k, v in llm.state_dict().items()}
    tmap = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_blocks)
    hf_name = {}
    for name in state:
        mapped = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped:
            hf_name[mapped] = name
    vocab = field("tokenizer.ggml.tokens")
    n_new = state[hf_name["token_embd.weight"]].shape[0] - len(vocab)
    if n_new != len(NEW_TOKENS):
        raise BackendError(f"{src}: the model has {len(vocab) + n_new} embedding rows for {len(vocab)} GGUF tokens + {len(NEW_TOKENS)} new")

    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    if (alignment := field("general.alignment")) is not None:
        writer.data_alignment = alignment
    extended = {
        "tokenizer.ggml.tokens": vocab + list(NEW_TOKENS),
        "tokenizer.ggml.token_type": field("tokenizer.ggml.token_type") + [int(gguf.TokenType.USER_DEFINED)] * n_new,
        "tokenizer.ggml.scores": (field("tokenizer.ggml.scores") or []) + [0.0] * n_new,
        f"{arch}.vocab_size": len(vocab) + n_new,
    }
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        if f.name == "tokenizer.ggml.scores" and field("tokenizer.ggml.scores") is None:
            continue
        kind = f.types[0]
        sub = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, extended.get(f.name, f.contents()), kind, sub_type=sub)

    report = {"copied": 0, "rows added": 0, "rewritten": 0, "F16": 0}
    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        if t.name not in hf_name:  # e.g. rope_freqs: not a model parameter
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            report["copied"] += 1
            continue
        target = state[hf_name[t.name]]
        if ".attn_q." in t.name:
            target = _permute(target, n_head, n_head)
        elif ".attn_k." in t.name:
            target = _permute(target, n_head, n_head_kv)
        data, qtype, how = _encode_tensor(t, target)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
        report[how] += 1
    head = hf_name.get("output.weight")
    if "output.weight" not in names and head is not None and not np.array_equal(state[head], state[hf_name["token_embd.weight"]]):
        # a tied model whose new output rows differ from its new input rows: untie, base rows as token_embd's
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        data, qtype, how = _encode_tensor(embd, state[head])
        writer.add_tensor("output.weight", data, raw_dtype=qtype)
        report["untied output.weight"] = how
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return report


# ---------------------------------------------------------------------------------------------- running
def _silence() -> None:
    """llama.cpp logs every load to stderr (and llama-cpp-python maps ggml's newer log levels one off,
    so its warnings pass as errors): none of it on the user's terminal; failures raise BackendError."""
    import logging

    from llama_cpp._logger import logger

    logger.setLevel(logging.CRITICAL)


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise BackendError("llm.backend llama_cpp needs llama-cpp-python: `make setup` installs it "
                           "(or: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' "
                           "pip install -e '.[llama]')") from None  # fmt: skip
    return llama_cpp


class LlamaContext:
    """One llama.cpp model + context (sequence 0) fed embeddings; remembers what its KV cache holds."""

    def __init__(self, gguf: Path, *, n_threads: int, n_ctx: int = MAX_CONTEXT, n_batch: int = 512, kv_unified: bool = False):
        lib = self.lib = import_llama_cpp()
        _silence()
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise BackendError(f"llama.cpp could not load {gguf}")
        self.n_embd = lib.llama_model_n_embd(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        n_ctx = min(n_ctx, lib.llama_model_n_ctx_train(self.model))  # positions per sequence
        cparams = lib.llama_context_default_params()
        cparams.n_seq_max = 2  # 0: the cached conversation; 1: scratch for calls without a PromptCache
        # one KV buffer per sequence: in a unified buffer the scratch sequence's cells, freed after each
        # uncached call, sat between the conversation's, and every later token attended over both
        cparams.kv_unified = self.kv_unified = kv_unified
        cparams.n_ctx = n_ctx if kv_unified else 2 * n_ctx
        cparams.n_batch = cparams.n_ubatch = self.n_batch = min(n_batch, n_ctx)
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.embeddings = True
        cparams.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        # flash attention off: on this CPU its kernel made every token cost more as the history grew (SmolLM2,
        # 2 threads, 60 → 950 positions: 19.0 → 28.8 ms a token with it, 20.9 → 25.9 without; docs/performance.md)
        cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise BackendError(f"llama.cpp could not create a context for {gguf}")
        self.n_ctx = lib.llama_n_ctx_seq(self.ctx)
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.n_batch, self.n_embd, 1)
        self.embd = np.ctypeslib.as_array(self.batch.embd, shape=(self.n_batch, self.n_embd))
        for i in range(self.n_batch):
            self.batch.n_seq_id[i] = 1
        self.embeddings_on = True
        self.seq = 0
        self.keys_of: dict[int, list] = {0: [], 1: []}  # per sequence: one key per position it holds

    @property
    def keys(self) -> list:
        return self.keys_of[self.seq]

    def use(self, seq: int) -> None:
        """Work on sequence `seq` (0 keeps a conversation's prefix; 1 is scratch)."""
        self.seq = seq

    def __del__(self):
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        with contextlib.suppress(Exception):
            lib.llama_batch_free(self.batch)
            lib.llama_free(self.ctx)
            lib.llama_model_free(self.model)

    def keep(self, n: int) -> None:
        """Keep the first `n` positions of the KV cache, drop the rest."""
        self.lib.llama_memory_seq_rm(self.memory, self.seq, n, -1)
        del self.keys[n:]

    def _set_embeddings(self, on: bool) -> None:
        if self.embeddings_on != on:  # off for a prefill: else every position is an output (~20% slower)
            self.lib.llama_set_embeddings(self.ctx, on)
            self.embeddings_on = on

    def _decode(self, rows: np.ndarray, pos: int, outputs: str) -> None:
        """One llama_decode of `rows` at positions pos, pos+1, …; `outputs`: "none", "last" (the last
        position's logits / state) or "all"."""
        n = len(rows)
        self.embd[:n] = rows
        b = self.batch
        b.n_tokens = n
        for i in range(n):
            b.pos[i] = pos + i
            b.seq_id[i][0] = self.seq
            b.logits[i] = int(outputs == "all")
        b.logits[n - 1] = int(outputs != "none")
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise BackendError(f"llama_decode failed ({rc}) at position {pos} of {self.n_ctx}")

    def _decode_all(self, rows: np.ndarray, outputs: str):
        """Feed `rows` (T, H) after what the cache holds, n_batch at a time; yields (offset, length) of each
        chunk once decoded (its outputs are readable until the next chunk)."""
        start = len(self.keys)
        for i in range(0, len(rows), self.n_batch):
            chunk = rows[i : i + self.n_batch]
            self._decode(chunk, start + i, outputs)
            yield i, len(chunk)

    def prefill(self, rows: np.ndarray, keys: list) -> None:
        """Feed `rows` (T, H) after what the cache holds, no outputs (the last position goes by `step`)."""
        self._set_embeddings(False)
        for _ in self._decode_all(rows, "none"):
            pass
        self.keys.extend(keys)

    def states(self, rows: np.ndarray, keys: list) -> np.ndarray:
        """Feed `rows` (T, H) after what the cache holds; the last-layer hidden state at each, (T, H)."""
        self._set_embeddings(True)
        out = np.empty((len(rows), self.n_embd), dtype=np.float32)
        for i, n in self._decode_all(rows, "all"):
            for j in range(n):
                out[i + j] = np.ctypeslib.as_array(self.lib.llama_get_embeddings_ith(self.ctx, j), shape=(self.n_embd,))
        self.keys.extend(keys)
        return out

    def last_logits(self) -> np.ndarray:
        """The logits of the last position the last feed output, a copy."""
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()

    def step(self, row: np.ndarray, key) -> tuple[np.ndarray, np.ndarray]:
        """Feed one position; (logits, last-layer hidden state), both copies."""
        self._set_embeddings(True)
        self._decode(row[None], len(self.keys), "last")
        self.keys.append(key)
        hidden = np.ctypeslib.as_array(self.lib.llama_get_embeddings_ith(self.ctx, 0), shape=(self.n_embd,)).copy()
        return self.last_logits(), hidden


def load_tokenizer(folder: Path):
    """The prepared tokenizer. A plain `tokenizer.json` one (SmolLM2's: "TokenizersBackend") is read by
    `nextgpt.tokenizer.Tokenizer`, on the `tokenizers` library alone: importing transformers would cost
    ~0.7-1.3 s of every chat start; any other class goes through transformers' AutoTokenizer."""
    cls = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        from nextgpt.tokenizer import Tokenizer

        return Tokenizer(folder)
    from transformers import AutoTokenizer

    with quiet_libraries():
        return AutoTokenizer.from_pretrained(folder)


def physical_cores() -> int:
    """The physical cores this process may run on (hyper-threads of one core count once), torch's and
    llama.cpp's own default thread count; without torch, so that a chat start need not import it."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


class LlamaCppNextGPT(SignalLoop):
    """NExT-GPT with llama.cpp running the LLM (see the module docstring): `SignalLoop.generate` with the LLM
    steps below. Text needs no torch: the embedding rows and the new tokens' output rows are numpy arrays. The
    torch parts (ImageBind, the input projection, the output projectors) load on first use — a media input or
    a signal group — or when `warm()` is called (the chat calls it once the model is up, in the background)."""

    def __init__(self, context: "LlamaContext", tokenizer, parts: dict, folder: Path, profile: Profile, cache_dir: Path,
                 *, n_threads: int | None = None):  # fmt: skip
        self._setup(tokenizer, profile.llm.template, profile.llm.system_prompt)
        self.context = context
        self.folder, self.profile, self.cache_dir = folder, profile, cache_dir
        self.torch_threads = n_threads  # set on torch when it loads (None: torch's default)
        self.embed_rows = parts["embed"]  # fp32 input embeddings: the GGUF's rows dequantised + our 38 new rows
        self.lm_head_new = parts["lm_head_new"]  # the 38 new tokens' output rows, fp32
        self.new_ids = np.arange(self.embed_rows.shape[0] - len(NEW_TOKENS), self.embed_rows.shape[0])
        self._parts = None
        self._parts_lock = threading.Lock()

    @classmethod
    def from_profile(cls, profile: Profile, cache_dir: Path, *, n_threads: int | None = None) -> "LlamaCppNextGPT":
        from safetensors import safe_open

        from nextgpt.llm import add_nextgpt_tokens

        import_llama_cpp()  # a missing install is named before any preparing
        folder = prepare(profile, cache_dir)
        # llama.cpp maps the GGUF and builds its context in C, without the GIL: on a second thread, beside
        # the Python parts below (~0.3 s of a chat start)
        loading = ThreadPoolExecutor(1, thread_name_prefix="nextgpt-llama-load")
        pending = loading.submit(LlamaContext, folder / MODEL_FILE, n_threads=n_threads or physical_cores())
        loading.shutdown(wait=False)
        with safe_open(str(folder / PARTS_FILE), "np") as f:  # the torch parts' weights load with them (_torch_parts)
            parts = {k: f.get_tensor(k) for k in ("embed", "lm_head_new")}
        tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
        add_nextgpt_tokens(tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(pending.result(), tokenizer, parts, folder, profile, cache_dir, n_threads=n_threads)

    # ------------------------------------------------------------------ the torch parts, loaded on first use
    def _torch_parts(self) -> tuple:
        with self._parts_lock:  # the chat's loader thread may be loading them while a reply asks
            if self._parts is None:
                import torch
                from safetensors import safe_open
                from torch import nn

                from nextgpt.devices import resolve
                from nextgpt.encoder import MediaEncoder
                from nextgpt.projectors import InputProjection, OutputProjector

                if self.torch_threads:
                    torch.set_num_threads(self.torch_threads)
                meta = json.loads((self.folder / META_FILE).read_text())
                with safe_open(str(self.folder / PARTS_FILE), "pt") as f:  # not the 100 MB embedding matrix again
                    parts = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("input_proj.", "output_projectors."))}
                enc_device, enc_dtype = resolve(self.profile.encoder.device, self.profile.encoder.dtype)
                encoder = MediaEncoder(self.profile.encoder, self.cache_dir, enc_device, enc_dtype)
                input_proj = InputProjection(meta["encoder_dim"], meta["hidden"])
                input_proj.load_state_dict({k[len("input_proj."):]: v for k, v in parts.items() if k.startswith("input_proj.")})
                projectors = nn.ModuleDict({m: OutputProjector(meta["hidden"], self.profile.projectors[m]) for m in MODALITIES})
                projectors.load_state_dict({k[len("output_projectors."):]: v for k, v in parts.items() if k.startswith("output_projectors.")})
                input_proj.eval().requires_grad_(False)
                projectors.eval().requires_grad_(False)
                self._parts = (encoder, input_proj, projectors)
        return self._parts

    def warm(self) -> None:
        self._torch_parts()

    @property
    def encoder(self):
        return self._torch_parts()[0]

    @property
    def input_proj(self):
        return self._torch_parts()[1]

    @property
    def output_projectors(self):
        return self._torch_parts()[2]

    # ------------------------------------------------------------------ inputs and projection
    def _token_rows(self, ids: list[int]) -> np.ndarray:
        return self.embed_rows[ids]

    def encode_media(self, items) -> np.ndarray:
        import torch

        from nextgpt.model import project_media

        with torch.inference_mode():
            return project_media(self.encoder, self.input_proj, items).float().numpy()

    def _cat(self, pieces: list) -> np.ndarray:
        return np.concatenate(pieces)

    def _max_positions(self) -> int:
        return self.context.n_ctx

    def _project(self, modality: str, states: list, position: int) -> Signal:
        import torch

        projector = self.output_projectors[modality]
        group = torch.from_numpy(np.stack(states))[None]
        with torch.inference_mode():
            return Signal(modality, projector(group), position, group)

    # SignalLoop.generate's loop (sampling, forced signal groups, `want`, stop strings, the repetition guard,
    # streaming, projection) runs as it is; these are its LLM steps on llama.cpp. With a PromptCache,
    # llama.cpp's KV cache (sequence 0) keeps its longest prefix shared with the prompt; without one the
    # prompt is decoded from scratch in sequence 1, as the transformers path does, and freed afterwards.
    def _prefill(self, inputs: np.ndarray, keys: list, cache) -> tuple[np.ndarray, Run]:
        ctx = self.context
        rows = np.asarray(inputs[0], dtype=np.float32)
        reused = 0
        # an uncached call leaves the cached conversation alone: it runs in the scratch sequence, reusing the
        # prefix it shares with the last uncached call (side reads share the system prompt)
        ctx.use(0 if cache is not None else 1)
        for a, b in zip(ctx.keys, keys):
            if a != b:
                break
            reused += 1
        reused = min(reused, len(keys) - 1)  # the next token's logits come from the last fed position
        ctx.keep(reused)
        if len(keys) - reused > 1:
            ctx.prefill(rows[reused:-1], keys[reused:-1])
        logits, hidden = ctx.step(rows[-1], keys[-1])  # the last position with its hidden state: exact new-token logits
        return self._exact_new_logits(logits, hidden), Run(reused)

    def _check_room(self, n: int) -> None:
        if len(self.context.keys) + n > self.context.n_ctx:
            raise BackendError(f"the reply ran past llama.cpp's context of {self.context.n_ctx} positions")

    def _feed(self, run: Run, tokens: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        self._check_room(len(tokens))
        rows = self.embed_rows[tokens]
        hiddens = self.context.states(rows, tokens)  # one token, or a whole signal group in one pass
        logits = self._exact_new_logits(self.context.last_logits(), hiddens[-1])
        return logits, list(hiddens + rows)

    def _cut(self, run: Run, length: int) -> None:
        self.context.keep(length)

    def _full(self, run: Run) -> bool:
        return len(self.context.keys) >= self.context.n_ctx

    def _finish(self, run: Run, cache, keys: list) -> None:
        if cache is not None:  # llama.cpp's KV cache holds the prompt and every token fed since
            cache.store(None, keys)
        elif self.context.kv_unified:  # free the scratch sequence's cells, which would sit among the conversation's
            self.context.keep(0)
        # else the scratch sequence keeps what it holds, in its own KV buffer, for the next uncached call's prefix

    def _side_cache(self) -> None:
        return None  # side reads go to the scratch sequence, which reuses its prefix itself

    def _exact_new_logits(self, logits: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """The 38 new tokens' logits in fp32 from the hidden state (the GGUF holds their rows quantised)."""
        logits[self.new_ids] = self.lm_head_new @ hidden
        return logits
