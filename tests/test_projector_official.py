"""Our output projectors compute what the official NExT-GPT layer computes, compared by OUTPUTS.

The official layer ("TextFcLayer", transformer mode, `NExT-GPT-Lagacy/code/model/layers.py`) is
rebuilt here from its published definition — a few lines of torch, no official code needed at run
time. It gets random weights, they are saved in the released checkpoint's key layout, converted
with `nextgpt convert`'s function, loaded into our projectors, and both are run on the same hidden
states. Pre-norm and post-norm transformer layers have identical parameter names, so only this
comparison (not a strict load) proves the layer right.
"""

import pytest
import torch
from torch import nn

from nextgpt.checkpoint import apply_checkpoint, convert_official, load_checkpoint
from nextgpt.config import ProjectorConfig
from nextgpt.projectors import InputProjection, OutputProjector

transformers = pytest.importorskip("transformers")

HIDDEN, ENC, VOCAB_BASE = 64, 32, 100
PREFIX = {"image": "gen_text_hidden_fcs.0.", "video": "gen_text_hidden_fcs_video.0.", "audio": "gen_text_hidden_fcs_audio.0."}
# (signal tokens N, queries Q, output D) at test size; d_model etc. below
SIZES = {"image": (4, 7, 24), "video": (24, 7, 40), "audio": (8, 1, 16)}
D_MODEL, HEADS, LAYERS, FF = 32, 4, 2, 128


class OfficialTextFcLayer(nn.Module):
    """The official TextFcLayer in 'transformer' mode, as published (hidden_dim 512 there)."""

    def __init__(self, in_dim, out_dim, num_output_tokens, hidden_dim=D_MODEL, layers=LAYERS, ff=FF, nhead=HEADS):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden_dim)
        self.tfm = nn.Transformer(
            batch_first=True, norm_first=True, d_model=hidden_dim, num_encoder_layers=layers,
            num_decoder_layers=layers, dim_feedforward=ff, dropout=0.0, nhead=nhead,
        )
        self.model = nn.Linear(hidden_dim, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, hidden_dim))

    def forward(self, x, input_embs):
        x = x + input_embs
        x = self.fc(x)
        x = self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1))
        return self.model(x)


def _cfg(m, **kw):
    _, q, d = SIZES[m]
    return ProjectorConfig(num_queries=q, out_dim=d, d_model=D_MODEL, num_heads=HEADS, num_encoder_layers=LAYERS,
                           num_decoder_layers=LAYERS, dim_feedforward=FF, **kw)  # fmt: skip


def _official_checkpoint(tmp_path, layers):
    """A released-layout pytorch_model.pt holding the official layers' random weights (fp32)."""
    from nextgpt.tokens import NEW_TOKENS

    vocab = VOCAB_BASE + len(NEW_TOKENS)
    sd = {f"llama_proj.{k}": v for k, v in nn.Linear(ENC, HIDDEN).state_dict().items()}
    for m, layer in layers.items():
        sd.update({PREFIX[m] + k: v for k, v in layer.state_dict().items()})
    sd["llama_model.base_model.model.model.embed_tokens.weight"] = torch.randn(vocab, HIDDEN)
    sd["llama_model.base_model.model.lm_head.weight"] = torch.randn(vocab, HIDDEN)
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"llama_model.base_model.model.model.layers.{i}.self_attn.{p}.lora_A.weight"] = torch.randn(4, HIDDEN) * 0.1
            sd[f"llama_model.base_model.model.model.layers.{i}.self_attn.{p}.lora_B.weight"] = torch.randn(HIDDEN, 4) * 0.1
    src = tmp_path / "official" / "pytorch_model.pt"
    src.parent.mkdir()
    torch.save(sd, src)
    cfg = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=vocab)  # fmt: skip
    return src, cfg


