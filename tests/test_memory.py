"""Tests of `memory`: sessions, turns, media, blobs, migrations, durability, LangChain history.

The core suite runs on SQLite and on PostgreSQL (a throwaway server from `tests/pg.py`;
skipped without PostgreSQL locally, a failure when $CI is set).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from memory import (
    AmbiguousSessionId,
    BlobStore,
    MediaIn,
    Memory,
    SessionNotFound,
)
from memory.database import _make_engine
from memory.store import VERSION_TABLE, _head_revision

try:  # `tests` may or may not be a package
    from tests.pg import postgres_server  # noqa: F401  (a fixture)
except ImportError:
    from pg import postgres_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

PNG_A = b"\x89PNG\r\n\x1a\n" + b"A" * 100
PNG_B = b"\x89PNG\r\n\x1a\n" + b"B" * 100
WAV = b"RIFF\x00\x00\x00\x00WAVEfmt " + b"\x01" * 64


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str | None:
    if request.param == "sqlite":
        return None  # the default: <data_dir>/memory.db
    return request.getfixturevalue("postgres_server").new_database()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def mem(db_url: str | None, data_dir: Path):
    m = Memory.open(db_url, data_dir=data_dir)
    yield m
    m.close()


def _count(mem: Memory, table: str) -> int:
    with mem.engine.connect() as conn:
        return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


# ---------------------------------------------------------------------------------------------
# sessions
# ---------------------------------------------------------------------------------------------
def test_sessions_create_list_get_prefix_rename_delete(mem: Memory):
    a = mem.create_session("first", profile="tiny")
    b = mem.create_session(None, profile="nextgpt-7b")
    assert len(a.id) == 8 and all(c in "0123456789abcdef" for c in a.id)
    assert a.id != b.id
    assert a.created_at.tzinfo is not None and a.created_at.utcoffset().total_seconds() == 0
    assert a.turn_count == 0 and b.title is None

    mem.add_turn(a.id, "user", "hello")
    listed = mem.list_sessions()
    assert [s.id for s in listed] == [a.id, b.id]  # a was used last
    assert listed[0].turn_count == 1 and listed[1].turn_count == 0
    assert listed[0].updated_at > listed[0].created_at
    assert mem.list_sessions(limit=1)[0].id == a.id
    assert [s.id for s in mem.list_sessions(profile="nextgpt-7b")] == [b.id]
    assert mem.last_session().id == a.id
    assert mem.last_session(profile="nextgpt-7b").id == b.id
    assert mem.last_session(profile="nope") is None

    got = mem.get_session(a.id)
    assert (got.id, got.title, got.profile, got.turn_count) == (a.id, "first", "tiny", 1)
    assert got.last_used == got.updated_at == listed[0].updated_at
    assert got.created_at == a.created_at
    # any unique prefix works, in any case, with stray spaces
    prefix = next(a.id[:n] for n in range(1, 9) if not b.id.startswith(a.id[:n]))
    assert mem.get_session(prefix).id == a.id
    assert mem.get_session(" " + a.id.upper() + " ").id == a.id
    assert [t.text for t in mem.turns(prefix)] == ["hello"]
    assert mem.add_turn(prefix, "assistant", "hi there").session_id == a.id
    assert [t.text for t in mem.turns(prefix)] == ["hello", "hi there"]

    renamed = mem.rename_session(prefix, "renamed")
    assert renamed.title == "renamed" and mem.get_session(a.id).title == "renamed"

    gone = mem.delete_session(prefix)
    assert gone.id == a.id
    assert [s.id for s in mem.list_sessions()] == [b.id]
    assert _count(mem, "turns") == 0
    with pytest.raises(SessionNotFound):
        mem.get_session(a.id)


def test_unknown_and_ambiguous_session_ids(mem: Memory):
    with pytest.raises(SessionNotFound) as e:
        mem.get_session("deadbeef")
    assert isinstance(e.value, KeyError)
    assert "no session with id 'deadbeef'" in str(e.value)
    for call in (
        lambda: mem.turns("deadbeef"),
        lambda: mem.add_turn("deadbeef", "user", "hi"),
        lambda: mem.add_turn("deadbeef", "user", "hi", media=[MediaIn(data=PNG_A, mime="image/png")]),
        lambda: mem.delete_session("deadbeef"),
        lambda: mem.delete_last_turns("deadbeef", 1),
        lambda: mem.rename_session("deadbeef", "x"),
        lambda: mem.export("deadbeef"),
        lambda: mem.get_session(""),
        lambda: mem.get_session("%"),
        lambda: mem.get_session("_"),
    ):
        with pytest.raises(SessionNotFound):
            call()
    assert _count(mem, "turns") == 0 and list(mem.blobs) == []

    # force two ids with a common prefix
    ids = ["abc00001", "abc00002"]
    with mem.engine.begin() as conn:
        for sid in ids:
            conn.execute(
                text("INSERT INTO sessions (id, title, profile, created_at, updated_at) "
                     "VALUES (:id, NULL, 'tiny', :t, :t)"),
                {"id": sid, "t": "2024-01-01 00:00:00"},
            )
    with pytest.raises(AmbiguousSessionId) as e:
        mem.get_session("abc")
    assert e.value.matches == ids and "abc00001" in str(e.value) and "more" in str(e.value)
    assert isinstance(e.value, SessionNotFound)
    assert mem.get_session("abc00002").id == "abc00002"


def test_sessions_default_location_from_env(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("NEXTGPT_DATA", str(tmp_path / "envdata"))
    with Memory.open() as m:
        m.create_session("x", "tiny")
        assert m.data_dir == tmp_path / "envdata"
        assert m.blobs.root == tmp_path / "envdata" / "blobs"
    assert (tmp_path / "envdata" / "memory.db").is_file()
    with Memory.open() as m:
        assert [s.title for s in m.list_sessions()] == ["x"]


# ---------------------------------------------------------------------------------------------
# turns and media
# ---------------------------------------------------------------------------------------------
def test_turns_in_order_with_media_in_and_out(mem: Memory, tmp_path: Path):
    s = mem.create_session("media", "tiny")
    photo = tmp_path / "photo.png"
    photo.write_bytes(PNG_A)
    settings = {
        "seed": 7, "steps": 50, "guidance": 7.5, "temperature": 1.0, "max_new_tokens": 246,
        "models": {"llm": {"id": "vicuna-7b", "revision": "v0"}}, "path": Path("/x"),
    }
    u = mem.add_turn(
        s.id, "user", "make it a video and describe this sound",
        media=[
            MediaIn(path=photo, direction="in", width=4, height=3),
            MediaIn(data=WAV, mime="audio/wav", direction="in", duration=1.5),
        ],
    )
    a = mem.add_turn(
        s.id, "assistant", "Here you go.",
        token_trace="Here you go. [VID0][VID1][VID2]",
        settings=settings,
        timings={"llm_s": 1.25, "video_s": 30.0},
        media=[
            MediaIn(data=PNG_B, mime="video/mp4", direction="out", width=64, height=48,
                    frames=24, duration=3.0, meta={"seed": 7}),
            MediaIn(data=PNG_A, mime="image/png", direction="out", meta={"seed": 8}),
        ],
    )
    mem.add_turn(s.id, "system", "note", status="partial")
    assert (u.index, a.index) == (0, 1)

    turns = mem.turns(s.id)
    assert [t.index for t in turns] == [0, 1, 2]
    assert [t.role for t in turns] == ["user", "assistant", "system"]
    assert [t.status for t in turns] == ["complete", "complete", "partial"]
    assert turns[0] == u and turns[1] == a  # what add_turn returns is what comes back
    t0, t1 = turns[0], turns[1]
    assert t0.created_at.tzinfo is not None and t0.created_at.utcoffset().total_seconds() == 0
    assert t1.token_trace == "Here you go. [VID0][VID1][VID2]"
    assert t1.settings["models"] == {"llm": {"id": "vicuna-7b", "revision": "v0"}}
    assert t1.settings["seed"] == 7 and t1.settings["path"] == "/x"  # odd values stored as str
    assert t1.timings == {"llm_s": 1.25, "video_s": 30.0}

    m_img, m_wav = t0.media
    assert (m_img.direction, m_img.modality, m_img.mime, m_img.position) == ("in", "image", "image/png", 0)
    assert (m_img.width, m_img.height, m_img.size) == (4, 3, len(PNG_A))
    assert (m_wav.modality, m_wav.mime, m_wav.duration, m_wav.position) == ("audio", "audio/wav", 1.5, 1)
    assert m_img.path.read_bytes() == PNG_A and m_wav.path.read_bytes() == WAV
    assert t0.media_in == t0.media and t0.media_out == ()

    m_vid, m_img2 = t1.media
    assert (m_vid.direction, m_vid.modality, m_vid.frames, m_vid.duration) == ("out", "video", 24, 3.0)
    assert (m_vid.width, m_vid.height, m_vid.meta) == (64, 48, {"seed": 7})
    assert m_img2.sha256 == m_img.sha256 and m_img2.meta == {"seed": 8}
    # the media row keeps the first-seen dims; PNG_A is stored once
    assert (m_img2.width, m_img2.height) == (4, 3)
    assert _count(mem, "media") == 3 and _count(mem, "turn_media") == 4

    assert [t.index for t in mem.turns(s.id, last=2)] == [1, 2]
    assert mem.turns(s.id, last=2)[0].media == t1.media
    assert mem.turns(s.id, last=0) == []
    assert mem.get_session(s.id).turn_count == 3


def test_bad_turn_arguments_write_nothing(mem: Memory, tmp_path: Path):
    s = mem.create_session("x", "tiny")
    with pytest.raises(ValueError):
        mem.add_turn(s.id, "robot", "hi")
    with pytest.raises(ValueError):
        mem.add_turn(s.id, "user", "hi", status="half")
    with pytest.raises(ValueError):
        MediaIn(data=b"x", path="y", mime="image/png")
    with pytest.raises(ValueError):
        mem.add_turn(s.id, "user", "hi", media=[MediaIn(data=b"x")])  # no mime
    with pytest.raises(FileNotFoundError):
        mem.add_turn(s.id, "user", "hi", media=[MediaIn(path=tmp_path / "missing.png")])
    assert mem.turns(s.id) == [] and _count(mem, "media") == 0


def test_blob_dedup_and_snapshot(mem: Memory, tmp_path: Path):
    s = mem.create_session("dedup", "tiny")
    original = tmp_path / "attachment.jpg"
    original.write_bytes(PNG_A)
    t1 = mem.add_turn(s.id, "user", "one", media=[MediaIn(path=original)])
    t2 = mem.add_turn(s.id, "user", "two", media=[MediaIn(data=PNG_A, mime="image/jpeg")])
    assert t1.media[0].sha256 == t2.media[0].sha256
    assert t1.media[0].mime == "image/jpeg"  # guessed from the suffix
    assert list(mem.blobs) == [t1.media[0].sha256]  # one file
    assert _count(mem, "media") == 1

    # the attachment was snapshotted: deleting or changing the original breaks nothing
    original.write_bytes(b"changed")
    original.unlink()
    (turn,) = mem.turns(s.id)[:1]
    assert turn.media[0].path.read_bytes() == PNG_A
    assert turn.media[0].path.parent.parent == mem.blobs.root
    # a later turn can reference stored content by digest alone
    t3 = mem.add_turn(s.id, "assistant", "again",
                      media=[MediaIn(sha256=t1.media[0].sha256, mime="image/jpeg", direction="out")])
    assert t3.media[0].path == t1.media[0].path


def test_delete_session_removes_only_unshared_blobs(mem: Memory):
    a = mem.create_session("a", "tiny")
    b = mem.create_session("b", "tiny")
    shared = mem.add_turn(a.id, "user", "x", media=[MediaIn(data=PNG_A, mime="image/png")])
    only_a = mem.add_turn(a.id, "assistant", "y",
                          media=[MediaIn(data=PNG_B, mime="image/png", direction="out"),
                                 MediaIn(data=WAV, mime="audio/wav", direction="out")])
    mem.add_turn(b.id, "user", "z", media=[MediaIn(data=PNG_A, mime="image/png")])
    sha_shared = shared.media[0].sha256
    sha_only = {m.sha256 for m in only_a.media}
    assert set(mem.blobs) == {sha_shared} | sha_only

    mem.delete_session(a.id)
    assert set(mem.blobs) == {sha_shared}
    assert all(not mem.blobs.has(s) for s in sha_only)
    assert _count(mem, "media") == 1 and _count(mem, "turn_media") == 1
    (tb,) = mem.turns(b.id)
    assert tb.media[0].path.read_bytes() == PNG_A

    mem.delete_session(b.id)
    assert list(mem.blobs) == [] and _count(mem, "media") == 0
    assert mem.list_sessions() == []


@pytest.mark.parametrize("given", ["data", "path"])
def test_a_delete_racing_add_turn_never_leaves_a_turn_without_its_file(mem: Memory, monkeypatch, tmp_path, given):
    """add_turn puts its blobs first, then writes the rows in one transaction. A delete_session that
    removes the same (shared) blob in between must not leave the new turn pointing at a missing
    file: add_turn checks its blobs again inside its transaction and puts them back."""
    a = mem.create_session("a", "tiny")
    b = mem.create_session("b", "tiny")
    mem.add_turn(a.id, "user", "first", media=[MediaIn(data=PNG_A, mime="image/png")])
    real_prepare, raced = mem._prepare_media, []

    def prepare_then_race(m):
        out = real_prepare(m)
        if not raced:  # another process deletes the blob's only other user, right now
            raced.append(mem.delete_session(a.id))
            assert not mem.blobs.has(out["sha256"])
        return out

    monkeypatch.setattr(mem, "_prepare_media", prepare_then_race)
    src = tmp_path / "mine.png"
    src.write_bytes(PNG_A)
    media = MediaIn(data=PNG_A, mime="image/png") if given == "data" else MediaIn(path=src, mime="image/png")
    mem.add_turn(b.id, "user", "second", media=[media])
    assert raced  # the race happened
    (turn,) = mem.turns(b.id)
    assert turn.media[0].path.read_bytes() == PNG_A


def test_blob_gc_without_delete_returning(tmp_path: Path, monkeypatch):
    """Old SQLite (< 3.35) has no DELETE ... RETURNING: the select-then-delete path."""
    with Memory.open(data_dir=tmp_path) as mem:
        s = mem.create_session("old", "tiny")
        mem.add_turn(s.id, "user", "a", media=[MediaIn(data=PNG_A, mime="image/png")])
        mem.add_turn(s.id, "user", "b", media=[MediaIn(data=PNG_B, mime="image/png")])
        keep = mem.create_session("keep", "tiny")
        mem.add_turn(keep.id, "user", "a", media=[MediaIn(data=PNG_A, mime="image/png")])
        monkeypatch.setattr(mem.engine.dialect, "delete_returning", False)
        mem.delete_session(s.id)
        (only,) = list(mem.blobs)
        assert mem.blobs.read_bytes(only) == PNG_A and _count(mem, "media") == 1


def test_delete_last_turns_and_clear(mem: Memory):
    s = mem.create_session("undo", "tiny")
    for i in range(4):
        mem.add_turn(s.id, "user" if i % 2 == 0 else "assistant", f"t{i}",
                     media=[MediaIn(data=bytes([i]) * 10, mime="image/png",
                                    direction="in" if i % 2 == 0 else "out")])
    assert mem.delete_last_turns(s.id, 2) == 2
    assert [t.text for t in mem.turns(s.id)] == ["t0", "t1"]
    assert len(list(mem.blobs)) == 2 and _count(mem, "media") == 2
    t = mem.add_turn(s.id, "user", "again")
    assert t.index == 2
    assert mem.delete_last_turns(s.id, 0) == 0
    assert mem.delete_last_turns(s.id, 10) == 3
    assert mem.turns(s.id) == [] and list(mem.blobs) == []
    mem.add_turn(s.id, "user", "fresh")
    assert mem.clear_turns(s.id) == 1 and mem.turns(s.id) == []
    assert mem.get_session(s.id).turn_count == 0


def test_concurrent_writers_get_distinct_indexes(mem: Memory):
    s = mem.create_session("threads", "tiny")
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(10):
                mem.add_turn(s.id, "user", f"{k}-{i}",
                             media=[MediaIn(data=PNG_A, mime="image/png")])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    turns = mem.turns(s.id)
    assert [t.index for t in turns] == list(range(40))
    assert sorted(t.text for t in turns) == sorted(f"{k}-{i}" for k in range(4) for i in range(10))


def test_export_is_json_able(mem: Memory):
    s = mem.create_session("export", "tiny")
    mem.add_turn(s.id, "user", "hi", media=[MediaIn(data=PNG_A, mime="image/png", width=2, height=2)])
    mem.add_turn(s.id, "assistant", "hello", token_trace="hello [IMG0]",
                 settings={"seed": 1}, timings={"total_s": 0.5})
    data = mem.export(s.id[:5])
    round_tripped = json.loads(json.dumps(data))
    assert round_tripped == data
    assert data["session"]["id"] == s.id and data["session"]["turn_count"] == 2
    assert [t["role"] for t in data["turns"]] == ["user", "assistant"]
    media = data["turns"][0]["media"][0]
    assert media["mime"] == "image/png" and Path(media["path"]).read_bytes() == PNG_A
    assert data["turns"][1]["settings"] == {"seed": 1}


# ---------------------------------------------------------------------------------------------
# migrations
# ---------------------------------------------------------------------------------------------
def test_migrations_create_schema_and_open_is_idempotent(db_url: str | None, data_dir: Path):
    url = db_url or f"sqlite:///{data_dir / 'memory.db'}"
    data_dir.mkdir(parents=True)
    engine = create_engine(url)
    try:
        assert inspect(engine).get_table_names() == []  # empty database

        with Memory.open(db_url, data_dir=data_dir) as m:
            tables = set(inspect(m.engine).get_table_names())
            assert {"sessions", "turns", "media", "turn_media", VERSION_TABLE} <= tables
            s = m.create_session("keep", "tiny")
            m.add_turn(s.id, "user", "still here")

        for _ in range(2):  # reopening changes nothing
            with Memory.open(db_url, data_dir=data_dir) as m:
                assert [t.text for t in m.turns(s.id)] == ["still here"]

        with engine.connect() as conn:
            versions = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
            assert versions == [_head_revision()]

            # the migrations produce exactly what the models describe
            from alembic.autogenerate import compare_metadata
            from alembic.migration import MigrationContext

            from memory.models import Base

            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "version_table": VERSION_TABLE}
            )
            assert compare_metadata(ctx, Base.metadata) == []
        idx = {i["name"] for i in inspect(engine).get_indexes("turn_media")}
        assert "ix_turn_media_sha256" in idx
    finally:
        engine.dispose()


def test_database_from_a_newer_version_is_refused(tmp_path: Path):
    with Memory.open(data_dir=tmp_path) as mem:
        with mem.engine.begin() as conn:
            conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'f00dcafe'"))
    with pytest.raises(RuntimeError, match="f00dcafe.*newer version"):
        Memory.open(data_dir=tmp_path)


def test_in_memory_sqlite_url(tmp_path: Path):
    with Memory.open("sqlite://", data_dir=tmp_path) as mem:
        s = mem.create_session("ram", "tiny")
        mem.add_turn(s.id, "user", "hi", media=[MediaIn(data=PNG_A, mime="image/png")])
        assert [t.text for t in mem.turns(s.id)] == ["hi"]
    assert not (tmp_path / "memory.db").exists() and (tmp_path / "blobs").is_dir()


def test_migrations_head_found_without_alembic_matches_alembic():
    from alembic.script import ScriptDirectory

    from memory.store import _quick_head, alembic_config

    assert _quick_head() == ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_import_is_light():
    code = (
        "import sys, memory, memory.store, memory.blobs, memory.models\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'nextgpt', 'tools', 'assistant', 'bots', 'langchain_core', 'alembic')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------
# durability: kill -9 in the middle of writing the assistant's turn (SQLite)
# ---------------------------------------------------------------------------------------------
_CHILD = r"""
import sys, time
from sqlalchemy import event
from memory import Memory, MediaIn

