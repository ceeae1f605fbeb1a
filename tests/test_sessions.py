"""Conversations that persist: ask logs to memory, sessions/export/replay/delete, context, durability."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bots.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_ask_logs_unless_no_log(data_dir, capsys, media_files):
    assert main(["ask", "--profile", "tiny", "--seed", "1", "--json", "-a", str(media_files["red.png"]), "--want", "image", "hello"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["session"]
    assert main(["ask", "--profile", "tiny", "--no-log", "--json", "not saved"]) == 0
    assert json.loads(capsys.readouterr().out)["session"] is None
    assert main(["sessions", "--json"]) == 0
    sessions = json.loads(capsys.readouterr().out)
    assert [s["id"] for s in sessions] == [out["session"]]
    assert sessions[0]["turn_count"] == 2 and sessions[0]["title"] == "hello"


def test_attachment_is_snapshotted(chat, media_files, tmp_path):
    src = tmp_path / "mine.png"
    src.write_bytes(media_files["red.png"].read_bytes())
    chat.attach(src)
    chat.send("what is this?", want=["image"])
    src.unlink()  # deleting the original breaks nothing
    user, assistant = chat.history()
    (snap,) = user.media_in
    assert snap.path.is_file() and snap.path.read_bytes() == media_files["red.png"].read_bytes()
    assert assistant.media_out and assistant.media_out[0].modality == "image"
    assert assistant.settings["seed"] is not None and assistant.settings["versions"]["torch"]
    assert "[IMG0]" in assistant.token_trace


def test_context_carries_earlier_media_and_truncates(chat, media_files):
    chat.attach(media_files["beep.wav"])
    chat.send("listen", want=["image"])
    chat.send("make it blue")
    messages = chat.context(chat.history())
    roles = [m.role for m in messages]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert [i.modality for i in messages[0].media] == ["audio"]
    # the reply is its trace (words + signal tokens), as stage 3 trains it; its own outputs are not fed back
    assert messages[1].media == [] and "[IMG0]" in messages[1].text
    chat.context_tokens = chat.assistant.profile.generation.max_new_tokens + 60
    kept = chat.context(chat.history())
    assert kept and kept[0].role == "user" and len(kept) < len(messages)
    assert kept[-1].text == messages[-1].text


def test_cached_chat_replies_like_an_uncached_one(tiny_assistant, memory, media_files):
    """The per-chat KV cache changes no reply: turn by turn (media in and out, a regenerate, then
    the oldest turns dropped by truncation), a chat with its cache says exactly what a chat
    without one says, and pays prefill only for what follows the shared prefix."""
    from assistant.session import Chat

    cached, fresh = Chat.start(tiny_assistant, memory), Chat.start(tiny_assistant, memory)
    fresh.use_cache = False
    both = (cached, fresh)
    for c in both:
        c.settings.seed, c.settings.max_new_tokens = 5, 8

    def step(action) -> tuple:
        a, b = (action(c) for c in both)
        # the same tokens; media only alike (the signal states agree to float noise, not bit for bit)
        assert a.trace == b.trace and [m.modality for m in a.media] == [m.modality for m in b.media]
        return a, b

    for c in both:
        c.attach(media_files["red.png"])
    a, _ = step(lambda c: c.send("what is this?", want=["image"]))
    for text, want in (("make it blue", ["image"]), ("now a sound", ["audio"]), ("thanks", [])):
        previous = a.timings["prompt_tokens"]
        a, b = step(lambda c: c.send(text, want=want))
        # the whole previous prompt came from the cache (but maybe its last token, which the
        # reply's first can merge with; the tiny model's byte soup may not re-tokenise as generated)
        assert a.timings["prompt_tokens"] - a.timings["prefill_tokens"] >= previous - 1
        assert b.timings["prefill_tokens"] == b.timings["prompt_tokens"]
    a, _ = step(lambda c: c.regenerate(reseed=True))
    assert a.timings["prefill_tokens"] < 5  # the same prompt: only its last position is fed again
    step(lambda c: c.send("one more"))
    for c in both:  # now only the last exchanges fit: the oldest turns are dropped
        c.context_tokens = c.settings.max_new_tokens + 120
    a, _ = step(lambda c: c.send("and the last one"))
    assert len(cached.context(cached.history())) < len(cached.history())
    assert a.timings["prefill_tokens"] > a.timings["prompt_tokens"] // 2  # a new prefix: recomputed
    step(lambda c: c.send("after truncation"))


def test_regenerate_replaces_the_last_reply(chat):
    first = chat.send("a red circle", want=["image"])
    again = chat.regenerate(reseed=True)
    turns = chat.history()
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[-1].settings["seed"] == first.seed + 1 == again.seed
    assert turns[-1].settings["want"] == ["image"]


def test_export_formats(chat, memory, tmp_path, media_files):
    chat.attach(media_files["red.png"])
    chat.send("draw", want=["image", "audio"])
    from bots.export import export_session

    html = export_session(memory, chat.session.id, "html", tmp_path / "s.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "data:audio/wav;base64," in html
    assert "file://" not in html
    md = export_session(memory, chat.session.id, "md", tmp_path / "s.md").read_text()
    assert "**You**" in md and "image attached" in md and "image generated" in md and "audio generated" in md
    data = json.loads(export_session(memory, chat.session.id, "json", tmp_path / "s.json").read_text())
    assert [t["role"] for t in data["turns"]] == ["user", "assistant"]
    with pytest.raises(ValueError, match="unknown export format 'pdf'"):
        export_session(memory, chat.session.id, "pdf")


def test_replay_rerun_identical_then_detects_a_change(chat, memory, capsys, media_files):
    chat.settings.seed = 11
    chat.attach(media_files["red.png"])
    chat.send("first", want=["image"])
    chat.settings.seed = 12
    chat.send("second", want=["audio"])
    sid = chat.session.id
    assert main(["replay", sid]) == 0
    shown = capsys.readouterr().out
    assert "first" in shown and "second" in shown and "image: " in shown and "audio: " in shown
    assert main(["replay", sid, "--rerun"]) == 0
    assert "every turn identical" in capsys.readouterr().out
    # tamper with the record: the rerun must notice
    from sqlalchemy import text

    with memory.engine.begin() as conn:
        conn.execute(text("UPDATE turns SET token_trace = 'something else' WHERE role = 'assistant' AND idx = 1"))
    assert main(["replay", sid, "--rerun"]) == 1
    assert "some turns differ" in capsys.readouterr().out


def test_delete_and_unknown_session(chat, memory, capsys):
    chat.send("bye", want=["image"])
    sid = chat.session.id
    blobs = [m.path for t in chat.history() for m in t.media]
    assert main(["delete", sid]) == 0
    assert not any(p.exists() for p in blobs)
    assert main(["replay", sid]) == 2
    assert "no session" in capsys.readouterr().err.lower()


def test_kill_9_mid_reply_keeps_the_question(tmp_path, data_dir):
    """A real `nextgpt ask` process is killed while decoding; the user's turn survives intact."""
    from memory import Memory

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["profiles"]["tiny"]["decoders"]["video"]["steps"] = 500  # a long denoise to kill it in
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bots.cli", "--config", str(cfg), "ask", "--profile", "tiny", "--want", "video", "the question"],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        memory = Memory.open(data_dir=data_dir)
        deadline = time.time() + 240
        while time.time() < deadline:
            sessions = memory.list_sessions()
            if sessions and sessions[0].turn_count >= 1:
                break
            assert proc.poll() is None, "ask finished before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("the user turn never appeared")
        time.sleep(1.0)  # well into generation / denoising
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    memory = Memory.open(data_dir=data_dir)
    (session,) = memory.list_sessions()
    turns = memory.turns(session.id)
    assert [(t.role, t.text) for t in turns] == [("user", "the question")]
    with memory.engine.connect() as conn:
        from sqlalchemy import text

        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"


