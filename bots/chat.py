"""`nextgpt chat`: the interactive terminal chat (prompt-toolkit input, rich output).

    from bots.chat import run
    raise SystemExit(run(load_settings(), profile="tiny", continue_last=True))

The banner and the prompt come up at once; the model loads in a background thread and the first
message waits for it ("loading model…"). Every turn is saved by `assistant.session.Chat` (the
user's turn before generation starts), so Ctrl-C during a reply loses only that reply.

Keys: Enter sends; Alt-Enter (Esc then Enter) or a trailing backslash adds a line; a message that
starts with \"\"\" goes on until the closing \"\"\"; a bracketed paste inserts its newlines
without sending; Tab completes slash commands and, after `/attach `, file paths; Ctrl-C clears
the line (or interrupts a reply); Ctrl-D on an empty line leaves.

When stdin or stdout is not a terminal (pipes, `echo hi | nextgpt chat`) lines are read with
`input()` instead: no toolbar, no completion, no previews, same commands.

Front end only: this module drives `assistant.session.Chat` and `memory.Memory`; neither imports it.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from prompt_toolkit.completion import Completer

from bots.quiet import quiet_logging
from bots.render import describe, image_preview, preview_mode, printable

log = logging.getLogger(__name__)

MODALITIES = ("image", "video", "audio")
EXPORT_FORMATS = ("md", "html", "json")
EXPORT_SUFFIXES = {".md": "md", ".markdown": "md", ".html": "html", ".htm": "html", ".json": "json"}
BLOCK = '"""'

# name → (usage, one-line help); the order is the /help order
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("/help", "show this list"),
    "attach": ("/attach PATH", "stage an image, audio or video file; it is sent with your next message"),
    "image": ("/image [TEXT]", "the next reply makes an image (with TEXT: send TEXT now)"),
    "video": ("/video [TEXT]", "the next reply makes a video (with TEXT: send TEXT now)"),
    "audio": ("/audio [TEXT]", "the next reply makes audio (with TEXT: send TEXT now)"),
    "regenerate": ("/regenerate [seed]", "answer the last message again (`seed`: with a new seed)"),
    "reseed": ("/reseed", "same as /regenerate seed"),
    "seed": ("/seed [N|default]", "show or set the seed (same seed → same media)"),
    "set": ("/set [KEY VALUE]", "show settings, or set one (seed, steps, guidance, temperature, top_p, max_new_tokens)"),
    "history": ("/history [N]", "show the last N turns of this session (default 10)"),
    "new": ("/new", "start a new session"),
    "sessions": ("/sessions", "list saved sessions"),
    "resume": ("/resume ID", "switch to a saved session (id or unique prefix)"),
    "export": ("/export [md|html|json] [PATH]", "write this session to a file"),
    "exit": ("/exit", "leave (also /quit, Ctrl-D); the session stays saved"),
    "quit": ("/quit", "leave"),
}
NO_ARGUMENT_COMMANDS = frozenset(name for name, (usage, _) in COMMANDS.items() if " " not in usage)
ALIASES = {"regen": "regenerate", "bye": "exit", "q": "quit", "?": "help"}

def _one_line(err: BaseException | str, limit: int = 300) -> str:
    """An error as one line: user-facing errors by their message, others with their type name."""
    if isinstance(err, str):
        text = err
    else:
        text = str(err)
        if not text or not isinstance(err, (ValueError, KeyError, OSError)):
            text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _block_open(text: str) -> bool:
    """True while a \"\"\" block is open (Enter inserts a newline instead of sending)."""
    return text.lstrip().startswith(BLOCK) and text.count(BLOCK) % 2 == 1


def _unblock(text: str) -> str:
    """The message inside a \"\"\" … \"\"\" block (the text itself when it is not one)."""
    s = text.strip()
    if not s.startswith(BLOCK):
        return text
    s = s[len(BLOCK):]
    if s.rstrip().endswith(BLOCK):
        s = s.rstrip()[: -len(BLOCK)]
    return s.strip("\n")