mem = Memory.open(data_dir=sys.argv[1])
s = mem.create_session("crash", "tiny")
mem.add_turn(s.id, "user", "draw a cat", media=[MediaIn(data=b"user-bytes", mime="image/png")])

@event.listens_for(mem.engine, "before_cursor_execute")
def pause(conn, cursor, statement, params, context, executemany):
    # the assistant's turn row and media row are written, its links are next: stop here
    if "INSERT INTO turn_media" in statement:
        print("PAUSED", s.id, flush=True)
        time.sleep(600)

big = "meow " * (2 << 20)  # ~10 MB: more than SQLite's page cache, so pages spill to the WAL
mem.add_turn(s.id, "assistant", big, token_trace=big + " [IMG0]", settings={"seed": 1},
             media=[MediaIn(data=b"assistant-bytes", mime="image/png", direction="out")])
print("COMMITTED", flush=True)
"""


def test_kill_9_mid_turn_leaves_complete_turns_only(tmp_path: Path):
    data_dir = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=tmp_path,  # not the repo: migrations must be found from any cwd
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("PAUSED") or not line:
                break
        assert line.startswith("PAUSED"), f"child did not pause: {line!r} {proc.stderr.read()}"
        sid = line.split()[1]
        wal = data_dir / "memory.db-wal"
        assert wal.stat().st_size > 4 << 20  # uncommitted pages of the big turn hit the disk
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    with Memory.open(data_dir=data_dir) as mem:
        (s,) = mem.list_sessions()
        assert (s.id, s.title, s.turn_count) == (sid, "crash", 1)
        (t,) = mem.turns(sid)
        assert (t.role, t.text, t.status) == ("user", "draw a cat", "complete")
        assert t.media[0].path.read_bytes() == b"user-bytes"
        assert _count(mem, "turns") == 1 and _count(mem, "media") == 1
        assert _count(mem, "turn_media") == 1
        with mem.engine.connect() as conn:
            assert conn.execute(text("PRAGMA integrity_check")).scalar_one() == "ok"
            assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
        # the assistant's blob was put before its transaction: an orphan at worst, and gc'able
        assert len(list(mem.blobs)) == 2
        assert mem.gc(grace_seconds=0) == {"media_rows": 0, "blob_files": 1}
        assert [m.read_bytes() for m in (mem.turns(sid)[0].media[0].path,)] == [b"user-bytes"]
        # and the database is writable again (no stale lock)
        assert mem.add_turn(sid, "assistant", "a cat").index == 1


_RACE_CHILD = r"""
import sys
from memory import Memory, MediaIn
with Memory.open(data_dir=sys.argv[1]) as mem:
    s = mem.create_session(sys.argv[2], "tiny")
    for i in range(10):
        mem.add_turn(s.id, "user", str(i), media=[MediaIn(data=b"same", mime="image/png")])
