"""Input and output projections: the small trained bridges between ImageBind, the LLM and the decoders.

Parameter names match the official release (`fc`, `tfm`, `query_embs`, `model`), so a converted
v0 checkpoint loads with a strict `load_state_dict`.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from nextgpt.config import ProjectorConfig


class InputProjection(nn.Linear):
    """One ImageBind vector (e.g. 1024-d) -> ONE LLM input embedding (official `llama_proj`)."""


class OutputProjector(nn.Module):
    """The official transformer output projector ("TextFcLayer", transformer mode).

    input: (B, N, llm_hidden) = last-layer hidden states at the N signal positions + those tokens'
    input embeddings -> Linear(llm_hidden -> d_model) -> nn.Transformer whose decoder reads Q
    learned queries -> Linear(d_model -> D) -> (B, Q, D), the decoder's `prompt_embeds`.

    The transformer is pre-norm (`norm_first=True`), as the official `nn.Transformer(batch_first=True,
    norm_first=True, ...)`: a strict load cannot tell pre- from post-norm (same parameter names),
    only the outputs can (tests/test_projector_official.py compares them with the official layer).
    """

    def __init__(self, llm_hidden: int, cfg: ProjectorConfig):
        super().__init__()
        self.normalize = cfg.normalize
        self.fc = nn.Linear(llm_hidden, cfg.d_model)
        with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first was True": a speed note
            warnings.filterwarnings("ignore", message="enable_nested_tensor")
            self.tfm = self._transformer(cfg)
        self.query_embs = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.d_model))
        self.model = nn.Linear(cfg.d_model, cfg.out_dim)

    @staticmethod
    def _transformer(cfg: ProjectorConfig) -> nn.Transformer:
        return nn.Transformer(
            d_model=cfg.d_model,
            nhead=cfg.num_heads,
            num_encoder_layers=cfg.num_encoder_layers,
            num_decoder_layers=cfg.num_decoder_layers,
            dim_feedforward=cfg.dim_feedforward,
            dropout=0.0,
            batch_first=True,
            norm_first=cfg.norm_first,  # the official layer is pre-norm; post-norm has the same parameter names
        )

    def forward(self, signal_states: torch.Tensor) -> torch.Tensor:
        x = self.fc(signal_states)
        queries = self.query_embs.expand(x.shape[0], -1, -1)
        x = self.tfm(x, queries)
        out = self.model(x)
        if self.normalize:
            out = F.normalize(out, dim=-1)
        return out