def test_truncation_keeps_its_cut_so_later_turns_reuse_the_cache(tiny_assistant, memory):
    """A long chat over its budget drops oldest turns down to ¾ of it and then keeps that start:
    the next turns are prefilled from the cache, not in full."""
    from assistant.session import Chat

    chat = Chat.start(tiny_assistant, memory)
    chat.settings.seed, chat.settings.max_new_tokens = 3, 6
    for i in range(10):
        chat.send(f"turn number {i} with a few words")
    full = sum(len(m.text) for m in chat.context(chat.history()))
    chat.context_tokens = chat.settings.max_new_tokens + int(full * 0.8)  # bytes ≈ tokens for the tiny model
    cut = chat.send("over the budget now")  # the first drop: the prompt changes at its start
    kept = len(chat.context(chat.history()))
    assert kept < len(chat.history())
    assert cut.timings["prefill_tokens"] > cut.timings["prompt_tokens"] // 2
    reused = 0
    for i in range(3):
        r = chat.send(f"short {i}")
        assert len(chat.context(chat.history())) < len(chat.history())
        if r.timings["prefill_tokens"] < r.timings["prompt_tokens"] // 2:
            reused += 1
    assert reused >= 2, "the turns after a cut should mostly come from the cache"
    # (the ¾ share itself: tests/test_context_budget.py, which counts what is kept)


def test_a_session_whose_attachment_file_is_gone_keeps_working(chat, media_files):
    """A blob removed by hand (disk cleanup, a bad restore) no longer fails every later turn."""
    chat.attach(media_files["red.png"])
    chat.send("what is this?")
    (snap,) = chat.history()[0].media_in
    snap.path.unlink()
    reply = chat.send("and now?")
    assert reply.text is not None
    first = chat.context(chat.history())[0]
    assert first.media == [] and "missing" in first.text