"""


def test_processes_opening_a_fresh_database_at_once(tmp_path: Path):
    data_dir = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACE_CHILD, str(data_dir), f"p{k}"],
                         env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        for k in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with Memory.open(data_dir=data_dir) as mem:
        sessions = mem.list_sessions()
        assert sorted(s.title for s in sessions) == ["p0", "p1", "p2"]
        assert all(s.turn_count == 10 for s in sessions)
        assert len(list(mem.blobs)) == 1


def test_opening_while_another_connection_creates_the_tables(tmp_path: Path):
    # The race behind a rare "database is locked" when processes open a fresh database at once:
    # while one connection holds the write lock of a file still in rollback mode, SQLite refuses
    # the switch to WAL at once (no busy wait). Opening must wait for it instead, like a write.
    import sqlite3

    db = tmp_path / "memory.sqlite"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    t0 = time.monotonic()
    engine = _make_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        rows = conn.exec_driver_sql("SELECT x FROM t").all()
    engine.dispose()
    other.close()
    assert mode == "wal" and rows == [(1,)]
    assert time.monotonic() - t0 >= 0.4  # it waited for the other writer


# ---------------------------------------------------------------------------------------------
# blob store
# ---------------------------------------------------------------------------------------------
def test_blob_store_basics(tmp_path: Path):
    store = BlobStore(tmp_path / "blobs")
    sha = store.put_bytes(b"hello")
    assert sha == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert store.path(sha) == tmp_path / "blobs" / "2c" / sha[2:]
    assert store.has(sha) and sha in store and store.read_bytes(sha) == b"hello"
    f = tmp_path / "f.bin"
    f.write_bytes(b"hello")
    assert store.put_file(f) == sha and list(store) == [sha]
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []  # no temp files left behind
    assert store.delete(sha) and not store.has(sha) and not store.delete(sha)
    for bad in ("../../etc/passwd", "ab", "G" * 64):
        with pytest.raises(ValueError):
            store.path(bad)
        assert bad not in store


# ---------------------------------------------------------------------------------------------
# LangChain history
# ---------------------------------------------------------------------------------------------
def test_langchain_history_round_trip(mem: Memory, tmp_path: Path):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from memory.history import MemoryChatHistory

    s = mem.create_session("lc", "tiny")
    photo = tmp_path / "cat.png"
    photo.write_bytes(PNG_A)
    history = MemoryChatHistory(mem, s.id[:6])
    assert history.messages == []
    history.add_messages([
        SystemMessage(content="be nice"),
        HumanMessage(content=[
            {"type": "text", "text": "what is this?"},
            {"type": "image", "url": photo.as_uri(), "mime_type": "image/png"},
        ]),
        AIMessage(
            content=[
                {"type": "text", "text": "a cat; here is a sound"},
                {"type": "audio", "base64": "UklGRg==", "mime_type": "audio/wav"},
            ],
            response_metadata={"token_trace": "a cat [AUD0]", "settings": {"seed": 3}},
        ),
    ])
    history.add_user_message("thanks")
    photo.unlink()  # snapshotted

    msgs = history.messages
    assert [type(m) for m in msgs] == [SystemMessage, HumanMessage, AIMessage, HumanMessage]
    assert msgs[0].content == "be nice" and msgs[3].content == "thanks"
    text_block, image = msgs[1].content
    assert text_block == {"type": "text", "text": "what is this?"}
    assert image["type"] == "image" and image["mime_type"] == "image/png"
    assert image["url"].startswith("file://") and "base64" not in image
    assert Path(image["url"][len("file://"):]).read_bytes() == PNG_A
    assert image["file_id"] == mem.turns(s.id)[1].media[0].sha256
    assert image["extras"]["direction"] == "in"
    assert msgs[1].content_blocks[1]["type"] == "image"  # valid v1 standard blocks
    audio = msgs[2].content[1]
    assert audio["type"] == "audio" and audio["extras"]["direction"] == "out"
    assert Path(audio["url"][len("file://"):]).read_bytes() == b"RIFF"
    assert msgs[2].response_metadata["token_trace"] == "a cat [AUD0]"
    assert msgs[2].response_metadata["settings"] == {"seed": 3}

    # the messages go back in unchanged (media by file_id, no copy of the bytes)
    other = MemoryChatHistory(mem, mem.create_session("copy", "tiny").id)
    other.add_messages(msgs)
    copied = other.messages
    assert [m.content for m in copied] == [m.content for m in msgs]
    assert len(list(mem.blobs)) == 2

    history.clear()
    assert history.messages == [] and mem.get_session(s.id).turn_count == 0
    assert len(other.messages) == 4
    with pytest.raises(ValueError):
        other.add_messages([HumanMessage(content=[
            {"type": "image", "url": "https://example.com/cat.png"}])])
    assert len(other.messages) == 4
    with pytest.raises(SessionNotFound):
        MemoryChatHistory(mem, "ffffffff0")
