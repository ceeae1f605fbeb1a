"""The released checkpoint gets what it was trained on: the prompt's token ids and the audio output.

Prompt: the official training code (NExT-GPT-Lagacy/code, `prompt_wrap` in
model/anyToImageVideoAudio.py and `build_one_instance_stage_3` in model/common/utils.py) puts one
BOS first, then tokenizes these pieces one by one with transformers 4.29's LlamaTokenizer:

    media in the turn:   "### Human: <Img>"  [media embedding]  "</Img> " + q + "\\n### Assistant: "
    text only:           "### Human: "  q + "\\n### Assistant: "
    a reply:             a + signal tokens (' '-joined) + "\\n###"
    a later user turn:   "Human: " + q + "\\n### Assistant: "

4.29 split each piece at the added tokens, stripped the whitespace on both sides of them, and
sentencepiece-encoded each part on its own (each gets its own leading "▁"). The expected ids below
are written down from that logic, token by token, on a LLaMA-style tokenizer (byte fallback,
"▁" word prefix) built here with a few whole-word pieces.
"""

import pytest
import torch
from torch import nn

from nextgpt import templates
from nextgpt.llm import add_nextgpt_tokens
from nextgpt.model import MediaInput, Message

MEDIA = "<media>"  # where the media embedding goes (between <Img> and </Img>)
WORDS = ["▁###", "▁Human", "▁Assistant", "▁what", "▁is", "▁this", "▁Sure", "▁again", "▁hi", "▁here"]


