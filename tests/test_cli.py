"""The real `nextgpt` command in a subprocess: one-shot ask, JSON output, bad attachments, doctor."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest


def nextgpt(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY") and k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    return subprocess.run(
        [sys.executable, "-m", "bots.cli", *args], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_ask_json_with_image(tmp_path):
    r = nextgpt("ask", "--profile", "tiny", "--want", "image", "--json", "--seed", "1", "--out", str(tmp_path), "a red circle")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out["text"], str)
    images = [m for m in out["media"] if m["modality"] == "image"]
    assert images and images[0]["mime"] == "image/png"
    png = Path(images[0]["path"])
    assert png.is_file() and png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "red" not in png.name and "circle" not in png.name  # named by content, not prompt
    # no library chatter (progress bars, transformers' notices, a dependency's FutureWarning) on the terminal
    assert r.stderr == ""


@pytest.mark.slow
def test_ask_plain_output_with_attachment(tmp_path, media_files):
    r = nextgpt("ask", "--profile", "tiny", "-a", str(media_files["red.png"]), "--want", "audio", "--out", str(tmp_path), "--seed", "2", "what is it?")
    assert r.returncode == 0, r.stderr
    audio_lines = [line for line in r.stdout.splitlines() if line.startswith("audio: ")]
    assert audio_lines and Path(audio_lines[0].split()[1]).is_file()


def _bomb_png(path: Path, side: int = 30000):
    """A tiny file whose header claims side×side pixels (a decompression bomb)."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize(
    "make, needle",
    [
        (None, "no such file"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("just some words, not media"), "unsupported file type"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10), "corrupt"),
        (_bomb_png, "too large"),
    ],
    ids=["missing", "empty", "wrong-type", "corrupt", "bomb"],
)
def test_bad_attachments_exit_with_one_line(tmp_path, make, needle):
    f = tmp_path / "attachment.png"
    if make:
        make(f)
    r = nextgpt("ask", "--profile", "tiny", "-a", str(f), "describe")
    _assert_one_line_error(r, "attachment.png", needle)
    assert r.returncode == 2


def test_oversized_attachment(media_files):
    from nextgpt.media import AttachmentError, validate_attachment

    with pytest.raises(AttachmentError, match="beep.wav"):
        validate_attachment(media_files["beep.wav"], max_bytes=100)


def test_bad_config_and_profile_are_one_line_errors(tmp_path):
    _assert_one_line_error(nextgpt("ask", "--profile", "nope", "hi"), "unknown profile 'nope'")
    bad = tmp_path / "config.yaml"
    bad.write_text("default_profile: tiny\nprofiles: {}\nbogus: 1\n")
    r = nextgpt("--config", str(bad), "doctor")
    assert r.returncode == 2 and "bogus: unknown key" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_commands():
    r = nextgpt("--help")
    assert r.returncode == 0
    for command in ("ask", "doctor", "convert"):
        assert command in r.stdout


def test_doctor_reports_profiles():
    r = nextgpt("doctor", "--profile", "tiny")
    assert r.returncode == 0, r.stderr
    assert "profile: tiny" in r.stdout and "decoder video" in r.stdout
    big = nextgpt("doctor", "--profile", "nextgpt-7b")
    assert big.returncode == 1  # nothing of the 7B stack is present here
    assert "MISSING" in big.stdout and "cerspense/zeroscope_v2_576w" in big.stdout


@pytest.mark.slow
def test_same_seed_gives_the_same_text_and_byte_identical_media_across_processes(tmp_path):
    """README: `--seed N`: the same seed gives the same text and byte-identical media (two separate
    processes, every modality); another seed, other media."""
    def ask(seed, out):
        r = nextgpt("ask", "--profile", "tiny", "--want", "image", "--want", "audio", "--want", "video", "--json",
                    "--no-log", "--seed", str(seed), "--out", str(tmp_path / out), "a red circle that beeps")
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        files = {m["modality"]: Path(m["path"]).read_bytes() for m in reply["media"]}
        return reply["text"], files

    text1, files1 = ask(7, "a")
    text2, files2 = ask(7, "b")
    assert set(files1) == {"image", "audio", "video"}
    assert text2 == text1 and files2 == files1  # byte for byte
    _, other = ask(8, "c")
    assert all(other[m] != files1[m] for m in files1)


