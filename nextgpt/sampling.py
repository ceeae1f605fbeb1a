"""Sampling the next token, on numpy alone (a reply's first words need no torch: on the llama.cpp backend
a chat start reaches its first reply text before torch, ~2-3 s of import, has loaded).

`Warpers`: temperature, top-k and top-p (nucleus) warping of next-token logits, transformers'
`TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` (min_tokens_to_keep=1), in that
order, with the same rule (tests/test_core.py checks the results equal transformers' on random logits).
`draw`: one token from the warped scores with a seeded numpy generator, the same on every backend and
device (the logits are read back to the CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Warpers:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """scores (..., vocab) float32 → warped scores (removed tokens at -inf)."""
        scores = np.asarray(scores, dtype=np.float32)
        if self.temperature != 1.0:
            scores = scores / np.float32(self.temperature)
        if self.top_k:
            k = min(self.top_k, scores.shape[-1])
            kth = np.partition(scores, -k, axis=-1)[..., -k, None]
            scores = np.where(scores < kth, np.float32(-np.inf), scores)
        if self.top_p < 1.0:
            flat = scores.reshape(-1, scores.shape[-1])
            removed = np.ones(flat.shape, dtype=bool)
            for row, keep in zip(flat, removed):
                keep[_nucleus(row, self.top_p)] = False
            scores = np.where(removed.reshape(scores.shape), np.float32(-np.inf), scores)
        return scores


def _nucleus(scores: np.ndarray, top_p: float) -> np.ndarray:
    """The indices top-p keeps: a token goes when the probability of it and every less likely token is
    at most 1 - top_p (transformers' rule); the most likely token always stays. Only the few hundred most
    likely tokens are sorted (a whole-vocabulary sort cost 2-5 ms a token); their sums in float64."""
    e = np.exp(scores - scores.max())
    z = e.sum(dtype=np.float64)
    n = len(scores)
    k = min(n, 256)
    while True:
        top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-scores[top], kind="stable")]  # most likely first; ties in index order
        p = e[top] / z
        above = np.cumsum(p) - p  # the probability of the tokens ranked above each
        keep = 1 - above > 1 - top_p
        keep[0] = True
        if not keep.all() or k == n:  # the nucleus ends inside the k most likely tokens
            return top[keep]
        k = n  # a flat distribution: sort them all


def draw(scores: np.ndarray, rng: np.random.Generator) -> int:
    """One index of the 1-D `scores`, with probability softmax(scores) (a -inf score is never drawn): the
    exponential race torch.multinomial runs too, argmax(p / q) with q ~ Exp(1) drawn for every token of
    the vocabulary each step. The stream of draws stays aligned however many tokens warping kept, and a
    slightly different logit (llama.cpp's F16 layers vs fp32) flips the token only when two candidates'
    ratios nearly tie (an inverse-CDF draw flipped it whenever the cumulative sum before it moved past the
    uniform: 148 of 160 eval conversations had the same words on both backends; see docs/performance.md)."""
    q = rng.standard_exponential(scores.shape[-1])
    index = np.flatnonzero(scores > -np.inf)
    return int(index[np.argmax(scores[index] - np.log(q[index]))])
