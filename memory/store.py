"""`Memory`: every conversation, persisted (SQLAlchemy + Alembic + a content-addressed blob store).

Quick use::

    from memory import Memory, MediaIn

    mem = Memory.open()                                # SQLite at <data_dir>/memory.db
    s = mem.create_session("cats", profile="tiny")
    mem.add_turn(s.id, "user", "draw a cat", media=[MediaIn(path="cat.jpg", direction="in")])
    ...generate...
    mem.add_turn(s.id, "assistant", "here it is", token_trace="... [IMG0] ...",
                 settings={"seed": 0}, media=[MediaIn(data=png, mime="image/png", direction="out")])
    for t in mem.turns(s.id): print(t.index, t.role, t.text, [m.path for m in t.media])

Storage
    * ``data_dir``: the ``data_dir`` argument, else ``$NEXTGPT_DATA``, else
      ``platformdirs.user_data_dir("nextgpt")``. Media bytes always live in
      ``<data_dir>/blobs`` (content-addressed by SHA-256, see `memory.blobs`), whatever the URL.
    * database: the ``url`` argument (any SQLAlchemy URL, e.g. ``postgresql+psycopg://...``),
      else SQLite at ``<data_dir>/memory.db``. SQLite runs in WAL mode with foreign keys on,
      ``synchronous=NORMAL`` (a committed turn survives a killed process; an OS crash or power
      cut may lose the last commits but never corrupts the file) and a busy timeout, and write
      transactions start with ``BEGIN IMMEDIATE`` so that concurrent processes (CLI + Discord
      bot) queue instead of failing.
    * schema: `Memory.open` upgrades the database to the newest Alembic revision shipped in
      ``memory/migrations`` (idempotent; a no-op costing one query when already current).

Session ids are 8 random lowercase hex characters (``"3f9a0c1e"``); every method that takes
a session id also accepts any unique prefix of one (``"3f9"``). An unknown id raises
`SessionNotFound` (a `KeyError`); a prefix matching several sessions raises `AmbiguousSessionId`
(a `SessionNotFound`).

Durability: each turn is written by `Memory.add_turn` in one transaction (turn row, media rows,
links), after its media bytes are already in the blob store. A crash leaves either the whole
turn or none of it (at worst an unreferenced blob file, which `Memory.gc` removes).

All methods return plain dataclasses (`SessionInfo`, `TurnInfo`, `MediaInfo`), never ORM
objects. This module imports neither torch nor anything from the rest of nextgpt.

The package by job: `memory.models` the ORM rows (the schema), `memory.records` the dataclasses
and errors the API speaks, `memory.database` the engine and the migrations, `memory.blobs` the
media files, and here the `Memory` API itself (its names from the other modules are re-exported,
so `from memory.store import ...` keeps working).
"""

from __future__ import annotations

import gc
import json
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    Connection,
    Engine,
    String,
    Text,
    cast,
    delete,
    exists,
    func,
    insert,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.exc import IntegrityError

from memory.blobs import BlobStore
from memory.database import (  # noqa: F401 - re-exported: `from memory.store import ...` keeps working
    MIGRATIONS_DIR,
    SQLITE_BUSY_TIMEOUT_S,
    VERSION_TABLE,
    _current_revisions,
    _head_revision,
    _json_dumps,
    _make_engine,
    _quick_head,
    alembic_config,
    default_data_dir,
    upgrade,
)
from memory.models import (
    ROLES,
    STATUSES,
    MediaRow,
    SessionRow,
    TurnMediaRow,
    TurnRow,
    utcnow,
)
from memory.records import (  # noqa: F401 - re-exported
    AmbiguousSessionId,
    MediaIn,
    MediaInfo,
    Role,
    SessionInfo,
    SessionNotFound,
    TurnInfo,
)

__all__ = [
    "AmbiguousSessionId",
    "MediaIn",
    "MediaInfo",
    "Memory",
    "SessionInfo",
    "SessionNotFound",
    "TurnInfo",
    "alembic_config",
    "default_data_dir",
    "upgrade",
]

