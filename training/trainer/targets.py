"""Precomputed projector targets: each decoder's own text-encoder output for a caption.

The official code precomputes them once (`process_embeddings.py`, one .npy per caption). Here each
modality has a folder of safetensors shards mapping the SHA-256 of the caption's UTF-8 text to the
tensor as the decoder produced it ((L, D) for image/video, (D,) for audio). Shards are read lazily
(memory-mapped) and new entries are written as new shards, so a CC3M-sized cache never has to fit
in memory. The trainer never runs a decoder: the stage driver (`training/stages.py`) fills missing entries
with a callable (the decoder tools' `text_embeds`) and hands `TargetCache.get` to the trainer.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


class TargetCache:
    """modality → folder of `NNNNNN.safetensors` shards (caption hash → target tensor)."""

    def __init__(self, dirs: dict[str, str | os.PathLike], flush_every: int = 4096):
        from safetensors import safe_open

        self.dirs = {m: Path(d).expanduser() for m, d in dirs.items()}
        self.flush_every = int(flush_every)
        self.index: dict[str, dict[str, Path]] = {m: {} for m in self.dirs}
        self.pending: dict[str, dict[str, torch.Tensor]] = {m: {} for m in self.dirs}
        self._open: dict[Path, object] = {}
        for m, d in self.dirs.items():
            for shard in sorted(d.glob("*.safetensors")) if d.is_dir() else []:
                with safe_open(str(shard), framework="pt") as f:
                    for k in f.keys():
                        self.index[m][k] = shard

    def __contains__(self, key: tuple[str, str]) -> bool:
        m, caption = key
        k = caption_key(caption)
        return k in self.pending.get(m, {}) or k in self.index.get(m, {})

    def __len__(self) -> int:
        return sum(len(i) for i in self.index.values()) + sum(len(p) for p in self.pending.values())

    def count(self, modality: str) -> int:
        return len(self.index.get(modality, {})) + len(self.pending.get(modality, {}))

    def get(self, modality: str, caption: str) -> torch.Tensor:
        from safetensors import safe_open

        k = caption_key(caption)
        if k in self.pending.get(modality, {}):
            return self.pending[modality][k]
        shard = self.index.get(modality, {}).get(k)
        if shard is None:
            raise KeyError(f"no precomputed {modality} target for caption {caption!r}")
        if shard not in self._open:
            self._open[shard] = safe_open(str(shard), framework="pt")
        return self._open[shard].get_tensor(k)

    def missing(self, needed: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for m, cap in dict.fromkeys(needed):
            if (m, cap) not in self:
                out.setdefault(m, []).append(cap)
        return out

    def add(self, modality: str, caption: str, tensor: torch.Tensor) -> None:
        if modality not in self.dirs:
            raise KeyError(f"no cache folder configured for modality {modality!r}")
        t = tensor.detach().cpu()
        if t.ndim >= 2 and t.shape[0] == 1:
            t = t[0]  # (1, L, D) → (L, D); (1, D) → (D,)
        self.pending[modality][caption_key(caption)] = t.contiguous().clone()
        if len(self.pending[modality]) >= self.flush_every:
            self._flush(modality)

    def fill(self, needed: Iterable[tuple[str, str]], compute: Callable[[str, str], torch.Tensor],
             progress: Callable[[int], None] | None = None) -> int:  # fmt: skip
        """Compute every missing (modality, caption) with `compute`; returns how many were added."""
        n = 0
        for m, caps in self.missing(needed).items():
            for cap in caps:
                self.add(m, cap, compute(m, cap))
                n += 1
                if progress is not None:
                    progress(1)
        return n

    def save(self) -> None:
        for m in self.dirs:
            self._flush(m)

    def _flush(self, modality: str) -> None:
        from safetensors.torch import save_file

        items = self.pending[modality]
        if not items:
            return
        d = self.dirs[modality]
        d.mkdir(parents=True, exist_ok=True)
        n = max((int(p.stem) for p in d.glob("*.safetensors") if p.stem.isdigit()), default=-1) + 1
        shard = d / f"{n:06d}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{shard.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(items, tmp, metadata={"format": "pt", "key": "sha256(caption)"})
            os.replace(tmp, shard)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for k in items:
            self.index[modality][k] = shard
        self.pending[modality] = {}