def test_converted_projectors_match_the_official_layer(tmp_path):
    torch.manual_seed(0)
    official = {m: OfficialTextFcLayer(HIDDEN, SIZES[m][2], SIZES[m][1]).eval() for m in SIZES}
    src, llm_cfg = _official_checkpoint(tmp_path, official)
    cfgs = {m: _cfg(m) for m in SIZES}  # no norm_first given: the default must be the official layer
    convert_official(src, tmp_path / "ours", llm_cfg, ENC, cfgs, lora_alpha=32)
    ours = nn.ModuleDict({m: OutputProjector(HIDDEN, cfgs[m]) for m in SIZES})
    llm = transformers.LlamaForCausalLM(llm_cfg)
    apply_checkpoint(load_checkpoint(tmp_path / "ours"), input_proj=InputProjection(ENC, HIDDEN), output_projectors=ours, llm=llm)
    for m, layer in official.items():
        n = SIZES[m][0]
        hidden, embeds = torch.randn(3, n, HIDDEN), torch.randn(3, n, HIDDEN)
        with torch.no_grad():
            want = layer(hidden, embeds)
            got = ours[m].eval()(hidden + embeds)  # we pass the sum: last hidden state + input embedding
        assert got.shape == want.shape == (3, SIZES[m][1], SIZES[m][2])
        assert torch.allclose(got, want, atol=1e-5, rtol=0), f"{m}: max |diff| {float((got - want).abs().max()):.2e}"


def test_a_post_norm_layer_would_be_caught(tmp_path):
    """The comparison above has teeth: the same weights in a post-norm layer give other outputs."""
    torch.manual_seed(1)
    layer = OfficialTextFcLayer(HIDDEN, 24, 7).eval()
    post = OutputProjector(HIDDEN, _cfg("image", norm_first=False)).eval()
    post.load_state_dict(layer.state_dict())  # strict: the names and shapes are identical
    x = torch.randn(2, 4, HIDDEN)
    with torch.no_grad():
        assert (post(x) - layer(x, torch.zeros_like(x))).abs().max() > 1e-2


def _layer_norm(x, ln):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _attention(q_in, kv_in, mha):
    """nn.MultiheadAttention written out: packed in-projection, per-head softmax(QKᵀ/√d)V, out-projection."""
    d = q_in.shape[-1]
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = q_in @ w[:d].T + b[:d]
    k = kv_in @ w[d : 2 * d].T + b[d : 2 * d]
    v = kv_in @ w[2 * d :].T + b[2 * d :]
    h = mha.num_heads

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], h, d // h).transpose(1, 2)

    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / (d // h) ** 0.5, dim=-1)
    out = (att @ heads(v)).transpose(1, 2).reshape(q.shape)
    return out @ mha.out_proj.weight.T + mha.out_proj.bias


def _ff(x, layer):
    return torch.relu(x @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T + layer.linear2.bias


def test_projector_maths_by_hand():
    """The pre-norm transformer projector, computed op by op (fast; guards the maths on its own)."""
    torch.manual_seed(2)
    proj = OutputProjector(HIDDEN, _cfg("image")).eval()
    x = torch.randn(2, 4, HIDDEN)
    with torch.no_grad():
        h = x @ proj.fc.weight.T + proj.fc.bias
        for layer in proj.tfm.encoder.layers:  # x + SA(LN(x)); x + FF(LN(x))
            n = _layer_norm(h, layer.norm1)
            h = h + _attention(n, n, layer.self_attn)
            h = h + _ff(_layer_norm(h, layer.norm2), layer)
        memory = _layer_norm(h, proj.tfm.encoder.norm)
        y = proj.query_embs.expand(2, -1, -1)
        for layer in proj.tfm.decoder.layers:  # + self-attention, cross-attention on memory, FF
            n = _layer_norm(y, layer.norm1)
            y = y + _attention(n, n, layer.self_attn)
            y = y + _attention(_layer_norm(y, layer.norm2), memory, layer.multihead_attn)
            y = y + _ff(_layer_norm(y, layer.norm3), layer)
        y = _layer_norm(y, proj.tfm.decoder.norm)
        want = y @ proj.model.weight.T + proj.model.bias
        got = proj(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())


def test_audio_output_is_passed_on_unnormalised():
    """The official inference hands the audio projector's (1, 512) output to AudioLDM as it is."""
    torch.manual_seed(3)
    proj = OutputProjector(HIDDEN, _cfg("audio")).eval()
    with torch.no_grad():
        out = proj(torch.randn(1, 8, HIDDEN))
    assert out.shape == (1, 1, 16)
    assert abs(float(out.norm()) - 1.0) > 1e-3  # not L2-normalised unless a profile asks (normalize: true)
