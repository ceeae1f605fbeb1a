"""A LangChain chat message history over one `Memory` session.

    from memory import Memory
    from memory.history import MemoryChatHistory

    history = MemoryChatHistory(Memory.open(), session_id)
    history.messages        # [HumanMessage, AIMessage, ...] in order

Messages map to turns one to one: `HumanMessage` <-> role "user", `AIMessage` <-> "assistant",
`SystemMessage` <-> "system". A turn without media becomes a message whose ``content`` is its
text; a turn with media becomes a list of LangChain v1 standard content blocks
(`langchain_core.messages.content`): a ``{"type": "text"}`` block for the text, then one
``{"type": "image" | "video" | "audio"}`` block per attachment that *references* the stored
file (no base64)::

    {"type": "image", "url": "file:///.../blobs/ab/cdef...", "file_id": "<sha256>",
     "mime_type": "image/png",
     "extras": {"direction": "out", "position": 0, "width": 512, "height": 512, ...}}

``url`` is the blob's ``file://`` URI and ``file_id`` its SHA-256 in the memory's blob store.
`add_messages` accepts those blocks back (by ``file_id`` or ``file://`` url), as well as
base64 blocks and the older LangChain formats (anything ``message.content_blocks`` normalizes),
and stores each message as one turn (atomically, via `Memory.add_turn`). Web URLs are refused:
memory snapshots bytes, it does not fetch.

An AIMessage also carries the turn's ``token_trace``, ``settings``, ``timings`` and ``status``
in ``response_metadata`` (and they are stored back from there by `add_messages`).
"""

from __future__ import annotations

import base64
import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from memory.records import ordered_parts
from memory.store import MediaIn, Memory, TurnInfo

__all__ = ["MemoryChatHistory", "turn_to_message"]

_MEDIA_TYPES = ("image", "video", "audio")
_META_KEYS = ("token_trace", "settings", "timings", "status")


def turn_to_message(turn: TurnInfo) -> BaseMessage:
    """One stored turn as a LangChain message (see the module docstring for the format)."""
    content: str | list[str | dict[str, Any]]
    if turn.media:
        blocks: list[str | dict[str, Any]] = []
        at = [(m.meta or {}).get("at") for m in turn.media]
        if any(a is not None for a in at):  # media placed between words: the parts in their order
            parts = ordered_parts(turn.text, turn.media, at)
        else:
            parts = ([("text", turn.text)] if turn.text else []) + [("media", m) for m in turn.media]
        for kind, m in parts:
            if kind == "text":
                blocks.append({"type": "text", "text": m})
                continue
            extras = {
                k: v
                for k, v in (
                    ("direction", m.direction), ("position", m.position), ("size", m.size),
                    ("width", m.width), ("height", m.height), ("frames", m.frames),
                    ("duration", m.duration), ("meta", m.meta),
                )
                if v is not None
            }
            blocks.append({
                "type": m.modality, "url": m.path.as_uri(), "file_id": m.sha256,
                "mime_type": m.mime, "extras": extras,
            })
        content = blocks
    else:
        content = turn.text
    msg_id = f"turn-{turn.id}"
    if turn.role == "user":
        return HumanMessage(content=content, id=msg_id)
    if turn.role == "system":
        return SystemMessage(content=content, id=msg_id)
    meta = {k: getattr(turn, k) for k in _META_KEYS if getattr(turn, k) is not None}
    return AIMessage(content=content, id=msg_id, response_metadata=meta)


class MemoryChatHistory(BaseChatMessageHistory):
    """`BaseChatMessageHistory` backed by one session of a `Memory` (see module docstring)."""

    def __init__(self, memory: Memory, session_id: str) -> None:
        # BaseChatMessageHistory is marked deprecated in langchain-core 1.6.4+ (still
        # supported until 2.0); the warning is about LangChain's own recommendations, not us.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            super().__init__()
        self.memory = memory
        self.session_id = memory.get_session(session_id).id  # resolves a prefix, or raises

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        return [turn_to_message(t) for t in self.memory.turns(self.session_id)]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        for message in messages:
            role = _role_of(message)
            text, media = self._split_content(message, "out" if role == "assistant" else "in")
            kw: dict[str, Any] = {}
            if role == "assistant":
                meta = message.response_metadata or {}
                kw = {k: meta[k] for k in _META_KEYS if meta.get(k) is not None}
            self.memory.add_turn(self.session_id, role, text, media=media, **kw)

    def clear(self) -> None:
        self.memory.clear_turns(self.session_id)

    # -- content blocks -> text + MediaIn ------------------------------------------------------
    def _split_content(self, message: BaseMessage, direction: str) -> tuple[str, list[MediaIn]]:
        """The text (text blocks joined by newlines) and the media. When words follow a media
        block, every media item keeps its place: `meta["at"]`, its offset in the text."""
        if isinstance(message.content, str):
            return message.content, []
        texts: list[str] = []
        media: list[tuple[MediaIn, int]] = []  # (item, text blocks before it)
        for block in message.content_blocks:
            kind = block.get("type")
            if kind == "text":
                texts.append(block.get("text", ""))
            elif kind in _MEDIA_TYPES or kind == "file":
                major = kind if kind in _MEDIA_TYPES else str(block.get("mime_type") or "").split("/", 1)[0]
                if major not in _MEDIA_TYPES:
                    raise ValueError(f"memory stores image, video and audio files, not {block.get('mime_type')!r}")
                media.append((self._media_in(block, major, direction), len(texts)))
            else:
                raise ValueError(f"cannot store a {kind!r} content block in memory")
        text = "\n".join(t for t in texts if t)
        if not any(any(texts[before:]) for _, before in media):  # the media after all the words: no places needed
            return text, [m for m, _ in media]
        return text, [
            dataclasses.replace(m, meta={**(m.meta or {}), "at": len("\n".join(t for t in texts[:before] if t))})
            for m, before in media
        ]

    def _media_in(self, block: dict[str, Any], modality: str, direction: str) -> MediaIn:
        extras = dict(block.get("extras") or {})
        common: dict[str, Any] = {
            "mime": block.get("mime_type"),
            "modality": modality,
            "direction": extras.get("direction", direction),
            "width": extras.get("width"),
            "height": extras.get("height"),
            "frames": extras.get("frames"),
            "duration": extras.get("duration"),
            "meta": extras.get("meta"),
        }
        file_id = block.get("file_id")
        if isinstance(file_id, str) and file_id.lower() in self.memory.blobs:
            return MediaIn(sha256=file_id.lower(), **common)
        if block.get("base64"):
            return MediaIn(data=base64.b64decode(block["base64"]), **common)
        url = block.get("url")
        if url:
            parsed = urlparse(url)
            if parsed.scheme == "file":
                return MediaIn(path=Path(unquote(parsed.path)), **common)
            if parsed.scheme == "data":  # data:<mime>;base64,<payload>
                head, _, payload = url.partition(",")
                mime = head[5:].split(";", 1)[0] or common["mime"]
                return MediaIn(data=base64.b64decode(payload), **{**common, "mime": mime})
            if parsed.scheme == "" and Path(url).is_file():
                return MediaIn(path=Path(url), **common)
            raise ValueError(f"memory stores local files only, not {url!r} (download it first)")
        raise ValueError(f"{modality} block has no usable source (file_id/url/base64): {block!r}")


def _role_of(message: BaseMessage) -> str:
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, SystemMessage):
        return "system"
    raise ValueError(f"memory stores human, AI and system messages, not {message.type!r}")
