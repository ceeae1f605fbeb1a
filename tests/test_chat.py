"""`nextgpt chat`: media rendering (bots.render), slash commands in process, and the real CLI in a pty."""

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bots import render
from bots.render import describe, image_preview, preview_mode

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1bP.*?\x1b\\|\x1b_.*?\x1b\\|\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[=>]", re.S)


def _strip(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


@pytest.fixture(scope="module")
def red_png(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("render") / "red.png"
    img = Image.new("RGB", (64, 64), "white")
    img.paste((220, 40, 40), (16, 16, 48, 48))
    img.save(path)
    return path


# --------------------------------------------------------------------------------------- describe
def test_describe_each_modality(tmp_path):
    from tools.base import MediaOutput

    img = MediaOutput("image", tmp_path / "a.png", "image/png", "a" * 64, width=512, height=320)
    assert describe(img) == f"image: {tmp_path / 'a.png'} (512x320)"
    vid = MediaOutput("video", tmp_path / "v.mp4", "video/mp4", "b" * 64, width=64, height=32, frames=24, fps=8.0,
                      duration=3.0, preview_path=tmp_path / "v.gif")
    line = describe(vid)
    assert line.startswith(f"video: {tmp_path / 'v.mp4'} (") and "24 frames" in line and "3.00 s" in line
    assert line.endswith(f"GIF preview: {tmp_path / 'v.gif'}")
    aud = MediaOutput("audio", tmp_path / "s.wav", "audio/wav", "c" * 64, duration=5.0, sample_rate=16000)
    assert describe(aud) == f"audio: {tmp_path / 's.wav'} (5.00 s)"
    # stored media (memory.MediaInfo) has no preview_path/fps: still one line
    stored = SimpleNamespace(modality="video", path=Path("/x/blob"), width=None, height=None, frames=8, duration=None)
    assert describe(stored) == "video: /x/blob (8 frames)"
    assert "\n" not in describe(vid)


# --------------------------------------------------------------------------------------- previews
@pytest.mark.parametrize(
    "env, mode",
    [
        ({"TERM": "xterm-kitty"}, "kitty"),
        ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "3"}, "kitty"),
        ({"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}, "kitty"),
        ({"TERM": "xterm-ghostty", "TERM_PROGRAM": "ghostty"}, "kitty"),
        ({"TERM": "foot"}, "sixel"),
        ({"TERM": "mlterm"}, "sixel"),
        ({"TERM": "xterm-sixel"}, "sixel"),
        ({"TERM": "xterm-256color", "NEXTGPT_IMAGES": "sixel"}, "sixel"),
        ({"TERM": "xterm-256color"}, "blocks"),
        ({"TERM": "xterm-kitty", "NEXTGPT_IMAGES": "blocks"}, "blocks"),
        ({"TERM": "xterm-kitty", "NEXTGPT_IMAGES": "off"}, "off"),
        ({"TERM": "dumb"}, "off"),
    ],
)
def test_preview_mode_detection(env, mode):
    assert preview_mode(env) == mode


def test_blocks_preview_rows_and_colours(red_png, tmp_path):
    art = image_preview(red_png, max_cols=20, mode="blocks")
    lines = art.split("\n")
    assert len(lines) == 10  # 64x64 → 20 cells wide, 20 pixel rows, two per "▀" cell
    assert all(_strip(line) == "▀" * 20 for line in lines)
    assert "\x1b[38;2;" in art and "\x1b[48;2;" in art and art.endswith("\x1b[0m")
    assert "\x1b[38;2;255;255;255m" in lines[0]  # white border
    assert re.search(r"\x1b\[38;2;2[12]\d;[34]\d;[34]\dm", lines[5])  # red centre
    # odd pixel height: the last row has no lower pixel (default background)
    from PIL import Image

    odd = tmp_path / "odd.png"
    Image.new("RGB", (30, 15), (0, 128, 0)).save(odd)
    lines = image_preview(odd, max_cols=40, mode="blocks").split("\n")
    assert len(lines) == 8 and "\x1b[49m" in lines[-1] and all(_strip(x) == "▀" * 30 for x in lines)
    # never wider than max_cols, never taller than max_cols/2 rows
    tall = tmp_path / "tall.png"
    Image.new("RGB", (50, 400), (0, 0, 255)).save(tall)
    lines = image_preview(tall, max_cols=40, mode="blocks").split("\n")
    assert len(lines) == 20 and all(len(_strip(x)) <= 40 for x in lines)


def _decode_sixel(data: str):
    """A small sixel decoder: (width, height, {(x, y): register}, {register: (r%, g%, b%)})."""
    assert data.startswith("\x1bP") and data.endswith("\x1b\\")
    body = data[2:-2]
    body = body[body.index("q") + 1 :]
    m = re.match(r'"(\d+);(\d+);(\d+);(\d+)', body)
    width, height = int(m.group(3)), int(m.group(4))
    body = body[m.end() :]
    pixels, colours = {}, {}
    x = band = reg = 0
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "#":
            m = re.match(r"#(\d+)(?:;2;(\d+);(\d+);(\d+))?", body[i:])
            reg = int(m.group(1))
            if m.group(2) is not None:
                colours[reg] = tuple(int(v) for v in m.group(2, 3, 4))
            i += m.end()
            continue
        if ch == "$":
            x = 0
        elif ch == "-":
            x, band = 0, band + 1
        else:
            count = 1
            if ch == "!":
                m = re.match(r"!(\d+)", body[i:])
                count = int(m.group(1))
                i += m.end()
                ch = body[i]
            bits = ord(ch) - 63
            assert 0 <= bits < 64, ch
            for _ in range(count):
                for k in range(6):
                    if bits >> k & 1:
                        assert (x, band * 6 + k) not in pixels, "a pixel painted twice"
                        pixels[(x, band * 6 + k)] = reg
                x += 1
        i += 1
    return width, height, pixels, colours


def test_sixel_preview_is_well_formed(red_png):
    art = image_preview(red_png, max_cols=20, mode="sixel")
    assert art.startswith("\x1bP") and art.endswith("\x1b\\")
    width, height, pixels, colours = _decode_sixel(art)
    assert (width, height) == (200, 200)  # 20 cells x 10 px, square image
    assert len(pixels) == width * height  # every pixel painted exactly once
    assert all(0 <= x < width and 0 <= y < height for x, y in pixels)
    centre = colours[pixels[(100, 100)]]
    corner = colours[pixels[(2, 2)]]
    assert centre[0] > 70 and centre[1] < 30 and centre[2] < 30  # red, in percent
    assert min(corner) > 90  # white
    assert len(colours) <= render.SIXEL_COLOURS


def test_kitty_preview_is_well_formed(red_png, tmp_path):
    art = image_preview(red_png, max_cols=20, mode="kitty")
    assert art.startswith("\x1b_G") and art.endswith("\x1b\\")
    assert "f=100" in art and "q=2" in art and "c=20" in art and "r=10" in art
    payload = "".join(re.findall(r"\x1b_G[^;]*;([^\x1b]*)\x1b\\", art))
    assert base64.b64decode(payload)[:8] == b"\x89PNG\r\n\x1a\n"
    # a bigger image goes in 4096-byte chunks: m=1 on all but the last
    import numpy as np
    from PIL import Image

    noisy = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(noisy)
    art = image_preview(noisy, mode="kitty")
    chunks = re.findall(r"\x1b_G([^;]*);([^\x1b]*)\x1b\\", art)
    assert len(chunks) > 1
    assert all("m=1" in head for head, _ in chunks[:-1]) and "m=0" in chunks[-1][0]
    assert all(len(data) <= render.KITTY_CHUNK for _, data in chunks)
    assert base64.b64decode("".join(d for _, d in chunks))[:4] == b"\x89PNG"


@pytest.mark.parametrize("mode", ["blocks", "sixel", "kitty"])
def test_bad_file_gives_no_preview(tmp_path, mode):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    for path in (text, truncated, tmp_path / "missing.png", tmp_path):
        assert image_preview(path, mode=mode) is None


def test_preview_off(red_png, monkeypatch):
    monkeypatch.setenv("NEXTGPT_IMAGES", "off")
    assert image_preview(red_png) is None
    monkeypatch.setenv("NEXTGPT_IMAGES", "blocks")
    assert "▀" in image_preview(red_png)


# --------------------------------------------------------------------------------------- chat helpers
def test_multiline_block_helpers():
    from bots.chat import _block_open, _unblock
    from bots.render import printable

    assert _block_open('"""') and _block_open('"""\nline one') and not _block_open('"""a\nb"""')
    assert not _block_open("plain text") and not _block_open('say """ this')
    assert _unblock('"""\nline one\nline two\n"""') == "line one\nline two"
    assert _unblock('"""one line"""') == "one line"
    assert _unblock("no block") == "no block"
    assert printable("a\x1b[2Jb\x07c\n\td\x9b") == "a[2Jbc\n\td"  # ESC, BEL and C1 CSI gone


@pytest.fixture
def ui(tmp_path):
    """A ChatUI over a real Memory with a stub assistant: slash commands, no model."""
    from rich.console import Console

    from assistant.session import Chat
    from bots.chat import ChatUI
    from memory import Memory

    memory = Memory.open(data_dir=tmp_path / "data")
    assistant = SimpleNamespace(  # a message is checked against the token budget before it is sent
        profile_name="tiny", profile=SimpleNamespace(generation=SimpleNamespace(max_new_tokens=24)),
        model=SimpleNamespace(tokenizer=lambda text, **kw: {"input_ids": text.split()}),
    )
    session = memory.create_session(None, "tiny")
    chat = Chat(assistant, memory, session)
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    ui = ChatUI(chat, memory, console, stream=True, data_dir=tmp_path / "data", log_path=None)
    ui.created.add(session.id)
    ui.out = out
    yield ui
    memory.close()


def _said(ui) -> list[str]:
    lines = [line.rstrip() for line in ui.out.getvalue().splitlines() if line.strip()]
    ui.out.seek(0)
    ui.out.truncate()
    return lines


def test_slash_commands_in_process(ui, media_files, tmp_path):
    ui.handle("/bogus")
    assert _said(ui) == ["unknown command /bogus — /help lists commands"]
    ui.handle("/set steps x")
    (line,) = _said(ui)
    assert "steps takes a whole number" in line and "/set KEY VALUE" in line
    ui.handle("/set steps 7")
    assert _said(ui) == ["steps = 7"] and ui.chat.settings.steps == 7
    ui.handle("/set temperature")
    assert _said(ui)[0].startswith("usage: /set KEY VALUE")
    ui.handle("/set")
    assert any(line.split()[:2] == ["steps", "7"] for line in _said(ui))
    ui.handle("/seed 42")
    assert ui.chat.settings.seed == 42 and _said(ui) == ["seed set to 42"]
    ui.handle("/seed banana")
    assert "usage: /seed" in _said(ui)[0] and ui.chat.settings.seed == 42

    ui.handle("/attach")
    assert _said(ui)[0].startswith("usage: /attach PATH")
    ui.handle(f"/attach {tmp_path / 'nope.png'}")
    assert _said(ui) == [f"error: {tmp_path / 'nope.png'}: no such file"]
    ui.handle(f'/attach "{media_files["red.png"]}"')
    assert _said(ui) == [f"attached image: {media_files['red.png']} (sent with your next message)"]
    assert ui.chat.staged == [("image", media_files["red.png"])]

    ui.handle("/image")
    ui.handle("/audio")
    assert ui.want == ["image", "audio"] and "image, audio" in _said(ui)[-1]
    assert "2 attached" not in ui.toolbar()[0][1] and "1 attached" in ui.toolbar()[0][1]
    assert "next reply: image+audio" in ui.toolbar()[0][1]

    ui.handle("/regenerate now")
    assert _said(ui)[0].startswith("usage: /regenerate")
    ui.handle("/resume zzzzzzzz")
    (line,) = _said(ui)
    assert line.startswith("error:") and "zzzzzzzz" in line
    assert ui.handle("/exit") == "exit" and ui.handle("/quit") == "exit"
    ui.handle("/help")
    assert any("/export [md|html|json] [PATH]" in line for line in _said(ui))


def test_sessions_new_resume_and_empty_cleanup(ui):
    memory = ui.memory
    first = ui.chat.session.id
    memory.add_turn(first, "user", "hello there")
    memory.rename_session(first, "hello there")
    ui.handle("/new")
    second = ui.chat.session.id
    assert second != first and _said(ui) == [f"new session {second}"]
    ui.handle("/sessions")
    table = "\n".join(_said(ui))
    assert first in table and second in table and "hello there" in table and "last used" in table
    ui.handle(f"/resume {first[:5]}")
    lines = _said(ui)
    assert lines[0].startswith(f"resumed session {first}: hello there (1 turns)")
    assert any("user: hello there" in line for line in lines)
    # the empty session made by /new was dropped when we left it
    assert [s.id for s in memory.list_sessions()] == [first]
    ui.goodbye()
    assert _said(ui) == [f"session {first} saved — resume with: nextgpt chat --session {first}"]


class _Lines:
    """A stand-in for the prompt: yields lines (raising exceptions given as classes), then EOF."""

    def __init__(self, *items):
        self.items = list(items)

    def read(self):
        if not self.items:
            return None
        item = self.items.pop(0)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item()
        return item


def test_turn_errors_are_one_line_and_the_chat_goes_on(ui):
    calls = []

    def send(text, **kw):
        calls.append((text, kw["want"]))
        if text == "boom":
            raise RuntimeError("the decoder\nexploded")
        if text == "stop":
            raise KeyboardInterrupt
        raise ValueError("empty message: type something or /attach a file")

    ui.chat.send = send
    ui.handle("/image")
    code = ui.loop(_Lines("boom", KeyboardInterrupt, "stop", "  ", '"""\nplease\n"""'))
    lines = _said(ui)
    assert code == 0
    assert calls == [("boom", ["image"]), ("stop", []), ("please", [])]  # /image applied to the next message only
    assert "error: RuntimeError: the decoder exploded" in lines
    assert "interrupted — the reply was not saved (your message was)" in lines
    assert "error: empty message: type something or /attach a file" in lines
    assert lines[-1] == "nothing said in this session, so it was not kept"
    assert not any("Traceback" in line for line in lines)


def test_model_load_failure_is_one_line(ui):
    from bots.chat import _Loader

    class Broken:
        @property
        def model(self):
            raise OSError("no weights in /nowhere")

        tools = {}

    ui.loader = _Loader(Broken())
    ui.loader.done.wait(10)
    assert "the model failed to load" in ui.toolbar()[0][1]
    ui.handle("hello")
    assert _said(ui) == ["error: could not load the model: no weights in /nowhere"]
    ui.loader.done.wait(10)


def test_loader_loads_the_model_not_the_tools(ui):
    """A reply waits for the model only; the decoder tools (diffusers' import) are not built beside the
    first reply's decode but on first render."""
    from bots.chat import _Loader

    class Lazy:
        model = object()
        built = 0

        @property
        def tools(self):
            Lazy.built += 1
            return {}

    ui.loader = _Loader(Lazy())
    assert ui.loader.done.wait(10) and ui.loader.error is None
    assert ui.ensure_model()
    assert "loading model" not in ui.toolbar()[0][1]
    assert Lazy.built == 0


def test_loader_warms_the_media_parts_after_a_waiting_first_reply(ui):
    """Once the model is up the loader loads what text replies do not need (`Assistant.warm()`: torch and the
    projectors on the llama.cpp backend, the decoder tools), but not beside a reply that was already waiting
    for the model: that one runs alone, and the warm-up follows it. With no message waiting it starts at once."""
    import threading
    import time

    from bots.chat import _Loader

    events, gate = [], threading.Event()

    class Slow:
        @property
        def model(self):
            gate.wait(10)
            return object()

        def warm(self, pause=None):
            assert pause()
            events.append("warm")

    ui.loader = _Loader(Slow())

    def reply():
        assert ui.ensure_model()
        events.append("reply")
        time.sleep(0.3)  # the reply's decode: the loader must not start beside it
        events.append("reply done")
        ui.turn_done()

    waiting = threading.Thread(target=reply)
    waiting.start()
    time.sleep(0.1)  # the message is waiting for the model
    gate.set()
    waiting.join(10)
    deadline = time.monotonic() + 10
    while "warm" not in events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events == ["reply", "reply done", "warm"]

    events.clear()
    ui.loader = _Loader(Slow())  # no message waiting: the warm-up starts as soon as the model is up
    deadline = time.monotonic() + 10
    while "warm" not in events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events == ["warm"]


def test_loader_warms_part_by_part_between_replies_and_close_starts_no_other_part(ui):
    """A reply sent while the loader warms runs beside the part under way only: the next part waits for the
    reply. Leaving the chat: close() waits for the part under way (torch code cut off by the interpreter's
    exit aborted the process) and no later part starts."""
    import time

    from bots.chat import _Loader

    parts = []

    class Assistant:
        model = object()

        def warm(self, pause=None):
            for i in range(4):
                if not pause():
                    return
                parts.append(f"start {i}")
                time.sleep(0.3)
                parts.append(f"end {i}")

    def wait_for(entry):
        deadline = time.monotonic() + 10
        while entry not in parts and time.monotonic() < deadline:
            time.sleep(0.01)

    ui.loader = loader = _Loader(Assistant())
    wait_for("start 0")
    assert ui.ensure_model()  # a reply starts during part 0
    parts.append("reply")
    time.sleep(0.6)  # longer than a part: part 1 must not start meanwhile
    parts.append("reply done")
    ui.turn_done()
    wait_for("start 1")
    loader.close()
    assert parts == ["start 0", "reply", "end 0", "reply done", "start 1", "end 1"]
    assert not loader.thread.is_alive()


def test_export_command(ui, tmp_path):
    pytest.importorskip("bots.export")
    ui.handle("/export")
    assert "no turns yet" in _said(ui)[0]
    ui.memory.add_turn(ui.chat.session.id, "user", "export me")
    ui.handle("/export yaml")
    assert _said(ui)[0].startswith("usage: /export")
    out = tmp_path / "chat.json"
    ui.handle(f"/export json {out}")
    assert _said(ui) == [f"exported session {ui.chat.session.id} to {out}"]
    assert "export me" in out.read_text()
    md = tmp_path / "chat.md"
    ui.handle(f"/export {md}")  # format from the suffix
    assert md.is_file() and "export me" in md.read_text()


# --------------------------------------------------------------------------------------- the real CLI
def _cli(*args, input=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "bots.cli", "chat", "--profile", "tiny", *args], input=input, capture_output=True,
        text=True, timeout=timeout, env=dict(os.environ), cwd=REPO,
    )


def test_unknown_session_is_one_line_error():
    r = _cli("--session", "zzzzzzzz")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "zzzzzzzz" in lines[0], r.stderr


@pytest.mark.slow
def test_piped_stdin_fallback():
    """`echo hi | nextgpt chat`: no terminal, plain line input, same commands, reply saved."""
    r = _cli(input="hi from a pipe\n/seed 3\n/bogus\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "seed set to 3" in r.stdout and "unknown command /bogus — /help lists commands" in r.stdout
    sid = re.search(r"session ([0-9a-f]{8}) \(new\)", r.stdout).group(1)
    assert f"resume with: nextgpt chat --session {sid}" in r.stdout
    assert "\x1b" not in r.stdout  # no escape codes into a pipe
    from memory import Memory

    with Memory.open(data_dir=os.environ["NEXTGPT_DATA"]) as memory:
        turns = memory.turns(sid)
    assert [t.role for t in turns] == ["user", "assistant"] and turns[0].text == "hi from a pipe"


@pytest.mark.slow
def test_chat_in_a_terminal():
    """The real `nextgpt chat` in a pseudo-terminal (prompt-toolkit path), then `chat -c`."""
    pexpect = pytest.importorskip("pexpect")
    from memory import Memory

    data_dir = os.environ["NEXTGPT_DATA"]
    env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1", NEXTGPT_IMAGES="blocks")
    env.pop("NO_COLOR", None)
    prompt = "›"
    session_re = r"session (?:\x1b\[[0-9;]*m)*([0-9a-f]{8})"

    def spawn(*args):
        child = pexpect.spawn(
            sys.executable, ["-m", "bots.cli", "chat", "--profile", "tiny", *args], env=env, cwd=str(REPO),
            dimensions=(40, 120), encoding="utf-8", codec_errors="replace", timeout=90,
        )
        child.logfile_read = io.StringIO()
        return child

    child = spawn()
    try:
        child.expect(session_re)
        sid = child.match.group(1)
        child.expect(prompt)  # the prompt is up before the model has loaded
        child.send("hello there\r")
        child.expect("── seed")
        child.expect(prompt)
        child.send("/image a red circle\r")
        child.expect(r"image: (\S+\.png) \(\d+x\d+\)")
        png = Path(child.match.group(1))
        child.expect("▀")  # the inline preview
        child.expect("── seed")
        child.expect(prompt)
        child.send("/attach /nonexistent/cat.png\r")
        child.expect("no such file")
        child.expect(prompt)
        child.send("/set steps x\r")
        child.expect("usage: /set KEY VALUE")
        child.expect(prompt)
        child.send("/bogus\r")
        child.expect("/help lists commands")
        child.expect(prompt)
        child.send("/exit\r")
        child.expect(f"resume with: nextgpt chat --session {sid}")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    screen = _strip(child.logfile_read.getvalue())
    assert child.exitstatus == 0, screen[-2000:]
    assert "Traceback" not in screen
    assert f"session {sid} (new)" in screen
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    lines = screen.splitlines()
    assert [line for line in lines if "no such file" in line] == ["error: /nonexistent/cat.png: no such file"]
    assert any(line.startswith("steps takes a whole number, not 'x'") for line in lines)
    assert "unknown command /bogus — /help lists commands" in lines

    with Memory.open(data_dir=data_dir) as memory:
        turns = memory.turns(sid)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[2].text == "a red circle"
    out = turns[3].media_out
    assert len(out) == 1 and out[0].modality == "image" and out[0].direction == "out"

    # chat -c resumes that session; Ctrl-C during a reply keeps the user's turn and the chat
    child = spawn("-c")
    try:
        child.expect(session_re)
        assert child.match.group(1) == sid
        child.expect("resumed")
        child.expect(prompt)
        # a bracketed paste with newlines does not send; Alt-Enter adds a line; Enter sends it all
        child.send("\x1b[200~first line\nsecond line\x1b[201~")
        child.send("\x1b\r")
        child.send("third line\r")
        child.expect("── seed")
        child.expect(prompt)
        child.send("/set steps 500\r")
        child.expect("steps = 500")
        child.expect(prompt)
        child.send("/video slow please\r")
        child.expect(r"/500")  # the video decoder's progress bar is running
        child.sendintr()
        child.expect("interrupted")
        child.expect(prompt)
        child.send("/exit\r")
        child.expect(f"resume with: nextgpt chat --session {sid}")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    screen = _strip(child.logfile_read.getvalue())
    assert child.exitstatus == 0 and "Traceback" not in screen, screen[-2000:]
    with Memory.open(data_dir=data_dir) as memory:
        turns = memory.turns(sid)
    assert [t.role for t in turns[4:]] == ["user", "assistant", "user"]
    assert turns[4].text == "first line\nsecond line\nthird line"
    assert turns[-1].text == "slow please"  # saved before generation; its reply was interrupted
