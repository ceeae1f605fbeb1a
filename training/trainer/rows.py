"""Training only the 38 new token rows of the embedding and the lm_head.

The official code unfreezes the whole embedding and lm_head matrices (32038 × 4096 each, ~262 M
parameters for Vicuna-7B) in every stage, so the pretrained rows drift too. Here the full matrices
stay frozen and untouched, and the new rows (`<Img>`, `</Img>`, `[IMG0..3]`, `[VID0..23]`,
`[AUD0..7]`: the last 38 rows, see `nextgpt.tokens.NEW_TOKENS`) are separate trainable parameters
spliced in at run time:

- `NewRowsEmbedding`: looks ids up in the frozen matrix, then replaces the vectors of ids in the new
  range by rows of `new_rows`;
- `NewRowsLMHead`: logits of the base vocabulary from the frozen matrix's first V−38 rows, logits
  of the new tokens from `new_rows`.

Why this rather than masking the gradient of the full matrices: the base rows are bit-identical by
construction (no optimizer update, no weight decay, no fp16 master-copy round trip can touch
them); the optimizer holds state for 2 × 38 × H numbers instead of 2 × V × H (Adam: ~2 GB less for
7B); data-parallel all-reduce sends 38 rows, not the matrices; the trainable-parameter count is
honest; and the checkpoint stores exactly `embed_tokens.new_rows` / `lm_head.new_rows` [38, H].

With tied input/output embeddings (e.g. SmolLM2) one `new_rows` parameter serves both, so they
stay tied. With `train_head=False` (the `embed_rows` group) only the input rows train: the lm_head
rows stay what they were (a frozen copy, so a tied model is untied), and which token the LM picks at
a position before a signal token cannot move — only the states from the signal tokens on.
`merge()` writes the trained rows into the matrices and puts the original modules back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextgpt.tokens import NEW_TOKENS

N_NEW = len(NEW_TOKENS)


class NewRowsEmbedding(nn.Module):
    def __init__(self, base: nn.Module, new_rows: nn.Parameter):
        super().__init__()
        self.base = base
        self.new_rows = new_rows
        self.first = int(base.weight.shape[0]) - int(new_rows.shape[0])

    @property
    def weight(self) -> torch.Tensor:  # NextGPT.device and friends read .weight
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return int(self.base.weight.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.base.weight.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        new = F.embedding((ids - self.first).clamp(min=0), self.new_rows)
        scale = getattr(self.base, "embed_scale", None)  # e.g. Gemma's scaled embedding
        if scale is not None:
            new = new * scale
        # always in the graph (even without new ids), so data-parallel sees the parameter used
        return torch.where((ids >= self.first)[..., None], new.to(out.dtype), out)


class NewRowsLMHead(nn.Module):
    def __init__(self, base: nn.Module, new_rows: nn.Parameter):
        super().__init__()
        self.base = base
        self.new_rows = new_rows
        self.first = int(base.weight.shape[0]) - int(new_rows.shape[0])

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    @property
    def out_features(self) -> int:
        return int(self.base.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.base.weight.shape[1])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.base.weight
        b = self.bias
        old = F.linear(h, w[: self.first], None if b is None else b[: self.first])
        new = F.linear(h, self.new_rows.to(h.dtype), None if b is None else b[self.first :])
        return torch.cat([old, new.to(old.dtype)], dim=-1)


class NewRows:
    """Installs the two wrappers on a Hugging Face causal LM (`install`), gives their parameters,
    and merges them back (`merge`)."""

    def __init__(self, llm: nn.Module, n: int = N_NEW, dtype: torch.dtype = torch.float32, *, train_head: bool = True):
        self.llm = llm
        in_emb, out_emb = llm.get_input_embeddings(), llm.get_output_embeddings()
        if isinstance(in_emb, NewRowsEmbedding):
            raise ValueError("new-row wrappers are already installed on this LLM")
        self.in_base, self.out_base = in_emb, out_emb
        was_tied = out_emb is not None and out_emb.weight is in_emb.weight
        self.tied = was_tied and train_head
        self.untie_on_merge = was_tied and not train_head
        self.embed = nn.Parameter(in_emb.weight[-n:].detach().clone().to(dtype))
        if out_emb is None:
            self.head = None
        elif self.tied:
            self.head = self.embed
        else:
            self.head = nn.Parameter(out_emb.weight[-n:].detach().clone().to(dtype), requires_grad=train_head)
        llm.set_input_embeddings(NewRowsEmbedding(in_emb, self.embed))
        if out_emb is not None:
            llm.set_output_embeddings(NewRowsLMHead(out_emb, self.head))
        self.installed = True

    def parameters(self) -> list[nn.Parameter]:
        if self.head is None or self.tied or not self.head.requires_grad:
            return [self.embed]
        return [self.embed, self.head]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`embed_tokens.new_rows` / `lm_head.new_rows`, in the checkpoint's names."""
        out = {"embed_tokens.new_rows": self.embed.detach()}
        if self.head is not None:
            out["lm_head.new_rows"] = self.head.detach()
        return out

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.embed.copy_(tensors["embed_tokens.new_rows"])
        if self.head is not None and not self.tied:
            self.head.copy_(tensors["lm_head.new_rows"])

    @torch.no_grad()
    def merge(self) -> None:
        """Write the rows into the (frozen) matrices and restore the original modules."""
        if not self.installed:
            return
        n = self.embed.shape[0]
        if self.untie_on_merge:  # the input rows moved, the output rows did not: two matrices from here on
            from nextgpt.checkpoint import _untie

            _untie(self.llm, self.out_base)
        self.in_base.weight[-n:].copy_(self.embed.to(self.in_base.weight.dtype))
        self.llm.set_input_embeddings(self.in_base)
        if self.out_base is not None:
            if not self.tied:
                self.out_base.weight[-n:].copy_(self.head.to(self.out_base.weight.dtype))
            self.llm.set_output_embeddings(self.out_base)
        self.installed = False
