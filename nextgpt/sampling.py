"""Temperature, top-k and top-p (nucleus) warping of next-token logits: transformers'
`TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` (min_tokens_to_keep=1), in that
order, with the same arithmetic. Kept here so that sampling a reply does not import transformers
(~0.7-1.3 s of a `nextgpt chat` start on the llama.cpp backend, which needs nothing else from it);
tests/test_core.py checks the results equal transformers' on random logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Warpers:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (batch, vocab) → warped scores (removed tokens at -inf)."""
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            k = min(self.top_k, scores.shape[-1])
            scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            remove = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - self.top_p)
            remove[..., -1:] = False  # the most likely token always stays
            scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        return scores
