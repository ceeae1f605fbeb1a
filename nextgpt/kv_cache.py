"""The transformers path's key/value cache (`NextGPT`'s LLM steps in nextgpt/model.py import it when
they run, so that the llama.cpp backend's start never imports transformers)."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """One layer's keys/values in a buffer with room to spare. transformers' DynamicLayer appends
    with torch.cat, copying the whole history for every new token (at ~900 cached tokens, about a
    fifth of a SmolLM2-135M decode step); here a token is written into the buffer in place, and the
    buffer is re-allocated only when full (to 1.5× the length: amortised O(1) per token).
    `keys` / `values` stay views of the buffer's first `length` positions, so DynamicLayer's own
    `crop` and `get_seq_length` work unchanged."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._room_for(end):
            capacity = end + max(256, end // 2)
            kept = (self.keys, self.values)
            self.buffers = tuple(s.new_empty(*s.shape[:-2], capacity, s.shape[-1]) for s in (key_states, value_states))
            if length:
                for buffer, old in zip(self.buffers, kept):
                    buffer[..., :length, :] = old
        keys, values = self.buffers
        keys[..., length:end, :] = key_states
        values[..., length:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        return self.keys, self.values

    def _room_for(self, end: int) -> bool:
        """The buffers exist, hold `end` positions, still back `keys` (no other Cache method swapped
        them) and may be written here (a buffer made under inference_mode is read-only outside it)."""
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            return False
        if self.keys.numel() and self.keys.data_ptr() != self.buffers[0].data_ptr():
            return False
        return torch.is_inference_mode_enabled() or not self.buffers[0].is_inference()


class KVCache(DynamicCache):
    """A DynamicCache of GrowingLayers (same API: crop, get_seq_length, ...)."""

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer


def crop_to(kv: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of a key/value cache."""
    extra = kv.get_seq_length() - length
    if extra > 0:
        kv.crop(-extra)  # transformers 5: a negative count of positions to drop
