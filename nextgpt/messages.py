"""The message types every layer passes around: a chat turn (`Message`) and one input media item
(`MediaInput`). Torch-free, so front ends import them at the top without loading the model;
`nextgpt.model` re-exports both."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class MediaInput:
    """One input item: a file (encoded with ImageBind) or an already-computed ImageBind vector."""

    modality: str  # image | video | audio
    path: Path | None = None
    embedding: torch.Tensor | None = None


@dataclass
class Message:
    role: str  # system | user | assistant
    text: str  # for assistant turns: the raw trace, signal tokens included
    media: list[MediaInput] = field(default_factory=list)  # user turns: inputs, one slot each
