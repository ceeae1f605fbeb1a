"""The agent: asks the core for text + signal embeddings, routes each signal to its decoder tool.

    messages ──Assistant.generate──► Draft(text, signals, settings) ──Assistant.render([drafts])──► AssistantReply(text, media)

The turn API is these two steps; the caller drives them. `respond` is both for one reply;
`assistant.session.Chat` wraps them for a saved conversation (history → context → generate →
render → saved reply), and every front end (the CLI chat, `nextgpt ask`, Discord, `nextgpt serve`,
LangChain, replay) goes through it. A caller with several turns ready (the Discord bot's batches)
passes all their drafts to one `render`: same-modality signals share one decoder call.

A decoder that fails (bad config, out of memory, any exception) never loses the text reply: the
failure is reported beside it, naming the tool.

Front ends that serve several callers (LangChain, `nextgpt serve`) pass `stop` strings, and a
`check` callable that is called for every streamed piece of text and every decoder step and may
raise `Cancelled` (a client gone, a timeout) to abandon the reply. `Assistant.lock` is held by
whoever generates: the model and the decoders are not safe for concurrent use.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from assistant.settings import ChatSettings
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
    settings: ChatSettings = field(default_factory=ChatSettings)  # the resolved settings it was made with
    want: list[str] = field(default_factory=list)
    places: list = field(default_factory=list)  # per media item: its offset in `text` (None: after it)

    def parts(self) -> list[tuple[str, object]]:
        """The reply as ordered ("text", str) / ("media", MediaOutput) parts: each item where its
        signal stood among the words (memory.records.ordered_parts)."""
        from memory.records import ordered_parts

        return ordered_parts(self.text, self.media, self.places or [None] * len(self.media))


@dataclass
class Draft:
    """A generated turn not yet rendered (`Assistant.generate`): its text, its signals and the
    resolved settings it was made with, which `render` uses for the media."""

    text: str
    trace: str
    signals: list  # nextgpt.loop.Signal, in the order emitted
    finish_reason: str
    settings: ChatSettings  # resolved (ChatSettings.resolved): the seed is concrete
    want: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    output_tokens: int = 0
    places: list = field(default_factory=list)  # per signal: its offset in `text` (None: unknown)
    on_progress: Callable[[str, int, int], None] | None = None  # decoder steps, called during render
    decoder_options: dict = field(default_factory=dict)  # extra decoder keywords (safety_checker)

    @property
    def seed(self) -> int | None:
        return self.settings.seed


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


def _torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


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
        self._tools_lock = threading.Lock()
        self.stacked_calls = 0  # decoder calls that rendered signals of several turns (logs and tests)

    @property
    def model(self):
        if self._model is None:
            from nextgpt.loop import load_model

            # the llama.cpp backend imports no torch until media or a signal group needs it (it sets the
            # threads then); the transformers one imports it now
            if self.settings.threads and self.profile.llm.resolved_backend() != "llama_cpp":
                _torch_threads(self.settings.threads)
            self._model = load_model(self.profile, self.settings.cache_path, n_threads=self.settings.threads or None)
        return self._model

    @property
    def tools(self) -> dict:
        with self._tools_lock:  # a chat's loader thread and its first render may both ask
            if self._tools is None:
                from tools import build_tools

                if self.settings.threads:
                    _torch_threads(self.settings.threads)
                self._tools = build_tools(self.profile.decoders, self.settings.cache_path, self.output_dir)
        return self._tools

    def warm(self, pause: Callable[[], bool] | None = None) -> None:
        """Ready everything a run of turns uses, before the first one asks: the model's media parts
        (`model.warm()`), then each decoder tool with `trace` (`DecoderTool.warm`: its pipeline and, on a CPU,
        its traced UNet; the others load on first use). The long-running front ends call it once, in the
        background; `nextgpt ask` does not. `pause()`, when given, is called before each part and returns
        False to stop: the chat's loader waits there while a reply runs, and stops when the chat ends."""
        parts = [self.model.warm]
        for modality, tool in self.tools.items():
            projector = self.profile.projectors.get(modality)
            parts.append(functools.partial(tool.warm, projector.num_queries if projector is not None else None))
        for part in parts:
            if pause is not None and not pause():
                return
            part()

    # ------------------------------------------------------------------ the turn API
    def generate(
        self,
        messages: list,
        *,
        settings: ChatSettings | None = None,
        want: list[str] = (),
        on_text: Callable[[str], None] | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
        cache=None,
        stop: list[str] | None = None,
        check: Callable[[], None] | None = None,
    ) -> Draft:
        """Step 1 of a turn: the LLM's text and signals (no decoder runs). `settings` (None: all
        the profile's) are resolved here, once: the Draft carries the concrete values.
        `cache`: the conversation's nextgpt.loop.PromptCache, so a turn pays only for new tokens.
        `stop`: the reply's text ends before the first of these strings (the media it asked for are
        still made). `check()`: called for every piece of text and every decoder step; it may raise
        `Cancelled` to abandon the reply. `on_progress(modality, step, total)`: decoder steps, at
        `render`."""
        s = (settings or ChatSettings()).resolved(self.profile)
        stream = None
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
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=self.profile.generation.top_k,
            isolate_groups=self.profile.generation.isolate_groups,
            seed=s.seed,
            on_text=on_text,
            cache=cache,
            stop=stop or (),
        )
        text, trace, finish = reply.text, reply.trace, reply.finish_reason
        if stream is not None:
            stream.flush()
            cut = first_stop(text, stop)
            if cut is not None:  # the text ends there; the signal tokens after it stay in the trace
                text, finish = text[:cut].rstrip(), "stop"
                at = first_stop(trace, stop)
                if at is not None:
                    trace = trace[:at] + "".join(_SIGNAL.findall(trace[at:]))
        return Draft(
            text, trace, list(reply.signals), finish, s, list(want), dict(reply.timings),
            prompt_tokens=int(reply.timings.get("prompt_tokens", 0)), output_tokens=len(reply.token_ids),
            places=[self._place(reply.token_ids, signal.position, text) for signal in reply.signals],
            on_progress=on_progress,
            decoder_options={"safety_checker": s.safety_checker} if s.safety_checker is not None else {},
        )

    def render(self, drafts: Sequence[Draft]) -> list[AssistantReply]:
        """Step 2: every draft's signals → media, one reply per draft, in order. Signals of several
        drafts with the same modality, steps, guidance and decoder options share ONE decoder call
        (each row with its own seed) where the decoder's rows are independent (`rows_independent`);
        when a shared call fails, each row is decoded again alone, so only a row that really fails
        reports a failure. A decoder failure never loses a reply's text: it is reported beside it,
        naming the tool. `Cancelled` (from a draft's `check`) abandons the whole call."""
        drafts = list(drafts)
        outcomes: dict[tuple[int, int], object] = {}  # (draft, signal) → list[MediaOutput] | Exception
        spent = [0.0] * len(drafts)
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for d, draft in enumerate(drafts):
            for i, signal in enumerate(draft.signals):
                key = (signal.modality, draft.settings.steps, draft.settings.guidance,
                       tuple(sorted((k, repr(v)) for k, v in draft.decoder_options.items())),
                       tuple(signal.prompt_embeds.shape[1:]), str(signal.prompt_embeds.dtype))
                if len(drafts) == 1 or not self.batchable(signal.modality):
                    key = (*key, d, i)  # alone
                groups.setdefault(key, []).append((d, i))
        for rows in groups.values():
            t0 = time.perf_counter()
            if len(rows) == 1:
                outcomes[rows[0]] = self._decode(drafts, rows[0])
            else:
                outcomes.update(self._decode_stacked(drafts, rows))
            for d in {d for d, _ in rows}:
                spent[d] += time.perf_counter() - t0
        replies = []
        for d, draft in enumerate(drafts):
            media, failures, places = [], [], []
            for i, signal in enumerate(draft.signals):
                out = outcomes[(d, i)]
                if isinstance(out, Exception):
                    failures.append(_failure(signal.modality, self.tools[signal.modality], out))
                else:
                    media += out
                    places += [draft.places[i] if i < len(draft.places) else None] * len(out)
            replies.append(AssistantReply(
                draft.text, draft.trace, media, failures, draft.finish_reason, draft.settings.seed,
                dict(draft.timings, denoise=spent[d]), prompt_tokens=draft.prompt_tokens,
                output_tokens=draft.output_tokens, settings=draft.settings, want=list(draft.want), places=places,
            ))
        return replies

    def respond(self, messages: list, *, settings: ChatSettings | None = None, want: list[str] = (),
                on_text=None, on_progress=None, cache=None, stop=None, check=None, **values) -> AssistantReply:
        """`generate` then `render`, for one reply. `values`: ChatSettings fields (seed=..., steps=...)
        over `settings`."""
        settings = ChatSettings.layered(settings, ChatSettings.of(values))
        unknown = set(values) - set(ChatSettings.names())
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(sorted(unknown))}")
        draft = self.generate(messages, settings=settings, want=want, on_text=on_text, on_progress=on_progress,
                              cache=cache, stop=stop, check=check)
        return self.render([draft])[0]

    def _place(self, ids: list[int], position: int, text: str) -> int | None:
        """Where a signal stood in the reply's text: the length of the words before it."""
        words = getattr(self.model, "_text", None)
        if words is None:
            return None
        try:
            return min(len(words(ids[:position]).lstrip()), len(text))
        except Exception:  # noqa: BLE001 - a place is a nicety, never a failure
            return None

    def batchable(self, modality: str) -> bool:
        """Whether signals of this modality from several turns may share one decoder call (False
        also when the decoder cannot be built: each turn then meets, and reports, the problem)."""
        try:
            return bool(getattr(self.tools[modality], "rows_independent", True))
        except Exception as e:  # noqa: BLE001
            log.warning("cannot batch the %s decoder: %s: %s", modality, type(e).__name__, e)
            return False

    # ------------------------------------------------------------------ decoder calls
    def _call(self, draft: Draft, modality: str, embeds, seed, callback):
        return self.tools[modality](embeds, seed=seed, steps=draft.settings.steps, guidance=draft.settings.guidance,
                                    callback=callback, **draft.decoder_options)

    def _decode(self, drafts, row, seed=None):
        """One signal alone → its outputs, or the exception its decoder raised (Cancelled re-raised)."""
        d, i = row
        draft = drafts[d]
        signal = draft.signals[i]
        seed = _row_seed(draft, i) if seed is None else seed
        try:
            return self._call(draft, signal.modality, signal.prompt_embeds, seed, _progress(draft, signal.modality))
        except Cancelled:
            raise
        except Exception as e:  # noqa: BLE001 - the text reply survives any decoder failure
            return e

    def _decode_stacked(self, drafts, rows) -> dict:
        import torch

        d0, i0 = rows[0]
        modality = drafts[d0].signals[i0].modality
        seeds = [_row_seed(drafts[d], i) for d, i in rows]
        seeds = [secrets.randbits(63) if s is None else s for s in seeds]
        callbacks = [_progress(drafts[d], modality) for d, _ in rows]

        def progress(step: int, total: int) -> None:
            for cb in callbacks:
                if cb is not None:
                    cb(step, total)

        try:
            embeds = torch.cat([drafts[d].signals[i].prompt_embeds for d, i in rows])
            outputs = self._call(drafts[d0], modality, embeds, seeds, progress)
            if len(outputs) != len(rows):
                raise RuntimeError(f"{len(outputs)} outputs for {len(rows)} rows")
        except Cancelled:
            raise
        except Exception as e:  # noqa: BLE001 - one bad row must not cost the others their result
            log.warning("stacked %s decode of %d rows failed (%s: %s); decoding them one by one",
                        modality, len(rows), type(e).__name__, e)
            return {row: self._decode(drafts, row, seed) for row, seed in zip(rows, seeds)}
        self.stacked_calls += 1
        log.info("decoded %d %s requests in one call", len(rows), modality)
        return {row: [out] for row, out in zip(rows, outputs)}


def _row_seed(draft: Draft, i: int) -> int | None:
    """Signal i of a reply is decoded with the reply's seed + i."""
    return None if draft.settings.seed is None else draft.settings.seed + i


def _progress(draft: Draft, modality: str):
    cb = draft.on_progress
    return (lambda step, total: cb(modality, step, total)) if cb is not None else None


def _failure(modality: str, tool, e: Exception) -> ToolFailure:
    if isinstance(e, ContentWithheld):  # the safety checker flagged it: said in the reply, not an error
        log.info("%s", e)
        return ToolFailure(modality, type(tool).__name__, str(e), withheld=True)
    log.error("decoder %s failed: %s: %s", modality, type(e).__name__, e, exc_info=e)
    return ToolFailure(modality, type(tool).__name__, f"{type(e).__name__}: {e}")


def _checked(on_progress, check):
    def progress(modality, step, total):
        check()
        if on_progress is not None:
            on_progress(modality, step, total)

    return progress