def _ago(when: datetime | None) -> str:
    if when is None:
        return "?"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (datetime.now(UTC) - when).total_seconds()
    if seconds < 60:
        return "just now"
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            n = int(seconds // size)
            if unit == "day":
                return f"{n} day{'s' if n > 1 else ''} ago" if n < 8 else when.astimezone().strftime("%Y-%m-%d %H:%M")
            return f"{n} {unit} ago"
    return "just now"


# ------------------------------------------------------------------------------------ model loading
def _quiet_progress_bars(assistant) -> None:
    """transformers' tqdm bars (e.g. "Loading weights") would scribble over the prompt (the decoder
    tools silence diffusers' bars themselves while a pipeline loads: tools/base.py). Only on the
    transformers backend: the llama.cpp one starts without importing transformers (~1 s saved; its
    first-start build silences the libraries itself: nextgpt/llama_backend.py)."""
    profile = getattr(assistant, "profile", None)
    if profile is not None and profile.llm.resolved_backend() != "transformers":
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - a missing library just has no bars
        pass


class _Loader:
    """Loads the model in a background thread; `done` is set once it can reply. On the llama.cpp backend
    that is before torch is imported. What replies need later loads on the same thread once no reply is
    under way (`Assistant.warm()`, part by part): the model's media parts (torch, ImageBind, the
    projectors), then each decoder tool set to `trace` (diffusers' import, the pipeline, its traced UNet).
    A first message sent before the model was up is answered first, alone on the CPU (measured: a first
    reply's text came 0.5 s later while diffusers imported beside it); a message sent during a part runs
    beside that part only, the next part waits for the reply; a render whose tool is warming waits for it."""

    def __init__(self, assistant, on_done=None):
        self.assistant = assistant
        self.on_done = on_done  # called from the loader thread when loading ends (e.g. redraw the toolbar)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.idle = threading.Event()  # cleared while a reply waits for the model or runs (ChatUI)
        self.idle.set()
        self.stopping = threading.Event()  # set by close(): no further warm-up part starts
        self.thread: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        self.error = None
        self.done.clear()
        self.thread = threading.Thread(target=self._load, name="nextgpt-model-loader", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """At the chat's end: let a warm-up part under way finish (torch code cut off by the interpreter's exit
        aborted the process: "terminate called without an active exception") and start no other. A model
        still loading is not waited for."""
        self.stopping.set()
        self.idle.set()
        if self.done.is_set() and self.thread is not None:
            self.thread.join()

    def _pause(self) -> bool:
        """Between warm-up parts: wait while a reply runs; False once the chat ends."""
        self.idle.wait()
        return not self.stopping.is_set()

    def _load(self) -> None:
        try:
            _quiet_progress_bars(self.assistant)
            model = self.assistant.model
        except BaseException as e:  # reported on the next message, as one line
            log.warning("model load failed", exc_info=True)
            self.error = e
            model = None
        finally:
            self.done.set()
            if self.on_done is not None:
                try:
                    self.on_done()
                except Exception:  # pragma: no cover - a redraw is best effort
                    pass
        if model is not None:
            # what a text reply does not need, each part once no reply is under way: a first message sent
            # before the model was up is answered first, alone on the CPU; one typed during a part runs beside
            # that part only
            try:
                self.assistant.warm(pause=self._pause)
            except Exception:  # a media input, signal group or render that needs them reports the error then
                log.warning("loading the media parts or the decoder tools failed", exc_info=True)


# ------------------------------------------------------------------------------------ one reply
class _ReplyView:
    """Streams a reply's text, shows a progress bar per decoder, keeps spinners out of the way."""

    def __init__(self, console, *, stream: bool):
        self.console = console
        self.stream = stream
        self.live = console.is_terminal
        self.wrote = False
        self.last_char = "\n"
        self.progress = None
        self.tasks: dict[str, tuple[int, int]] = {}  # modality → (task id, last step)
        self.status = console.status("thinking…", spinner="dots") if self.live else None
        if self.status:
            self.status.start()

    def _stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def on_text(self, chunk: str) -> None:
        self._stop_status()
        chunk = printable(chunk)
        if not chunk:
            return
        self.console.file.write(chunk)
        self.console.file.flush()
        self.wrote = True
        self.last_char = chunk[-1]

    def end_text(self) -> None:
        if self.wrote and self.last_char != "\n":
            self.console.file.write("\n")
            self.console.file.flush()
            self.last_char = "\n"

    def on_progress(self, modality: str, step: int, total: int) -> None:
        if not self.live:
            return
        self._stop_status()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self.progress is None:
            self.end_text()
            self.progress = Progress(
                TextColumn("  {task.description:<6}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                TimeElapsedColumn(), console=self.console, transient=False,
            )
            self.progress.start()
        task, last = self.tasks.get(modality, (None, 0))
        if task is None or step <= last:  # a further media item of the same kind starts again at 1
            task = self.progress.add_task(modality, total=total)
        self.progress.update(task, completed=step, total=max(total, step))
        self.tasks[modality] = (task, step)

    def close(self) -> None:
        self._stop_status()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.end_text()


# ------------------------------------------------------------------------------------ input
class _PlainInput:
    """Lines from stdin via input(): pipes, tests, dumb terminals."""

    interactive = False

    def __init__(self, show_prompt: bool):
        self.show_prompt = show_prompt

    def read(self) -> str | None:
        try:
            line = input("› " if self.show_prompt else "")
        except EOFError:
            return None
        while _block_open(line):
            try:
                line += "\n" + input("… " if self.show_prompt else "")
            except EOFError:  # input ended inside a block: send what there is
                break
        return line


class _PromptInput:
    """prompt-toolkit: history, completion, multi-line editing, bottom toolbar."""

    interactive = True

    def __init__(self, ui: "ChatUI"):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        kb = KeyBindings()

        @kb.add("enter")
        @kb.add("c-j")  # some terminals send \n for Enter
        def _enter(event):
            b = event.current_buffer
            if b.complete_state is not None and b.complete_state.current_completion is not None:
                b.complete_state = None  # Enter on a highlighted completion takes it …
                if b.text.strip().lstrip("/") not in NO_ARGUMENT_COMMANDS:
                    return  # … and Enter again sends (a command without arguments goes at once)
            if _block_open(b.text):
                b.insert_text("\n")
                return
            if b.document.is_cursor_at_the_end and b.text.endswith("\\"):
                b.delete_before_cursor(1)
                b.insert_text("\n")
                return
            b.validate_and_handle()

        @kb.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        history_path = ui.data_dir / "chat_history"
        try:
            history_path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(history_path))
        except OSError:
            history = InMemoryHistory()
        self.session = PromptSession(
            message=[("class:prompt", "› ")],
            history=history,
            completer=_Completer(ui),
            complete_while_typing=True,
            multiline=True,
            key_bindings=kb,
            bottom_toolbar=ui.toolbar,
            prompt_continuation=lambda width, line_number, wrap_count: "… ".rjust(width),
            enable_open_in_editor=True,  # Ctrl-X Ctrl-E edits the message in $EDITOR
            reserve_space_for_menu=6,
        )

    def read(self) -> str | None:
        try:
            return self.session.prompt()
        except EOFError:
            return None

    def invalidate(self) -> None:
        """Redraw (the toolbar) from any thread; a no-op when no prompt is showing."""
        self.session.app.invalidate()


class _Completer(Completer):
    """Slash commands; file paths after /attach; setting keys, export formats, session ids."""

    def __init__(self, ui: "ChatUI"):
        from prompt_toolkit.completion import PathCompleter

        self.ui = ui
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document, complete_event):
        from prompt_toolkit.completion import Completion
        from prompt_toolkit.document import Document

        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        if " " not in text:
            word = text[1:].lower()
            for name, (usage, help_) in COMMANDS.items():
                if name.startswith(word):
                    insert = "/" + name + ("" if name in NO_ARGUMENT_COMMANDS else " ")
                    yield Completion(insert, start_position=-len(text), display=usage, display_meta=help_)
            return
        head, _, rest = text.partition(" ")
        cmd = ALIASES.get(head[1:].lower(), head[1:].lower())
        if cmd == "attach":
            arg = rest.lstrip()
            yield from self.paths.get_completions(Document(arg, len(arg)), complete_event)
            return
        if " " in rest.lstrip():
            return
        word = rest.lstrip()
        options: list[tuple[str, str]] = []
        if cmd == "set":
            options = [(k, "") for k in self.ui.setting_names()]
        elif cmd == "export":
            options = [(f, "") for f in EXPORT_FORMATS]
        elif cmd == "regenerate":
            options = [("seed", "with a new seed")]
        elif cmd == "resume":
            try:
                options = [(s.id, (s.title or "(untitled)")[:40]) for s in self.ui.memory.list_sessions(50)]
            except Exception:
                options = []
        for value, meta in options:
            if value.startswith(word):
                yield Completion(value, start_position=-len(word), display_meta=meta)


# ------------------------------------------------------------------------------------ the chat
class ChatUI:
    def __init__(self, chat, memory, console, *, stream: bool, data_dir: Path, log_path: Path | None):
        self.chat = chat
        self.memory = memory
        self.console = console
        self.stream = stream
        self.data_dir = data_dir
        self.log_path = log_path
        self.want: list[str] = []  # modalities forced in the next reply
        self.created: set[str] = set()  # sessions this run created (deleted on leaving if still empty)
        self.loader: _Loader | None = None
        self.reader = None
        self.previews = console.is_terminal and preview_mode() != "off"

    # ---- output helpers
    def say(self, text: str, style: str | None = None) -> None:
        from rich.text import Text

        self.console.print(Text(text, style=style or ""), soft_wrap=True)

    def error(self, err: BaseException | str) -> None:
        self.say(f"error: {_one_line(err)}", "red")

    def hint(self, text: str) -> None:
        self.say(text, "yellow")

    def usage(self, name: str) -> None:
        self.hint(f"usage: {COMMANDS[name][0]} — {COMMANDS[name][1]}")

    @property
    def assistant(self):
        return self.chat.assistant

    def setting_names(self) -> list[str]:
        return list(self.chat.settings.names())

    def toolbar(self):
        s = self.chat.session
        parts = [f" session {s.id}", f"profile {self.assistant.profile_name}"]
        if self.chat.staged:
            parts.append(f"{len(self.chat.staged)} attached")
        if self.want:
            parts.append("next reply: " + "+".join(self.want))
        if self.chat.settings.seed is not None:
            parts.append(f"seed {self.chat.settings.seed}")
        if self.loader is not None and not self.loader.done.is_set():
            parts.append("loading model…")
        elif self.loader is not None and self.loader.error is not None:
            parts.append("the model failed to load (see your next message)")
        parts.append("Enter send · Alt-Enter newline · /help ")
        return [("class:bottom-toolbar", " · ".join(parts))]

    def redraw(self) -> None:
        invalidate = getattr(self.reader, "invalidate", None)
        if invalidate is not None:
            invalidate()

    # ---- banner, recap
    def banner(self, resumed: bool) -> None:
        from rich.text import Text

        s = self.chat.session
        title = Text()
        title.append("NExT-GPT chat", style="bold")
        title.append(f" · profile {self.assistant.profile_name} · session ")
        title.append(s.id, style="bold cyan")
        if resumed:
            title.append(f" (resumed: {printable(s.title or '(untitled)')[:60]}, {s.turn_count} turns)")
        else:
            title.append(" (new)")
        self.console.print(title, soft_wrap=True)
        self.say(
            'Enter sends · Alt-Enter adds a line · """ starts a multi-line block · /help lists commands · '
            "Ctrl-D exits",
            "dim",
        )
        if resumed:
            if s.profile and s.profile != self.assistant.profile_name:
                self.hint(f"this session was started with profile {s.profile}; continuing with {self.assistant.profile_name}")
            self.recap(2)

    def recap(self, n: int) -> None:
        turns = self.chat.memory.turns(self.chat.session.id, last=n) if n else []
        for t in turns:
            text = printable(" ".join(t.text.split()))
            if len(text) > 200:
                text = text[:199] + "…"
            self.say(f"{t.index + 1:>3} {t.role}: {text}", "cyan" if t.role == "user" else None)
            for m in t.media:
                self.say(f"      {'attached' if m.direction == 'in' else 'made'} {describe(m)}", "dim")

    # ---- the loop
    def loop(self, reader) -> int:
        while True:
            try:
                line = reader.read()
            except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
                continue
            if line is None:  # Ctrl-D / end of input
                break
            text = _unblock(line)
            if not text.strip():
                continue
            try:
                if self.handle(text) == "exit":
                    break
            except KeyboardInterrupt:
                self.hint("interrupted")
            except Exception as e:  # never a traceback: one line, and the chat goes on
                log.exception("chat turn failed")
                where = f" (details in {self.log_path})" if self.log_path else ""
                self.error(f"{_one_line(e)}{where}")
        self.goodbye()
        return 0

    def handle(self, text: str) -> str | None:
        stripped = text.strip()
        if stripped.startswith("//"):  # an escaped slash: send "/..." as text
            return self.send(stripped[1:], self._take_want())
        if not stripped.startswith("/"):
            return self.send(text, self._take_want())
        head, arg = re.match(r"(\S*)\s*(.*)", stripped, re.S).groups()
        if not head[1:]:
            return self.hint("unknown command / — /help lists commands")
        name = head[1:].lower()
        name = ALIASES.get(name, name)
        arg = arg.strip()
        if name in MODALITIES:
            return self.cmd_modality(name, arg)
        method = getattr(self, f"cmd_{name}", None)
        if name not in COMMANDS or method is None:
            if os.path.exists(head):
                return self.hint(f"{head} looks like a file: use /attach {head} (or start with // to send it as text)")
            return self.hint(f"unknown command {head} — /help lists commands")
        return method(arg)

    def _take_want(self) -> list[str]:
        want, self.want = self.want, []
        return want

    # ---- turns
    def ensure_model(self) -> bool:
        """Wait for the model; True when it is up. The caller then runs its reply and calls `turn_done`."""
        loader = self.loader
        if loader is None:
            return True
        loader.idle.clear()
        if not loader.done.is_set():
            if self.console.is_terminal:
                with self.console.status("loading model…", spinner="dots"):
                    while not loader.done.wait(0.1):
                        pass
            else:
                loader.done.wait()
        if loader.error is not None:
            self.error(f"could not load the model: {_one_line(loader.error)}")
            loader.idle.set()
            loader.start()  # try again in the background for the next message
            return False
        return True

    def turn_done(self) -> None:
        if self.loader is not None:
            self.loader.idle.set()

    def send(self, text: str, want: list[str]):
        if not self.ensure_model():
            self.want = want or self.want
            return None
        return self._run_turn(lambda view: self.chat.send(
            text, want=want, on_text=view.on_text if self.stream else None, on_progress=view.on_progress,
        ))

    def _run_turn(self, call):
        view = _ReplyView(self.console, stream=self.stream)
        t0 = time.perf_counter()
        try:
            reply = call(view)
        except KeyboardInterrupt:
            view.close()
            self.hint("interrupted — the reply was not saved (your message was)")
            return None
        except ValueError as e:  # e.g. an empty message, nothing to regenerate
            view.close()
            self.error(e)
            return None
        finally:
            view.close()
            self.turn_done()
        self.show_reply(reply, streamed=self.stream and view.wrote, elapsed=time.perf_counter() - t0)
        return None

    def show_reply(self, reply, *, streamed: bool, elapsed: float) -> None:
        text = printable(reply.text).strip()
        if text and not streamed:
            if self.console.is_terminal:
                from rich.markdown import Markdown

                self.console.print(Markdown(text))
            else:
                self.console.file.write(text + "\n")
                self.console.file.flush()
        for m in reply.media:
            self.say(describe(m), "green")
            self.preview(m)
        for f in reply.failures:
            self.say(f"warning: the {f.modality} decoder ({f.tool}) failed: {_one_line(f.error)}", "yellow")
        if not text and not reply.media and not reply.failures:
            self.say("(empty reply)", "dim")
        bits = [f"seed {reply.seed}" if reply.seed is not None else "no seed", f"{elapsed:.1f} s"]
        if reply.finish_reason and reply.finish_reason not in ("stop", "eos"):
            bits.append(f"stopped: {reply.finish_reason}")
        self.say("── " + " · ".join(bits), "dim")

    def preview(self, media) -> None:
        if not self.previews:
            return
        path = media.path if media.modality == "image" else getattr(media, "preview_path", None)
        if media.modality not in ("image", "video") or not path:
            return
        art = image_preview(path, max_cols=min(40, max(8, self.console.width - 2)))
        if art:
            self.console.file.write(art + "\n")
            self.console.file.flush()

    # ---- commands
    def cmd_help(self, arg: str):
        from rich.table import Table
        from rich.text import Text

        table = Table(show_header=False, box=None, pad_edge=False)
        for usage, help_ in COMMANDS.values():
            table.add_row(Text(usage, style="bold"), Text(help_))
        self.console.print(table)
        self.say(
            'Enter sends · Alt-Enter (or a trailing \\) adds a line · """ … """ for a multi-line block · '
            "Tab completes · Ctrl-X Ctrl-E opens $EDITOR · Ctrl-C clears the line or stops a reply · "
            "Ctrl-D exits · start with // to send text that begins with /",
            "dim",
        )

    def cmd_attach(self, arg: str):
        if not arg:
            return self.usage("attach")
        from nextgpt.media import AttachmentError

        path = arg
        if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "'\"":
            path = arg[1:-1]
        elif not os.path.exists(os.path.expanduser(arg)):
            try:
                parts = shlex.split(arg)
            except ValueError:
                parts = []
            if len(parts) == 1:
                path = parts[0]
        path = os.path.expanduser(path)
        try:
            modality = self.chat.attach(path)
        except AttachmentError as e:
            return self.error(e)
        self.say(f"attached {modality}: {path} (sent with your next message)", "green")

    def cmd_modality(self, name: str, arg: str):
        want = [name]
        while arg.startswith("/"):  # /image /audio a cat
            head, _, rest = arg.partition(" ")
            if head[1:].lower() not in MODALITIES:
                break
            want.append(head[1:].lower())
            arg = rest.strip()
        for m in want:
            if m not in self.want:
                self.want.append(m)
        if arg:
            return self.send(arg, self._take_want())
        self.say(f"the next reply will include: {', '.join(self.want)} (type your message)", "green")

    def cmd_regenerate(self, arg: str):
        if arg.lower() not in ("", "seed", "reseed", "--seed"):
            return self.usage("regenerate")
        return self._regenerate(reseed=bool(arg))

    def cmd_reseed(self, arg: str):
        if arg:
            return self.usage("reseed")
        return self._regenerate(reseed=True)

    def _regenerate(self, reseed: bool):
        if not self.ensure_model():
            return None
        return self._run_turn(lambda view: self.chat.regenerate(
            reseed=reseed, on_text=view.on_text if self.stream else None, on_progress=view.on_progress,
        ))

    def _profile_default(self, key: str) -> str:
        """What None means for a setting under this profile, as text."""
        return self.chat.settings.default(key, getattr(self.assistant, "profile", None))

    def cmd_seed(self, arg: str):
        if not arg:
            seed = self.chat.settings.seed
            shown = seed if seed is not None else f"default ({self._profile_default('seed')})"
            return self.say(f"seed: {shown}")
        if len(arg.split()) != 1:
            return self.usage("seed")
        try:
            self.chat.settings.set("seed", arg)
        except ValueError as e:
            return self.hint(f"{_one_line(e)} — usage: {COMMANDS['seed'][0]}")
        self.say(f"seed set to {self.chat.settings.seed if self.chat.settings.seed is not None else 'default'}", "green")

    def cmd_set(self, arg: str):
        from dataclasses import fields

        if not arg:
            from rich.table import Table

            table = Table(show_header=True, box=None, pad_edge=False)
            table.add_column("setting")
            table.add_column("value")
            for f in fields(self.chat.settings):
                value = getattr(self.chat.settings, f.name)
                table.add_row(f.name, str(value) if value is not None else f"default ({self._profile_default(f.name)})")
            self.console.print(table)
            return None
        parts = arg.split(None, 1)
        if len(parts) != 2:
            return self.hint(f"usage: /set KEY VALUE (keys: {', '.join(self.setting_names())}; VALUE `default` resets)")
        key, value = parts[0], parts[1].strip()
        try:
            key = self.chat.settings.set(key, value)
        except ValueError as e:
            return self.hint(f"{_one_line(e)} — usage: /set KEY VALUE")
        now = getattr(self.chat.settings, key, None)
        self.say(f"{key} = {'default' if now is None else now}", "green")

    def cmd_history(self, arg: str):
        n = 10
        if arg:
            if not arg.isdigit() or int(arg) < 1:
                return self.usage("history")
            n = int(arg)
        if not self.chat.session.turn_count and not self.chat.history():
            return self.say("this session has no turns yet", "dim")
        self.recap(n)

    def _leave_session(self) -> None:
        """Forget the current session if this run created it and nothing was said in it."""
        sid = self.chat.session.id
        if sid not in self.created:
            return
        try:
            if not self.memory.turns(sid, last=1):
                self.memory.delete_session(sid)
                self.created.discard(sid)
        except Exception:
            log.warning("could not drop empty session %s", sid, exc_info=True)

    def cmd_new(self, arg: str):
        if arg:
            return self.usage("new")
        self._leave_session()
        s = self.chat.new()
        self.created.add(s.id)
        self.want = []
        self.say(f"new session {s.id}", "green")

    def cmd_sessions(self, arg: str):
        from rich.table import Table
        from rich.text import Text

        if arg:
            return self.usage("sessions")
        sessions = self.memory.list_sessions(50)
        if not sessions:
            return self.say("no saved sessions yet", "dim")
        table = Table(show_header=True, box=None, pad_edge=False)
        for col in ("", "id", "title", "turns", "last used", "profile"):
            table.add_column(col, no_wrap=col in ("id", "last used"))
        for s in sessions:
            current = s.id == self.chat.session.id
            table.add_row(
                "*" if current else "", s.id, Text(printable(s.title or "(untitled)")[:50]), str(s.turn_count),
                _ago(s.updated_at), Text(s.profile or ""), style="bold" if current else None,
            )
        self.console.print(table)

    def cmd_resume(self, arg: str):
        if not arg or len(arg.split()) != 1:
            return self.usage("resume")
        from memory import SessionNotFound

        try:
            target = self.memory.get_session(arg)
        except SessionNotFound as e:
            return self.error(e)
        if target.id == self.chat.session.id:
            return self.say(f"already in session {target.id}", "dim")
        self._leave_session()
        s = self.chat.resume(target.id)
        self.want = []
        self.say(f"resumed session {s.id}: {printable(s.title or '(untitled)')[:60]} ({s.turn_count} turns)", "green")
        self.recap(2)

    def cmd_export(self, arg: str):
        try:
            from bots.export import export_session
        except ImportError:
            return self.error("export is not available in this installation")
        fmt, out = "md", None
        if arg:
            first, _, rest = arg.partition(" ")
            if first.lower() in EXPORT_FORMATS:
                fmt, rest = first.lower(), rest.strip()
                out = rest or None
            elif Path(arg).suffix.lower() in EXPORT_SUFFIXES:
                fmt, out = EXPORT_SUFFIXES[Path(arg).suffix.lower()], arg
            else:
                return self.usage("export")
        if out and len(out) >= 2 and out[0] == out[-1] and out[0] in "'\"":
            out = out[1:-1]
        if not self.chat.history():
            return self.hint("this session has no turns yet: nothing to export")
        try:
            path = export_session(self.memory, self.chat.session.id, fmt, Path(out).expanduser() if out else None)
        except (OSError, ValueError) as e:
            return self.error(e)
        self.say(f"exported session {self.chat.session.id} to {path}", "green")

    def cmd_exit(self, arg: str):
        return "exit"

    def cmd_quit(self, arg: str):
        return "exit"

    def goodbye(self) -> None:
        sid = self.chat.session.id
        try:
            saved = bool(self.memory.turns(sid, last=1))
        except Exception:
            saved = True
        if saved:
            self.say(f"session {sid} saved — resume with: nextgpt chat --session {sid}")
        else:
            self._leave_session()
            self.say("nothing said in this session, so it was not kept", "dim")


# ------------------------------------------------------------------------------------ entry point
def _stdio_is_tty() -> bool:
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def run(settings, *, profile: str | None = None, session_id: str | None = None, continue_last: bool = False, stream: bool = True) -> int:
    """The interactive chat. Returns the process exit code (0, or 2 for a bad profile/session id)."""
    import signal
    import threading

    from rich.console import Console

    # Ctrl-C interrupts a reply. A process started from a non-interactive shell's `cmd &` inherits
    # SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler: install it here.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    from nextgpt.config import ConfigError

    console = Console(highlight=False)
    try:
        data_dir = settings.data_path
    except Exception as e:
        print(f"nextgpt: error: {_one_line(e)}", file=sys.stderr)
        return 2
    log_path = quiet_logging(data_dir)

    from assistant.agent import Assistant

    try:
        assistant = Assistant(settings, profile)
    except ConfigError as e:
        print(f"nextgpt: error: {_one_line('; '.join(str(e).splitlines()))}", file=sys.stderr)
        return 2
    ui = None
    # the model loads while the chat memory, the session and the terminal are set up (the banner and
    # prompt do not wait for it either)
    loader = _Loader(assistant, on_done=lambda: ui.redraw() if ui is not None else None)

    from assistant.session import Chat
    from memory import Memory, SessionNotFound

    try:
        memory = Memory.open(data_dir=data_dir)
    except Exception as e:
        print(f"nextgpt: error: cannot open the chat memory in {data_dir}: {_one_line(e)}", file=sys.stderr)
        return 1
    try:
        try:
            chat = Chat.start(assistant, memory, session_id=session_id, continue_last=continue_last)
        except SessionNotFound as e:
            print(f"nextgpt: error: {_one_line(e)} (nextgpt chat, then /sessions, lists them)", file=sys.stderr)
            return 2
        resumed = chat.session.turn_count > 0 or bool(session_id)
        ui = ChatUI(chat, memory, console, stream=stream, data_dir=data_dir, log_path=log_path)
        if not resumed:
            ui.created.add(chat.session.id)
        ui.loader = loader
        ui.banner(resumed)

        reader = None
        if _stdio_is_tty() and os.environ.get("TERM") != "dumb":
            try:
                reader = _PromptInput(ui)
            except Exception:  # no usable terminal after all: fall back to plain lines
                log.warning("prompt-toolkit unavailable", exc_info=True)
        if reader is None:
            reader = _PlainInput(show_prompt=_stdio_is_tty())
        ui.reader = reader
        return ui.loop(reader)
    finally:
        loader.close()
        memory.close()