_S = SessionRow.__table__
_T = TurnRow.__table__
_M = MediaRow.__table__
_TM = TurnMediaRow.__table__


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
class Memory:
    """Persistent conversations: sessions, their turns, and the media in and out of each turn.

    Thread-safe (each call uses its own pooled connection) and safe for several processes on
    one database. Open with `Memory.open`; close with `close()` or a ``with`` block.
    """

    def __init__(self, engine: Engine, blobs: BlobStore, data_dir: Path) -> None:
        self._engine = engine
        self._wengine = engine.execution_options(memory_write=True)
        self.blobs = blobs
        self.data_dir = data_dir

    # -- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        url: str | None = None,
        data_dir: Path | str | None = None,
        *,
        migrate: bool = True,
        echo: bool = False,
    ) -> Memory:
        """Open (creating if needed) the memory and upgrade its schema to the newest revision.

        ``url``: any SQLAlchemy URL; default ``sqlite:///<data_dir>/memory.db``.
        ``data_dir``: default ``$NEXTGPT_DATA`` or the platform user data dir; the blob store is
        always ``<data_dir>/blobs``.
        """
        ddir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        ddir.mkdir(parents=True, exist_ok=True)
        if url is None:
            url = f"sqlite:///{(ddir / 'memory.db').resolve()}"
        engine = _make_engine(url, echo=echo)  # str or sqlalchemy URL (str() hides passwords)
        try:
            if migrate:
                upgrade(engine)
            blobs = BlobStore(ddir / "blobs")
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, blobs, ddir)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tests and maintenance; prefer the methods)."""
        return self._engine

    @property
    def url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Memory({self.url!r}, blobs={str(self.blobs.root)!r})"

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._wengine.begin() as conn:
            yield conn

    # -- sessions -----------------------------------------------------------------------------
    def _resolve(self, conn: Connection, key: str) -> str:
        """Full session id for an id or unique id prefix; raises SessionNotFound."""
        k = str(key).strip().lower()
        if not k:
            raise SessionNotFound("empty session id", str(key))
        if conn.execute(select(_S.c.id).where(_S.c.id == k)).first() is not None:
            return k
        matches = list(
            conn.execute(
                select(_S.c.id).where(_S.c.id.startswith(k, autoescape=True)).order_by(_S.c.id)
                .limit(6)
            ).scalars()
        )
        if not matches:
            raise SessionNotFound(f"no session with id {key!r} in the memory at {self.url}", k)
        if len(matches) > 1:
            shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise AmbiguousSessionId(
                f"session id prefix {key!r} matches several sessions ({shown}); "
                "type more of the id", k, matches,
            )
        return matches[0]

    def _session_query(self):
        n = (
            select(func.count()).select_from(_T).where(_T.c.session_id == _S.c.id)
            .correlate(_S).scalar_subquery()
        )
        return select(
            _S.c.id, _S.c.title, _S.c.profile, n, _S.c.created_at, _S.c.updated_at
        ).order_by(_S.c.updated_at.desc(), _S.c.created_at.desc(), _S.c.id)

    @staticmethod
    def _session_info(row: Any) -> SessionInfo:
        return SessionInfo(row[0], row[1], row[2], int(row[3] or 0), row[4], row[5])

    def create_session(self, title: str | None = None, profile: str = "default") -> SessionInfo:
        """A new, empty session with a fresh random 8-hex-digit id."""
        for _ in range(10):
            sid = secrets.token_hex(4)
            now = utcnow()
            try:
                with self._write() as conn:
                    conn.execute(
                        insert(_S).values(
                            id=sid, title=title, profile=profile, created_at=now, updated_at=now
                        )
                    )
            except IntegrityError:  # id collision (1 in 4 billion per existing session)
                continue
            return SessionInfo(sid, title, profile, 0, now, now)
        raise RuntimeError("could not allocate a session id")

    def list_sessions(
        self, limit: int | None = None, *, profile: str | None = None
    ) -> list[SessionInfo]:
        """Sessions, most recently used first, with their turn counts."""
        q = self._session_query()
        if profile is not None:
            q = q.where(_S.c.profile == profile)
        if limit is not None:
            q = q.limit(limit)
        with self._read() as conn:
            return [self._session_info(r) for r in conn.execute(q)]

    def get_session(self, session_id: str) -> SessionInfo:
        """The session with this id or unique id prefix (`SessionNotFound` otherwise)."""
        with self._read() as conn:
            sid = self._resolve(conn, session_id)
            row = conn.execute(self._session_query().where(_S.c.id == sid)).one()
            return self._session_info(row)

    def last_session(self, *, profile: str | None = None) -> SessionInfo | None:
        """The most recently used session (optionally of one profile), or None."""
        found = self.list_sessions(1, profile=profile)
        return found[0] if found else None

    def rename_session(self, session_id: str, title: str | None) -> SessionInfo:
        with self._write() as conn:
            sid = self._resolve(conn, session_id)
            conn.execute(update(_S).where(_S.c.id == sid).values(title=title))
        return self.get_session(sid)

    def delete_session(self, session_id: str) -> SessionInfo:
        """Delete a session, its turns, and the blobs no other session references.

        Returns what was deleted.
        """
        info = self.get_session(session_id)
        with self._write() as conn:
            sid = self._resolve(conn, info.id)
            turn_ids = select(_T.c.id).where(_T.c.session_id == sid)
            shas = self._shas_of(conn, turn_ids)
            conn.execute(delete(_TM).where(_TM.c.turn_id.in_(turn_ids)))
            conn.execute(delete(_T).where(_T.c.session_id == sid))
            conn.execute(delete(_S).where(_S.c.id == sid))
            self._drop_unreferenced(conn, shas)
        return info

    # -- turns --------------------------------------------------------------------------------
    def add_turn(
        self,
        session_id: str,
        role: Role,
        text: str,
        *,
        token_trace: str | None = None,
        settings: dict[str, Any] | None = None,
        timings: dict[str, Any] | None = None,
        media: Iterable[MediaIn] = (),
        status: Literal["complete", "partial"] = "complete",
    ) -> TurnInfo:
        """Append one turn to a session, atomically, and mark the session as just used.

        Media bytes are put into the blob store first (copied, so the caller's files may be
        deleted afterwards); then the turn row, media rows and links are written in ONE
        transaction. A crash at any point leaves the whole turn or nothing (at worst an
        unreferenced blob, never a row pointing at missing bytes).

        The agent commits the user's turn on its own (``add_turn(sid, "user", ...)``) *before*
        generation starts, so the question survives a crash or Ctrl-C during generation; the
        assistant's turn is written only once generation is complete (or, with
        ``status="partial"``, when the caller chooses to keep an interrupted reply).
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        items = list(media)
        if items:  # fail before copying attachments into the store for a wrong id
            with self._read() as conn:
                session_id = self._resolve(conn, session_id)
        prepared = [self._prepare_media(m) for m in items]
        for attempt in range(3):
            try:
                return self._write_turn(
                    session_id, role, text, token_trace, settings, timings, status, items, prepared
                )
            except IntegrityError:
                # A concurrent delete removed a shared media row between our checks and our
                # insert (PostgreSQL); redo with the blobs put again.
                if attempt == 2:
                    raise
                prepared = [self._prepare_media(m) for m in items]
        raise AssertionError("unreachable")

    def _prepare_media(self, m: MediaIn) -> dict[str, Any]:
        mime = m.resolved_mime()
        modality = m.resolved_modality(mime)
        if m.path is not None:
            sha = self.blobs.put_file(m.path)
        elif m.data is not None:
            sha = self.blobs.put_bytes(m.data)
        else:
            sha = str(m.sha256).lower()
            if not self.blobs.has(sha):
                raise FileNotFoundError(f"no blob {sha} in {self.blobs.root}")
        size = self.blobs.path(sha).stat().st_size
        return {"sha256": sha, "mime": mime, "modality": modality, "size": size}

    def _reput(self, m: MediaIn, sha: str) -> None:
        """Make sure the blob is (still) there inside the write transaction."""
        if self.blobs.has(sha):
            return
        if m.path is not None:
            got = self.blobs.put_file(m.path)
        elif m.data is not None:
            got = self.blobs.put_bytes(m.data)
        else:
            raise FileNotFoundError(f"blob {sha} was deleted while the turn was being written")
        if got != sha:
            raise RuntimeError(f"attachment {m.path} changed while the turn was being written")

    def _write_turn(
        self, session_id, role, text_, token_trace, settings, timings, status, items, prepared
    ) -> TurnInfo:
        now = utcnow()
        # Store and return the JSON-normalized values, so that what add_turn returns equals
        # what turns() reads back later.
        settings, timings = _jsonable(settings), _jsonable(timings)
        metas = [_jsonable(m.meta) for m in items]
        with self._write() as conn:
            sid = str(session_id).strip().lower()
            if conn.execute(update(_S).where(_S.c.id == sid).values(updated_at=now)).rowcount != 1:
                sid = self._resolve(conn, session_id)
                conn.execute(update(_S).where(_S.c.id == sid).values(updated_at=now))
            idx = conn.execute(
                select(func.coalesce(func.max(_T.c.idx), -1) + 1).where(_T.c.session_id == sid)
            ).scalar_one()
            stored = self._insert_media_rows(conn, items, prepared, now)
            for m, p in zip(items, prepared):
                self._reput(m, p["sha256"])
            turn_id = conn.execute(
                insert(_T).values(
                    session_id=sid, idx=idx, role=role, text=text_, token_trace=token_trace,
                    settings=settings, timings=timings, status=status, created_at=now,
                )
            ).inserted_primary_key[0]
            links = [
                {
                    "turn_id": turn_id, "position": pos, "direction": m.direction,
                    "sha256": p["sha256"], "modality": p["modality"], "meta": meta,
                }
                for pos, (m, p, meta) in enumerate(zip(items, prepared, metas))
            ]
            if links:
                conn.execute(insert(_TM), links)
        infos = tuple(
            MediaInfo(
                sha256=p["sha256"], path=self.blobs.path(p["sha256"]),
                mime=stored[p["sha256"]][0], size=stored[p["sha256"]][1],
                modality=p["modality"], direction=m.direction, position=pos,
                width=stored[p["sha256"]][2], height=stored[p["sha256"]][3],
                frames=stored[p["sha256"]][4], duration=stored[p["sha256"]][5], meta=meta,
            )
            for pos, (m, p, meta) in enumerate(zip(items, prepared, metas))
        )
        return TurnInfo(
            id=turn_id, session_id=sid, index=idx, role=role, text=text_,
            token_trace=token_trace, settings=settings, timings=timings, status=status,
            created_at=now, media=infos,
        )

    def _insert_media_rows(
        self, conn: Connection, items, prepared, now: datetime
    ) -> dict[str, tuple[Any, ...]]:
        """Insert the media rows not stored yet; return every row's stored
        (mime, size, width, height, frames, duration) by sha256 (first writer wins)."""
        rows: dict[str, dict[str, Any]] = {}
        for m, p in zip(items, prepared):
            rows.setdefault(p["sha256"], {
                "sha256": p["sha256"], "mime": p["mime"], "size": p["size"], "width": m.width,
                "height": m.height, "frames": m.frames, "duration": m.duration, "created_at": now,
            })
        if not rows:
            return {}
        dialect = conn.dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as d_insert
            else:
                from sqlalchemy.dialects.postgresql import insert as d_insert
            conn.execute(d_insert(_M).on_conflict_do_nothing(index_elements=["sha256"]),
                         list(rows.values()))
        else:
            have = set(
                conn.execute(select(_M.c.sha256).where(_M.c.sha256.in_(list(rows)))).scalars()
            )
            new = [r for s, r in rows.items() if s not in have]
            if new:
                conn.execute(insert(_M), new)
        cols = (_M.c.sha256, _M.c.mime, _M.c.size, _M.c.width, _M.c.height, _M.c.frames,
                _M.c.duration)
        return {
            r[0]: tuple(r[1:])
            for r in conn.execute(select(*cols).where(_M.c.sha256.in_(list(rows))))
        }

    def turns(self, session_id: str, *, last: int | None = None) -> list[TurnInfo]:
        """The session's turns in order, each with its media in order (two queries in all).

        ``last``: only the last N turns.
        """
        with _gc_paused(), self._read() as conn:
            sid = self._resolve(conn, session_id)
            # JSON columns come back as text and are decoded in one json.loads per column
            # below (10,000 separate decodes would dominate the time of loading a session).
            # SQLite: read the timestamps as text and parse them in C (fromisoformat).
            raw_times = conn.dialect.name == "sqlite"
            created = type_coerce(_T.c.created_at, String) if raw_times else _T.c.created_at
            q = select(
                _T.c.id, _T.c.idx, _T.c.role, _T.c.text, _T.c.token_trace,
                cast(_T.c.settings, Text), cast(_T.c.timings, Text), _T.c.status, created,
            ).where(_T.c.session_id == sid)
            mq = (
                select(
                    _TM.c.turn_id, _TM.c.position, _TM.c.direction, _TM.c.modality,
                    cast(_TM.c.meta, Text),
                    _M.c.sha256, _M.c.mime, _M.c.size, _M.c.width, _M.c.height, _M.c.frames,
                    _M.c.duration,
                )
                .select_from(
                    _TM.join(_T, _T.c.id == _TM.c.turn_id).join(_M, _M.c.sha256 == _TM.c.sha256)
                )
                .where(_T.c.session_id == sid)
                .order_by(_TM.c.turn_id, _TM.c.position)
            )
            if last is not None:
                if last <= 0:
                    return []
                rows = conn.execute(q.order_by(_T.c.idx.desc()).limit(last)).all()
                rows.reverse()
                if rows:
                    mq = mq.where(_T.c.idx >= rows[0][1])
            else:
                rows = conn.execute(q.order_by(_T.c.idx)).all()
            media_rows = conn.execute(mq).all() if rows else []
            return self._build_turns(sid, rows, media_rows, raw_times)

    def _build_turns(self, sid: str, rows: list[Any], media_rows: list[Any], raw_times: bool):
        path = self.blobs.path
        metas = _loads_many([r[4] for r in media_rows])
        by_turn: dict[int, list[MediaInfo]] = {}
        for r, meta in zip(media_rows, metas):
            by_turn.setdefault(r[0], []).append(
                MediaInfo(
                    sha256=r[5], path=path(r[5]), mime=r[6], size=r[7], modality=r[3],
                    direction=r[2], position=r[1], width=r[8], height=r[9], frames=r[10],
                    duration=r[11], meta=meta,
                )
            )
        settings = _loads_many([r[5] for r in rows])
        timings = _loads_many([r[6] for r in rows])
        if raw_times:
            fromiso = datetime.fromisoformat
            times = [fromiso(r[8] + "+00:00") for r in rows]
        else:
            times = [r[8] for r in rows]
        no_media: tuple[MediaInfo, ...] = ()
        return [
            TurnInfo(
                r[0], sid, r[1], r[2], r[3], r[4], st, tm, r[7], t,
                tuple(by_turn[r[0]]) if r[0] in by_turn else no_media,
            )
            for r, st, tm, t in zip(rows, settings, timings, times)
        ]

    def delete_last_turns(self, session_id: str, n: int = 1) -> int:
        """Delete the session's last ``n`` turns (undo / regenerate); returns how many went.

        Blobs only those turns referenced are deleted too.
        """
        if n <= 0:
            return 0
        with self._write() as conn:
            sid = self._resolve(conn, session_id)
            ids = list(
                conn.execute(
                    select(_T.c.id).where(_T.c.session_id == sid).order_by(_T.c.idx.desc()).limit(n)
                ).scalars()
            )
            if ids:
                self._delete_turn_ids(conn, ids)
        return len(ids)

    def clear_turns(self, session_id: str) -> int:
        """Delete every turn of the session (the session itself stays); returns how many."""
        with self._write() as conn:
            sid = self._resolve(conn, session_id)
            ids = list(conn.execute(select(_T.c.id).where(_T.c.session_id == sid)).scalars())
            if ids:
                self._delete_turn_ids(conn, ids)
        return len(ids)

    def _delete_turn_ids(self, conn: Connection, ids: list[int]) -> None:
        shas: set[str] = set()
        for chunk in _chunks(ids, 500):
            shas |= self._shas_of(conn, chunk)
            conn.execute(delete(_TM).where(_TM.c.turn_id.in_(chunk)))
            conn.execute(delete(_T).where(_T.c.id.in_(chunk)))
        self._drop_unreferenced(conn, shas)

    @staticmethod
    def _shas_of(conn: Connection, turn_ids: Any) -> set[str]:
        return set(
            conn.execute(select(_TM.c.sha256).where(_TM.c.turn_id.in_(turn_ids)).distinct())
            .scalars()
        )

    def _drop_unreferenced(self, conn: Connection, shas: set[str]) -> None:
        """Delete media rows (and blob files) among ``shas`` that no turn references any more.

        Runs inside the caller's write transaction, after its deletes: the files go just before
        the commit, while the write lock is held, so a concurrent `add_turn` (which re-checks
        its blobs inside its own transaction) can never end up pointing at a deleted file.
        """
        gone: list[str] = []
        for chunk in _chunks(sorted(shas), 500):
            gone += _delete_unreferenced_media(conn, chunk)
        for sha in gone:
            self.blobs.delete(sha)

    # -- export, maintenance ------------------------------------------------------------------
    def export(self, session_id: str) -> dict[str, Any]:
        """The session and all its turns as a JSON-able dict (times ISO 8601, paths as str)."""
        info = self.get_session(session_id)
        return {
            "format": "nextgpt-memory-export/1",
            "session": info.to_dict(),
            "turns": [t.to_dict() for t in self.turns(info.id)],
        }

    def gc(self, *, grace_seconds: float = 3600.0) -> dict[str, int]:
        """Remove media rows no turn references and blob files no media row references.

        Blob files younger than ``grace_seconds`` are kept (a concurrent `add_turn` may have
        put them and not committed yet). Also clears the blob store's temp dir of files older
        than the grace period. Returns counts.
        """
        cutoff = time.time() - grace_seconds
        with self._write() as conn:
            rows = _delete_unreferenced_media(conn, None)
            known = set(conn.execute(select(_M.c.sha256)).scalars())
            files = 0
            for sha in list(self.blobs):
                if sha in known:
                    continue
                p = self.blobs.path(sha)
                try:
                    if p.stat().st_mtime < cutoff:
                        p.unlink()
                        files += 1
                except FileNotFoundError:
                    pass
        for tmp in self.blobs.root.joinpath("tmp").glob("*"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except OSError:
                pass
        return {"media_rows": len(rows), "blob_files": files}


def _delete_unreferenced_media(conn: Connection, shas: Sequence[str] | None) -> list[str]:
    """Delete the media rows (among ``shas``, or all) that no turn references; return them."""
    cond = ~exists().where(_TM.c.sha256 == _M.c.sha256)
    if shas is not None:
        cond = _M.c.sha256.in_(list(shas)) & cond
    if conn.dialect.delete_returning:  # PostgreSQL; SQLite >= 3.35
        return list(conn.execute(delete(_M).where(cond).returning(_M.c.sha256)).scalars())
    gone = list(conn.execute(select(_M.c.sha256).where(cond)).scalars())
    for chunk in _chunks(gone, 500):
        conn.execute(delete(_M).where(_M.c.sha256.in_(chunk)))
    return gone


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many acyclic objects (a 10,000-turn session would
    otherwise trigger several full collections, doubling the load time)."""
    was_enabled = gc.isenabled()
    if was_enabled:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _loads_many(raws: Sequence[str | None]) -> list[Any]:
    """Decode many JSON texts (None for SQL NULL) with a single json.loads call."""
    if not raws:
        return []
    return json.loads("[" + ",".join("null" if r is None else r for r in raws) + "]")


def _jsonable(value: Any) -> Any:
    return None if value is None else json.loads(_json_dumps(value))


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
