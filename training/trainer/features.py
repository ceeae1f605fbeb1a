"""Media features computed once: the frozen encoder's vector of every input file of a stage's data.

ImageBind is frozen in every stage, so the vector of an input file never changes during training;
encoding it per batch only makes the accelerator wait. Measured per batch of 32 of stage 9's data:
≈ 0.3 s on this project's 2-core CPU (a video ≈ 0.1 s: decoding the mp4, three crops × five clips
through the encoder) and 0.53 s on session 16's GPU machine, where a whole step took 1.6 s.

`MediaFeatures` stores each vector once on disk, in the same sharded safetensors layout as the
projector targets (`TargetCache`), under a folder named by the encoder's identity (its weights,
dtype, architecture and clip settings: `encoder_key`): another encoder, another folder. A file is
keyed by the SHA-256 of its bytes, so regenerated data with the same content, or data moved to
another folder (another machine), finds its vectors, and a file rewritten with other content gets
new ones. The stage driver fills the store before training (`fill`, with a progress bar); the
trainer's collator then only reads vectors (`__call__`), encoding at once anything the store lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from training.trainer.targets import TargetCache

MODALITIES = ("image", "video", "audio")


def encoder_key(encoder) -> str:
    """What decides an encoder's vectors (16 hex digits): its weights' bytes, dtype and architecture,
    and the clip settings of its preprocessing. Not its device: a cache filled on one machine serves
    another (a CPU's and a GPU's vectors differ by float rounding only)."""
    cfg = encoder.cfg
    h = hashlib.sha256()
    settings = {
        "arch": getattr(encoder.model, "nextgpt_arch", cfg.arch), "dtype": str(encoder.dtype),
        "video_clips": cfg.video_clips, "audio_clips": cfg.audio_clips, "clip_seconds": cfg.clip_seconds,
        "spatial_crops": getattr(encoder, "video_spatial_crops", None),
    }  # fmt: skip
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in sorted(encoder.model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class MediaFeatures:
    """`media_fn` for `Collator`: [(modality, path)] → (n, E), each file encoded once, kept on disk.

    `folder` is this encoder's own folder (e.g. `root / encoder_key(encoder)`); `encode` is the
    encoder's `encode`."""

    def __init__(self, folder: str | os.PathLike, encode: Callable[[list[tuple[str, Path]]], torch.Tensor], batch_size: int = 32):
        self.folder = Path(folder).expanduser()
        self.encode = encode
        self.batch_size = int(batch_size)
        self.store = TargetCache({m: self.folder / m for m in MODALITIES})
        self._digests: dict[str, str] = {}  # path → content digest (a file is read once)

    def _key(self, path: str | os.PathLike) -> str:
        p = str(path)
        if p not in self._digests:
            with open(p, "rb") as f:
                self._digests[p] = hashlib.file_digest(f, "sha256").hexdigest()
        return self._digests[p]

    def missing(self, items: Iterable[tuple[str, str | os.PathLike]]) -> list[tuple[str, Path]]:
        """The distinct (modality, path) whose content has no vector yet, in first-seen order."""
        out, seen = [], set()
        for m, p in items:
            if m not in MODALITIES:
                raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {m!r}")
            k = (m, self._key(p))
            if k in seen or k in self.store:
                continue
            seen.add(k)
            out.append((m, Path(p)))
        return out

    def fill(self, items: Iterable[tuple[str, str | os.PathLike]], progress: Callable[[int], None] | None = None) -> int:
        """Encode every file of `items` the store lacks (batches of `batch_size`) and save; how many."""
        todo = self.missing(items)
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            self._encode(chunk)
            if progress is not None:
                progress(len(chunk))
        self.store.save()
        return len(todo)

    def __call__(self, items: list[tuple[str, str | os.PathLike]]) -> torch.Tensor:
        todo = self.missing(items)
        if todo:  # not filled beforehand: encode now (kept in memory until the next `save`)
            self._encode(todo)
        return torch.stack([self.store.get(m, self._key(p)) for m, p in items])

    def _encode(self, items: list[tuple[str, Path]]) -> None:
        for (m, p), v in zip(items, self.encode(items)):
            self.store.add(m, self._key(p), v.detach().float().cpu())

    def save(self) -> None:
        self.store.save()