@pytest.fixture(scope="module")
def tok():
    """A LLaMA tokenizer (transformers' LlamaTokenizer: BPE, byte fallback, "▁" prefix) with whole-word
    pieces for the words used here, and "##" but no "###" (so "\\n###" is <0x0A> ## #, as LLaMA's)."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    merges = []
    for w in WORDS:
        for ch in w:
            vocab.setdefault(ch, len(vocab))
        for i in range(2, len(w) + 1):
            if w[:i] not in vocab:
                vocab[w[:i]] = len(vocab)
                merges.append((w[: i - 1], w[i - 1]))
    for ch in ":?":
        vocab.setdefault(ch, len(vocab))
    vocab["##"] = len(vocab)
    merges.append(("#", "#"))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    add_nextgpt_tokens(tokenizer)
    return tokenizer


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def without_media(expected):
    return [t for t in expected if t != MEDIA]


IMG = ["[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]"]
ASSISTANT = ["<0x0A>", "##", "#", "▁Assistant", ":", "▁"]  # "\n### Assistant: "


def test_first_turn_with_media(tok):
    msgs = [Message("user", "what is this?", [MediaInput("image", embedding=torch.zeros(4))])]
    expected = (["<s>", "▁###", "▁Human", ":", "<Img>", MEDIA, "</Img>"]  # "### Human: <Img>" → no "▁" before <Img>
                + ["▁what", "▁is", "▁this", "?"] + ASSISTANT)  # "</Img> what..." → no "▁" token after </Img>  # fmt: skip
    assert tokens(tok, templates.encode("vicuna_v0", tok, msgs)) == without_media(expected)
    # the naive way (the whole prompt text through today's tokenizer) would differ: that is the bug fixed
    naive = tok(templates.render("vicuna_v0", tok, msgs))["input_ids"]
    assert tokens(tok, naive) != without_media(expected)


def test_text_only_turn_then_reply_with_signals_then_a_later_turn(tok):
    msgs = [Message("user", "hi"), Message("assistant", "Sure" + "".join(IMG)), Message("user", "again")]
    expected = (
        ["<s>", "▁###", "▁Human", ":", "▁"]  # "### Human: " on its own: the trailing space is a token
        + ["▁hi"] + ASSISTANT  # "hi\n### Assistant: ": its own "▁" prefix, so ": ▁ ▁hi" as trained
        + ["▁Sure"] + IMG + ["▁###"]  # "Sure[IMG0] [IMG1] [IMG2] [IMG3]\n###": the newline after [IMG3] stripped
        + ["▁Human", ":", "▁again"] + ASSISTANT  # "Human: again\n### Assistant: "
    )  # fmt: skip
    assert tokens(tok, templates.encode("vicuna_v0", tok, msgs)) == expected
    # the official reply joins the signal tokens with spaces; stripped, they give the same ids as ours
    official_reply = templates.tokenize_segment(tok, "Sure" + " ".join(IMG) + "\n###")
    assert official_reply == templates.tokenize_segment(tok, "Sure" + "".join(IMG) + "\n###")


def test_text_reply_ends_with_a_newline_stop(tok):
    msgs = [Message("user", "hi"), Message("assistant", "Sure"), Message("user", "what is this?")]
    ids = templates.encode("vicuna_v0", tok, msgs)
    assert tokens(tok, ids) == (["<s>", "▁###", "▁Human", ":", "▁", "▁hi"] + ASSISTANT + ["▁Sure", "<0x0A>", "##", "#"]
                                + ["▁Human", ":", "▁what", "▁is", "▁this", "?"] + ASSISTANT)  # fmt: skip


def test_training_examples_have_the_same_ids(tok, tmp_path):
    """training.trainer.encode renders dialogs with the same pieces: the context is the prompt above,
    the trained reply `{reply}{signals}\\n###` is `▁Sure [IMG0..3] ▁###`."""
    from training.trainer.data import Dialog, Output, Turn
    from training.trainer.encode import IGNORE, DialogEncoder

    img = tmp_path / "x.png"
    dialog = Dialog([Turn("user", "what is this?", media=[("image", img)]),
                     Turn("assistant", "Sure", outputs=[Output("image", "a red circle")])])  # fmt: skip
    ex = DialogEncoder(tok, "vicuna_v0").encode(dialog)
    context = ["<s>", "▁###", "▁Human", ":", "<Img>", MEDIA, "</Img>", "▁what", "▁is", "▁this", "?"] + ASSISTANT
    reply = ["▁Sure"] + IMG + ["▁###"]
    got = tokens(tok, ex.input_ids)
    (pos, _, _), = ex.media
    got[pos] = MEDIA  # the placeholder the media embedding replaces
    assert got == context + reply
    assert ex.labels == [IGNORE] * len(context) + ex.input_ids[len(context) :]
    # and what generate() is given for the same history is that context, to the token
    prompt = templates.encode("vicuna_v0", tok, [Message("user", "what is this?", [MediaInput("image", path=img)])])
    assert tokens(tok, prompt) == without_media(context)


# ------------------------------------------------------------------------------------------ audio


def test_nextgpt_7b_audio_output_goes_to_audioldm_unnormalised(tmp_path):
    """The nextgpt-7b profile's audio projector, loaded from a converted checkpoint, gives the (1, 512)
    CLAP-sized vector the official inference hands AudioLDM as it is (`gen_emb.view(bs, 512)`)."""
    import transformers

    from nextgpt.checkpoint import apply_checkpoint, convert_official, load_checkpoint
    from nextgpt.config import ProjectorConfig, load_settings
    from nextgpt.projectors import InputProjection, OutputProjector
    from nextgpt.tokens import NEW_TOKENS

    profile = load_settings().profile("nextgpt-7b")
    audio = profile.projectors["audio"]
    assert not audio.normalize and audio.num_queries == 1 and audio.out_dim == 512
    assert profile.decoders["audio"].seconds == 9.0  # the official demo's default length
    small = ProjectorConfig(num_queries=2, out_dim=8, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                            dim_feedforward=16)  # fmt: skip
    cfgs = {"image": small, "video": small, "audio": audio}
    hidden, enc, vocab = 32, 16, 50 + len(NEW_TOKENS)
    torch.manual_seed(0)
    sd = {f"llama_proj.{k}": v for k, v in nn.Linear(enc, hidden).state_dict().items()}
    prefix = {"image": "gen_text_hidden_fcs.0.", "video": "gen_text_hidden_fcs_video.0.", "audio": "gen_text_hidden_fcs_audio.0."}
    reference = {}
    for m, cfg in cfgs.items():
        reference[m] = OutputProjector(hidden, cfg).eval()
        sd.update({prefix[m] + k: v.half() for k, v in reference[m].state_dict().items()})  # the release is fp16
    sd["llama_model.base_model.model.model.embed_tokens.weight"] = torch.randn(vocab, hidden).half()
    sd["llama_model.base_model.model.lm_head.weight"] = torch.randn(vocab, hidden).half()
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        sd[f"llama_model.base_model.model.model.layers.0.self_attn.{p}.lora_A.weight"] = torch.zeros(4, hidden).half()
        sd[f"llama_model.base_model.model.model.layers.0.self_attn.{p}.lora_B.weight"] = torch.zeros(hidden, 4).half()
    src = tmp_path / "pytorch_model.pt"
    torch.save(sd, src)
    llm_cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=4, vocab_size=vocab)  # fmt: skip
    convert_official(src, tmp_path / "ours", llm_cfg, enc, cfgs)
    ours = nn.ModuleDict({m: OutputProjector(hidden, c) for m, c in cfgs.items()})
    apply_checkpoint(load_checkpoint(tmp_path / "ours"), input_proj=InputProjection(enc, hidden), output_projectors=ours,
                     llm=transformers.LlamaForCausalLM(llm_cfg))  # fmt: skip
    states = torch.randn(1, 8, hidden)  # the 8 [AUD] states
    with torch.no_grad():
        got = ours["audio"].float().eval()(states)
        reference["audio"].load_state_dict({k: v.half().float() for k, v in reference["audio"].state_dict().items()})
        want = reference["audio"](states)
    assert got.shape == (1, 1, 512)
    assert got.view(1, 512).shape == (1, 512)  # what AudioTool takes, as gen_emb.view(bs, 512)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)  # unchanged: no normalisation anywhere
    assert abs(float(got.norm()) - 1.0) > 1e-2
