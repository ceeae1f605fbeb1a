"""The output projector's maths against a reference written here from plain torch ops: Linear →
pre-norm transformer encoder (x + SA(LN(x)), x + FF(LN(x)); final LayerNorm) → pre-norm decoder on
the learned queries (self-attention, cross-attention on the encoder's output, feed-forward; final
LayerNorm) → Linear. Random weights (LayerNorms included), so any change to the maths shows; fast,
so the projector is not guarded only by the slow `small`-profile test."""

import math

import pytest
import torch

from nextgpt.config import ProjectorConfig
from nextgpt.projectors import OutputProjector


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def attention(x, memory, attn):
    """Multi-head attention of x's positions over memory's (nn.MultiheadAttention's packed weights)."""
    d, h = x.shape[-1], attn.num_heads
    w, b = attn.in_proj_weight.double(), attn.in_proj_bias.double()
    q, k, v = x @ w[:d].T + b[:d], memory @ w[d : 2 * d].T + b[d : 2 * d], memory @ w[2 * d :].T + b[2 * d :]

    def heads(t):  # (B, T, d) → (B, h, T, d/h)
        return t.reshape(t.shape[0], t.shape[1], h, d // h).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(x.shape)
    return out @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()


def feed_forward(x, layer):
    hidden = torch.relu(x @ layer.linear1.weight.double().T + layer.linear1.bias.double())
    return hidden @ layer.linear2.weight.double().T + layer.linear2.bias.double()


def reference(proj: OutputProjector, states: torch.Tensor) -> torch.Tensor:
    x = states.double() @ proj.fc.weight.double().T + proj.fc.bias.double()
    for layer in proj.tfm.encoder.layers:
        a = layer_norm(x, layer.norm1)
        x = x + attention(a, a, layer.self_attn)
        x = x + feed_forward(layer_norm(x, layer.norm2), layer)
    memory = layer_norm(x, proj.tfm.encoder.norm)
    y = proj.query_embs.double().expand(states.shape[0], -1, -1)
    for layer in proj.tfm.decoder.layers:
        a = layer_norm(y, layer.norm1)
        y = y + attention(a, a, layer.self_attn)
        y = y + attention(layer_norm(y, layer.norm2), memory, layer.multihead_attn)
        y = y + feed_forward(layer_norm(y, layer.norm3), layer)
    y = layer_norm(y, proj.tfm.decoder.norm)
    out = y @ proj.model.weight.double().T + proj.model.bias.double()
    if proj.normalize:
        out = out / out.norm(dim=-1, keepdim=True)
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_output_projector_is_the_pre_norm_transformer(normalize):
    torch.manual_seed(0)
    cfg = ProjectorConfig(num_queries=5, out_dim=12, d_model=16, num_heads=4, num_encoder_layers=2,
                          num_decoder_layers=2, dim_feedforward=24, normalize=normalize)
    proj = OutputProjector(20, cfg).eval()
    with torch.no_grad():
        for p in proj.parameters():  # LayerNorm weights and biases too: none left at 1 / 0
            p.copy_(torch.randn_like(p) * 0.5)
    states = torch.randn(2, 3, 20)
    with torch.no_grad():
        got = proj(states)
    want = reference(proj, states)
    assert got.shape == (2, 5, 12)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=0), (got.double() - want).abs().max()
