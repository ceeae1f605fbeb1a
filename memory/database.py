"""The memory database: its engine (SQLite's pragmas and write locking, PostgreSQL's pool) and its
schema migrations (Alembic, shipped in ``memory/migrations``). See `memory.store` for the storage
rules; `Memory.open` calls `make_engine` and `upgrade`.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "nextgpt_memory_version"  # keep in sync with migrations/env.py
SQLITE_BUSY_TIMEOUT_S = 30.0


def default_data_dir() -> Path:
    """``$NEXTGPT_DATA`` if set, else the platform's user data dir for "nextgpt"."""
    env = os.environ.get("NEXTGPT_DATA")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("nextgpt", appauthor=False))


def _json_dumps(obj: Any) -> str:
    # default=str: an odd value in settings (a Path, a dtype) must not lose a finished turn.
    return json.dumps(obj, default=str, ensure_ascii=False)


def _make_engine(url: Any, *, echo: bool = False) -> Engine:
    u = make_url(url)
    kw: dict[str, Any] = {"echo": echo, "json_serializer": _json_dumps}
    if u.get_backend_name() == "sqlite":
        memory_db = u.database in (None, "", ":memory:") or u.query.get("mode") == "memory"
        kw["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        if memory_db:
            kw["poolclass"] = StaticPool
        engine = create_engine(u, **kw)
        _setup_sqlite(engine)
        return engine
    if u.get_backend_name() == "postgresql":
        kw["pool_pre_ping"] = True
    return create_engine(u, **kw)


def _set_wal(cur: Any, timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> None:
    """Put the database in WAL mode, waiting for other connections as a write would.

    Switching a database to WAL needs its exclusive lock, and while another connection holds the
    write lock of a database still in rollback mode (a fresh file that another process is creating
    the tables in), SQLite refuses at once with "database is locked" instead of calling the busy
    handler. So: nothing to do when the file is already in WAL (the mode is stored in it); else
    retry until the busy timeout.
    """
    deadline = time.monotonic() + timeout_s
    tries = 0
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            busy = "locked" in str(e) or "busy" in str(e)
            if not busy or time.monotonic() > deadline:
                raise
            tries += 1
            time.sleep(min(0.005 * tries, 0.1))


def _setup_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below emit BEGIN itself (pysqlite's own transaction
        # handling would defer it and cannot do BEGIN IMMEDIATE).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            _set_wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front (waiting up to the busy timeout), so that a
        # read-then-write transaction never fails half-way with SQLITE_BUSY.
        immediate = conn.get_execution_options().get("memory_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def alembic_config(url: str | None = None):
    """An alembic `Config` for the memory schema (no alembic.ini; works from any cwd).

    For developers: ``alembic.command.revision(alembic_config(url), "message",
    autogenerate=True)`` writes a new revision into ``memory/migrations/versions``.
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", str(url).replace("%", "%%"))
    return cfg


_REV_RE = re.compile(r"""^revision\b[^=\n]*=\s*["']([\w-]+)["']\s*$""", re.M)
_DOWN_RE = re.compile(r"""^down_revision\b[^=\n]*=\s*(?:None|["']([\w-]+)["'])\s*$""", re.M)


def _quick_head() -> str | None:
    """The head revision read straight from the version files (no alembic import: keeps
    `Memory.open` on an up-to-date database fast); None if the files are not a simple chain."""
    revs: dict[str, str | None] = {}
    for f in (MIGRATIONS_DIR / "versions").glob("*.py"):
        if f.name.startswith("__"):
            continue
        src = f.read_text(encoding="utf-8")
        r, d = _REV_RE.findall(src), _DOWN_RE.findall(src)
        if len(r) != 1 or len(d) != 1 or r[0] in revs:
            return None
        revs[r[0]] = d[0] or None
    heads = set(revs) - {d for d in revs.values() if d}
    return heads.pop() if len(heads) == 1 else None


def _head_revision() -> str:
    quick = _quick_head()
    if quick is not None:
        return quick
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"memory migrations have {len(heads)} heads: {heads}")
    return heads[0]


def _current_revisions(engine: Engine) -> list[str] | None:
    """The schema revision(s) stamped in the database; None if it has no version table."""
    with engine.connect() as conn:
        try:
            return list(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
        except DBAPIError:
            conn.rollback()
            return None


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (idempotent), in one transaction."""
    if revision == "head":
        head = _head_revision()
        current = _current_revisions(engine)
        if current == [head]:
            return
        if current:
            from alembic.script import ScriptDirectory

            script = ScriptDirectory.from_config(alembic_config())
            unknown = [r for r in current if r not in {s.revision for s in script.walk_revisions()}]
            if unknown:
                raise RuntimeError(
                    f"the memory database {engine.url.render_as_string(hide_password=True)} is at "
                    f"schema revision {', '.join(unknown)}, which this version of nextgpt does "
                    "not know (was it written by a newer version?)"
                )
    from alembic import command

    cfg = alembic_config()
    with engine.execution_options(memory_write=True).connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()
