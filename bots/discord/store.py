"""The bot's own bookkeeping, beside (never inside) the memory database: `<data_dir>/discord.db`.

- chats: which memory session a Discord thread (or DM channel) holds, who started it, whether it is
  private. A thread keeps its old sessions after /reset; the newest is the current one.
- replies: one row per media reply, keyed by the short id in its buttons' custom_id: which turn
  of which session it is (the ℹ button reads that turn from memory, where the session saved its
  settings); rows of older replies in a session are marked superseded.
- guild_settings: the server defaults /settings edits (ChatSettings names → values).

SQLite in WAL mode through SQLAlchemy Core; every method is one short transaction and is safe to
call from any thread.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger, Boolean, Column, Float, Integer, MetaData, String, Table, Text, create_engine, event, insert, select,
    update,
)

metadata = MetaData()

chats = Table(
    "chats", metadata,
    Column("session_id", String(64), primary_key=True),
    Column("thread_id", BigInteger, nullable=False, index=True),
    Column("owner_id", BigInteger, nullable=False, index=True),
    Column("guild_id", BigInteger, nullable=True),
    Column("channel_id", BigInteger, nullable=True),  # the thread's parent (None in DMs)
    Column("private", Boolean, nullable=False, default=False),
    Column("last_user_id", BigInteger, nullable=True),  # who asked the latest turn
    Column("created_at", Float, nullable=False),
)

replies = Table(
    "replies", metadata,
    Column("key", String(32), primary_key=True),
    Column("session_id", String(64), nullable=False, index=True),
    Column("thread_id", BigInteger, nullable=False),
    Column("turn_index", Integer, nullable=False),
    Column("user_id", BigInteger, nullable=False),  # who asked for it
    Column("info", Text, nullable=False),  # unused ("{}"): the turn in memory holds it; kept for older files
    Column("superseded", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

guild_settings = Table(
    "guild_settings", metadata,
    Column("guild_id", BigInteger, primary_key=True),
    Column("settings", Text, nullable=False),
)


@dataclass(frozen=True)
class ChatRecord:
    session_id: str
    thread_id: int
    owner_id: int
    guild_id: int | None
    channel_id: int | None
    private: bool
    last_user_id: int | None
    created_at: float


@dataclass(frozen=True)
class ReplyRecord:
    key: str
    session_id: str
    thread_id: int
    turn_index: int
    user_id: int
    superseded: bool


class Store:
    def __init__(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(self.engine, "connect")
        def _pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        metadata.create_all(self.engine)
        self._lock = threading.Lock()  # one writer at a time inside this process

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ chats
    def add_chat(
        self, session_id: str, thread_id: int, owner_id: int, *, guild_id: int | None = None,
        channel_id: int | None = None, private: bool = False,
    ) -> ChatRecord:
        row = dict(
            session_id=session_id, thread_id=thread_id, owner_id=owner_id, guild_id=guild_id,
            channel_id=channel_id, private=private, last_user_id=owner_id, created_at=time.time(),
        )
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(chats).values(**row))
        return ChatRecord(**row)

    def current_chat(self, thread_id: int) -> ChatRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(chats).where(chats.c.thread_id == thread_id).order_by(chats.c.created_at.desc()).limit(1)
            ).first()
        return ChatRecord(**row._mapping) if row else None

    def chat(self, session_id: str) -> ChatRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(chats).where(chats.c.session_id == session_id)).first()
        return ChatRecord(**row._mapping) if row else None

    def current_threads(self) -> dict[int, str]:
        """thread id → its current session id, for every chat thread."""
        out: dict[int, tuple[float, str]] = {}
        with self.engine.connect() as conn:
            for r in conn.execute(select(chats.c.thread_id, chats.c.session_id, chats.c.created_at)):
                if r.thread_id not in out or r.created_at >= out[r.thread_id][0]:
                    out[r.thread_id] = (r.created_at, r.session_id)
        return {k: v[1] for k, v in out.items()}

    def chats_of(self, owner_id: int, *, guild_id: int | None = None, limit: int = 25) -> list[ChatRecord]:
        """The sessions `owner_id` started (in one server, or in DMs when guild_id is None), newest first."""
        q = select(chats).where(chats.c.owner_id == owner_id)
        q = q.where(chats.c.guild_id == guild_id) if guild_id is not None else q.where(chats.c.guild_id.is_(None))
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(chats.c.created_at.desc()).limit(limit)).all()
        return [ChatRecord(**r._mapping) for r in rows]

    def set_last_user(self, session_id: str, user_id: int) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(update(chats).where(chats.c.session_id == session_id).values(last_user_id=user_id))

    # ------------------------------------------------------------------ replies
    def add_reply(self, session_id: str, thread_id: int, turn_index: int, user_id: int) -> str:
        key = secrets.token_hex(6)
        with self._lock, self.engine.begin() as conn:
            conn.execute(update(replies).where(replies.c.session_id == session_id).values(superseded=True))
            conn.execute(insert(replies).values(
                key=key, session_id=session_id, thread_id=thread_id, turn_index=turn_index, user_id=user_id,
                info="{}", superseded=False, created_at=time.time(),
            ))
        return key

    def supersede(self, session_id: str) -> None:
        """Mark every reply of a session old (its text-only successor has no buttons of its own)."""
        with self._lock, self.engine.begin() as conn:
            conn.execute(update(replies).where(replies.c.session_id == session_id).values(superseded=True))

    def reply(self, key: str) -> ReplyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(replies).where(replies.c.key == key)).first()
        if row is None:
            return None
        m = dict(row._mapping)
        m.pop("created_at")
        m.pop("info")
        return ReplyRecord(**m)

    # ------------------------------------------------------------------ server settings
    def guild_settings(self, guild_id: int | None) -> dict[str, Any]:
        if guild_id is None:
            return {}
        with self.engine.connect() as conn:
            row = conn.execute(select(guild_settings.c.settings).where(guild_settings.c.guild_id == guild_id)).first()
        return json.loads(row[0]) if row else {}

    def set_guild_setting(self, guild_id: int, key: str, value: Any) -> dict[str, Any]:
        with self._lock, self.engine.begin() as conn:
            row = conn.execute(select(guild_settings.c.settings).where(guild_settings.c.guild_id == guild_id)).first()
            current = json.loads(row[0]) if row else {}
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
            if row:
                conn.execute(update(guild_settings).where(guild_settings.c.guild_id == guild_id)
                             .values(settings=json.dumps(current)))
            else:
                conn.execute(insert(guild_settings).values(guild_id=guild_id, settings=json.dumps(current)))
        return current
