"""What `Memory` reads and writes: plain dataclasses (`SessionInfo`, `TurnInfo`, `MediaInfo`, and
`MediaIn` for media being written) and its errors. No SQLAlchemy here; the ORM rows are
`memory.models`, the engine and migrations `memory.database`, the API `memory.store.Memory`.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from memory.models import DIRECTIONS, MODALITIES

class SessionNotFound(KeyError):
    """No session has this id (or id prefix). ``str(exc)`` is a message for the user."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return self.message


class AmbiguousSessionId(SessionNotFound):
    """An id prefix that matches more than one session; ``matches`` lists (some of) them."""

    def __init__(self, message: str, key: str, matches: Sequence[str]) -> None:
        super().__init__(message, key)
        self.matches = list(matches)


Direction = Literal["in", "out"]
Modality = Literal["image", "video", "audio"]
Role = Literal["user", "assistant", "system"]


@dataclass(frozen=True)
class MediaIn:
    """One attachment of a turn being written: exactly one of ``path`` (a file, copied into the
    blob store at `Memory.add_turn` time, so the original may be deleted afterwards), ``data``
    (bytes) or ``sha256`` (content already in this memory's blob store).

    ``mime`` is guessed from the path's suffix when not given (required with ``data``);
    ``modality`` defaults to the mime's major type (image/video/audio). ``direction`` is "in"
    for what the user sent and "out" for what the assistant generated. The dimensions are stored
    as given (memory does not decode media). ``meta`` is any JSON-able dict (e.g. the seed).
    """

    path: Path | str | None = None
    data: bytes | None = None
    sha256: str | None = None
    mime: str | None = None
    direction: Direction = "in"
    modality: Modality | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    duration: float | None = None
    meta: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.path, self.data, self.sha256)]
        if sum(given) != 1:
            raise ValueError("MediaIn needs exactly one of path=, data= or sha256=")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"MediaIn direction must be 'in' or 'out', not {self.direction!r}")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"MediaIn modality must be one of {MODALITIES}, not {self.modality!r}")

    def resolved_mime(self) -> str:
        if self.mime:
            return self.mime
        if self.path is not None:
            guess, _ = mimetypes.guess_type(str(self.path))
            if guess:
                return guess
            raise ValueError(f"cannot tell the mime type of {self.path}; pass mime=")
        raise ValueError("MediaIn(data=...) / MediaIn(sha256=...) needs mime=")

    def resolved_modality(self, mime: str) -> str:
        if self.modality:
            return self.modality
        major = mime.split("/", 1)[0]
        if major in MODALITIES:
            return major
        raise ValueError(f"cannot tell the modality of mime {mime!r}; pass modality=")


@dataclass(slots=True)
class MediaInfo:
    """A stored attachment of a turn. ``path`` is the blob file (read-only by convention)."""

    sha256: str
    path: Path
    mime: str
    size: int
    modality: str
    direction: str
    position: int
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    duration: float | None = None
    meta: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256, "path": str(self.path), "mime": self.mime, "size": self.size,
            "modality": self.modality, "direction": self.direction, "position": self.position,
            "width": self.width, "height": self.height, "frames": self.frames,
            "duration": self.duration, "meta": self.meta,
        }


@dataclass(slots=True)
class TurnInfo:
    """One stored turn. ``index`` is its 0-based position in the session."""

    id: int
    session_id: str
    index: int
    role: str
    text: str
    token_trace: str | None
    settings: dict[str, Any] | None
    timings: dict[str, Any] | None
    status: str
    created_at: datetime
    media: tuple[MediaInfo, ...] = ()

    @property
    def media_in(self) -> tuple[MediaInfo, ...]:
        return tuple(m for m in self.media if m.direction == "in")

    @property
    def media_out(self) -> tuple[MediaInfo, ...]:
        return tuple(m for m in self.media if m.direction == "out")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "index": self.index, "role": self.role, "text": self.text,
            "token_trace": self.token_trace, "settings": self.settings, "timings": self.timings,
            "status": self.status, "created_at": self.created_at.isoformat(),
            "media": [m.to_dict() for m in self.media],
        }


@dataclass(slots=True)
class SessionInfo:
    """A stored session. ``updated_at`` is when it was last used (last turn added)."""

    id: str
    title: str | None
    profile: str
    turn_count: int
    created_at: datetime
    updated_at: datetime

    @property
    def last_used(self) -> datetime:
        return self.updated_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "title": self.title, "profile": self.profile,
            "turn_count": self.turn_count, "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def ordered_parts(text: str, items: Sequence, at: Sequence[int | None]) -> list[tuple[str, Any]]:
    """Mixed content in its order: ("text", str) and ("media", item) parts, the items placed at
    their character offsets `at` in `text` (None: after the text), text between them kept as its
    own part (stripped; empty parts left out). How a turn whose media stand between words (a reply
    naming each thing it made before it; `MediaInfo.meta["at"]`) becomes content blocks."""
    n = len(text)
    placed = sorted(((n if a is None else max(0, min(int(a), n)), i) for i, a in enumerate(at)))
    parts: list[tuple[str, Any]] = []
    cursor = 0
    for offset, i in placed:
        if offset > cursor and text[cursor:offset].strip():
            parts.append(("text", text[cursor:offset].strip()))
        cursor = max(cursor, offset)
        parts.append(("media", items[i]))
    if text[cursor:].strip():
        parts.append(("text", text[cursor:].strip()))
    return parts