def test_a_failing_decoder_is_named_in_json_errors_and_on_stderr(tmp_path, capsys):
    """README: a decoder that fails does not lose the text reply; the failure is named (stderr;
    `errors` in JSON). A real failure: the video decoder's weights are not where the config says."""
    import yaml

    from bots.cli import main

    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "config.yaml").read_text())
    cfg["profiles"]["tiny"]["decoders"]["video"]["source"] = str(tmp_path / "no-such-pipeline")
    broken = tmp_path / "config.yaml"
    broken.write_text(yaml.safe_dump(cfg))
    args = ["--config", str(broken), "ask", "--profile", "tiny", "--want", "video", "--want", "image", "--seed", "1",
            "--no-log", "--out", str(tmp_path / "out")]
    assert main([*args, "--json", "a clip and a picture"]) == 0
    out, err = capsys.readouterr()
    reply = json.loads(out)
    assert [m["modality"] for m in reply["media"]] == ["image"] and isinstance(reply["text"], str)
    [error] = reply["errors"]
    assert error.startswith("video decoder (VideoTool) failed: ") and "no-such-pipeline" in error
    assert main([*args, "--no-stream", "a clip and a picture"]) == 0
    out, err = capsys.readouterr()
    assert any(line.startswith("image: ") for line in out.splitlines())
    [warning] = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warning.startswith("warning: the video decoder (VideoTool) failed: ") and "no-such-pipeline" in warning


def test_ask_continue_drives_a_three_turn_edit(tmp_path, monkeypatch):
    """`ask -c` continues the last session and `--session ID` a given one: the earlier turns are the
    context, the JSON output is unchanged (`session` names the session)."""
    monkeypatch.setenv("NEXTGPT_DATA", str(tmp_path / "data"))
    first = nextgpt("ask", "-p", "tiny", "--json", "--seed", "1", "--want", "image", "--out", str(tmp_path), "draw a red circle")
    assert first.returncode == 0, first.stderr
    sid = json.loads(first.stdout)["session"]
    second = nextgpt("ask", "-p", "tiny", "--json", "--seed", "2", "-c", "--want", "image", "--out", str(tmp_path), "now make it blue")
    assert second.returncode == 0, second.stderr
    third = nextgpt("ask", "-p", "tiny", "--json", "--seed", "3", "--session", sid[:8], "what colour was the first circle?")
    assert third.returncode == 0, third.stderr
    assert json.loads(second.stdout)["session"] == json.loads(third.stdout)["session"] == sid
    exported = nextgpt("export", sid, "--format", "json", "-o", str(tmp_path / "s.json"))
    assert exported.returncode == 0, exported.stderr
    turns = json.loads((tmp_path / "s.json").read_text())["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant"] * 3
    assert [t["text"] for t in turns if t["role"] == "user"] == ["draw a red circle", "now make it blue", "what colour was the first circle?"]
    fresh = nextgpt("ask", "-p", "tiny", "--json", "--seed", "1", "--out", str(tmp_path), "hello")
    assert json.loads(fresh.stdout)["session"] != sid  # without -c: a new session
    _assert_one_line_error(nextgpt("ask", "-p", "tiny", "--session", "nosuchsession", "hi"), "nosuchsession")
    _assert_one_line_error(nextgpt("ask", "-p", "tiny", "-c", "--no-log", "hi"), "--no-log")


@pytest.mark.parametrize("argv", [["ask", "--session", "", "hi"], ["ask", "--session", "  ", "hi"], ["delete", ""], ["replay", " "]])
def test_an_empty_session_id_is_an_error_not_a_new_session(argv, tmp_path, monkeypatch):
    """`--session "$SID"` with SID unset must not quietly start a new session (or pick any)."""
    monkeypatch.setenv("NEXTGPT_DATA", str(tmp_path / "data"))
    r = nextgpt(*argv)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "empty session id" in r.stderr.splitlines()[-1]
    listed = nextgpt("sessions", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []  # nothing was saved
