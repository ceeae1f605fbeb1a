"""The agent: asks the core for text + signal embeddings, routes each signal to its decoder tool.

    messages ──NextGPT.generate──► Reply(text, signals) ──tools[signal.modality](prompt_embeds)──► media files

A decoder that fails (bad config, out of memory, any exception) never loses the text reply: the
failure is reported beside it, naming the tool.

Front ends that serve several callers (LangChain, `nextgpt serve`) pass `stop` strings, and a
`check` callable that is called for every streamed piece of text and every decoder step and may
raise `Cancelled` (a client gone, a timeout) to abandon the reply. `Assistant.lock` is held by
whoever generates: the model and the decoders are not safe for concurrent use.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nextgpt.config import Settings
from tools.base import ContentWithheld

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The reply was abandoned (raised by a `check` callable); nothing is returned."""


class TimedOut(Cancelled, TimeoutError):
    """The reply took longer than the caller allowed."""


@dataclass
class ToolFailure:
    modality: str
    tool: str
    error: str
    withheld: bool = False  # the decoder's safety checker flagged the output; `error` says so


@dataclass
class AssistantReply:
    text: str
    trace: str
    media: list  # tools.base.MediaOutput, in the order the signals were emitted
    failures: list[ToolFailure]
    finish_reason: str
    seed: int | None
    timings: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0  # LLM input positions (a media item counts as one)
    output_tokens: int = 0  # generated tokens, signal tokens included


_SIGNAL = re.compile(r"\[(?:IMG|VID|AUD)\d+\]")


def first_stop(text: str, stop) -> int | None:
    """Index of the earliest of the `stop` strings in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stop or () if s) if i >= 0]
    return min(hits) if hits else None


class StopFilter:
    """Streams text up to the first of the `stop` strings: a piece that may be the start of a stop
    string is held back until it is known not to be; `flush()` sends what is held at the end."""

    def __init__(self, stop, on_text: Callable[[str], None] | None):
        self.stop = [s for s in stop or () if s]
        self.on_text = on_text
        self.text = ""  # everything received
        self.sent = 0
        self.hit: int | None = None  # where the first stop string starts

    def __call__(self, piece: str) -> None:
        if self.hit is not None:
            return
        self.text += piece if self.text else piece.lstrip()  # the reply's text is stripped too
        self.hit = first_stop(self.text, self.stop)
        end = self.hit if self.hit is not None else len(self.text) - max(map(len, self.stop), default=1) + 1
        self._send(end)

    def flush(self) -> None:
        self._send(self.hit if self.hit is not None else len(self.text))

    def _send(self, end: int) -> None:
        if end > self.sent:
            if self.on_text is not None:
                self.on_text(self.text[self.sent : end])
            self.sent = end


class Assistant:
    """One loaded model and its decoder tools for one profile; built once, reused for every turn."""

    def __init__(self, settings: Settings, profile: str | None = None, output_dir: Path | None = None):
        self.settings = settings
        self.profile_name = settings.profile_name(profile)
        self.profile = settings.profile(self.profile_name)
        self.output_dir = Path(output_dir) if output_dir else settings.output_path
        self._model = None
        self._tools = None
        self.lock = threading.Lock()  # held while generating: one reply at a time
        self._decoder_options = threading.local()  # .value: this thread's `decoder_options`

    @contextlib.contextmanager
    def decoder_options(self, **options):
        """Decoder keywords for the turns this thread runs inside the block, e.g.
        `safety_checker=False` — how a front end applies a per-caller setting (a Discord server's)
        through `Chat`. None values are left out (the profile's setting holds)."""
        previous = getattr(self._decoder_options, "value", {})
        self._decoder_options.value = {**previous, **{k: v for k, v in options.items() if v is not None}}
        try:
            yield
        finally:
            self._decoder_options.value = previous

    @property
    def model(self):
        if self._model is None:
            from nextgpt.model import NextGPT

            if self.settings.threads:
                import torch

                torch.set_num_threads(self.settings.threads)

            self._model = NextGPT.from_profile(self.profile, self.settings.cache_path)
        return self._model

    @property
    def tools(self) -> dict:
        if self._tools is None:
            from tools import build_tools

            self._tools = build_tools(self.profile.decoders, self.settings.cache_path, self.output_dir)
        return self._tools

    def respond(
        self,
        messages: list,
        *,
        want: list[str] = (),
        seed: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        on_text: Callable[[str], None] | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
        cache=None,
        stop: list[str] | None = None,
        check: Callable[[], None] | None = None,
    ) -> AssistantReply:
        """`cache`: the conversation's nextgpt.model.PromptCache, so a turn pays only for new tokens.
        `stop`: the reply's text ends before the first of these strings (the media it asked for are
        still made). `check()`: called for every piece of text and every decoder step; it may raise
        `Cancelled` to abandon the reply."""
        gen = self.profile.generation
        seed = gen.seed if seed is None else seed
        if stop or check:
            stream = StopFilter(stop, on_text)

            def on_text(piece, stream=stream):
                if check:
                    check()
                stream(piece)

            if check:
                on_progress = _checked(on_progress, check)
        reply = self.model.generate(
            messages,
            want=want,
            max_new_tokens=max_new_tokens or gen.max_new_tokens,
            temperature=gen.temperature if temperature is None else temperature,
            top_p=top_p or gen.top_p,
            top_k=gen.top_k,
            seed=seed,
            on_text=on_text,
            cache=cache,
            stop=stop or (),
        )
        media, failures = [], []
        t0 = time.perf_counter()
        for i, signal in enumerate(reply.signals):
            tool = self.tools[signal.modality]
            callback = (lambda step, total, m=signal.modality: on_progress(m, step, total)) if on_progress else None
            try:
                media += tool(
                    signal.prompt_embeds,
                    seed=None if seed is None else seed + i,
                    steps=steps,
                    guidance=guidance,
                    callback=callback,
                    **getattr(self._decoder_options, "value", {}),
                )
            except Cancelled:
                raise
            except ContentWithheld as e:  # the safety checker flagged it: said in the reply, not an error
                log.info("%s", e)
                failures.append(ToolFailure(signal.modality, type(tool).__name__, str(e), withheld=True))
            except Exception as e:  # the text reply survives any decoder failure
                log.exception("decoder %s failed", signal.modality)
                failures.append(ToolFailure(signal.modality, type(tool).__name__, f"{type(e).__name__}: {e}"))
        timings = dict(reply.timings, denoise=time.perf_counter() - t0)
        text, trace, finish = reply.text, reply.trace, reply.finish_reason
        if stop or check:
            stream.flush()
            cut = first_stop(text, stop)
            if cut is not None:  # the text ends there; the signal tokens after it stay in the trace
                text, finish = text[:cut].rstrip(), "stop"
                at = first_stop(trace, stop)
                if at is not None:
                    trace = trace[:at] + "".join(_SIGNAL.findall(trace[at:]))
        return AssistantReply(
            text, trace, media, failures, finish, seed, timings,
            prompt_tokens=int(reply.timings.get("prompt_tokens", 0)), output_tokens=len(reply.token_ids),
        )


def _checked(on_progress, check):
    def progress(modality, step, total):
        check()
        if on_progress is not None:
            on_progress(modality, step, total)

    return progress
