"""The assistant as a LangChain chat model.

    model = NextGPTChatModel(model="tiny")                   # or assistant=Assistant(settings, "tiny")
    model.invoke("draw a red circle", want=["image"])
    for chunk in model.stream("hello", stop=["."]): ...      # AIMessageChunk text deltas

Messages in: text plus standard media content blocks (`{"type": "image" | "audio" | "video",
"url": "file://…"}` or `"base64"` + `"mime_type"`; OpenAI's `image_url` / `input_audio` forms
too). Media are checked like any attachment; a block of any other type is an error naming it.
Text and media keep their order: a message that is one run of text and one run of media is one
turn in the model's own layout (media, then text); text between media items splits the message
into consecutive turns so that every item stays where it was.

Message out: an `AIMessage` whose content is a text block followed by one media block per
generated file (a `file://` url, its mime type, sizes in `extras`) — or, when the reply named a
thing before it made it and went on talking, ordered parts: text, media, text… each item where
its signal stood (`AssistantReply.parts`); `usage_metadata` counts
prompt positions (a media item is one) and generated tokens (signal tokens included);
`response_metadata` holds the raw token trace, the seed, the finish reason and any decoder
failures. `stream()` yields the text as it is generated; the media blocks, the usage and the
metadata come on the last chunk.

Standard parameters, all honoured: `temperature`, `max_tokens`, `stop` (the text ends before the
first stop string; media it asked for are still made), `timeout` (seconds for the whole call,
waiting for the model included: `TimedOut`, a `TimeoutError`), `max_retries` (a call that runs out
of memory, the one transient failure of a local model, is tried again), `model` (the profile; a
per-call `model` must name the same one). Also `top_p`, `seed`, `want`, `steps`, `guidance`.
Unknown parameters are refused.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator
from urllib.parse import unquote, urlparse

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, model_validator

from assistant.agent import Assistant, Cancelled, TimedOut
from nextgpt.messages import MediaInput, Message

MEDIA_TYPES = ("image", "audio", "video")
CALL_OPTIONS = {"want", "seed", "temperature", "max_tokens", "top_p", "steps", "guidance", "timeout", "model"}


def _block_path(block: dict, media_dir: Path) -> Path:
    if block.get("url"):
        url = urlparse(block["url"])
        if url.scheme == "file":
            return Path(unquote(url.path))
        if url.scheme == "data":
            block = {"base64": block["url"].split(",", 1)[1]}
        else:
            raise ValueError(f"only file:// and data: media urls are accepted, not {block['url'][:40]!r}")
    if block.get("base64"):
        data = base64.b64decode(block["base64"])
        path = media_dir / hashlib.sha256(data).hexdigest()
        path.write_bytes(data)
        return path
    if block.get("path"):
        return Path(block["path"])
    raise ValueError(f"a {block.get('type')} block needs a file:// url, base64 data or a path")


def _media_type(block: dict) -> str | None:
    if block["type"] in MEDIA_TYPES:
        return block["type"]
    if block["type"] == "file" and str(block.get("mime_type") or "").split("/")[0] in MEDIA_TYPES:
        return block["mime_type"].split("/")[0]
    return None


def to_messages(message: BaseMessage, media_dir: Path) -> list:
    """A LangChain message → our Message(s) (usually one; see the module doc for the order)."""
    from nextgpt.media import validate_attachment

    role = {"human": "user", "ai": "assistant", "system": "system"}.get(message.type)
    if role is None:
        raise ValueError(f"unsupported message type {message.type!r}: nextgpt takes human, AI and system messages")
    if role == "assistant":  # what the assistant made is in its trace as signal tokens
        return [Message(role, message.response_metadata.get("token_trace") or message.text)]
    runs: list[list] = []  # alternating runs: ["text", [str...]] / ["media", [MediaInput...]]
    for block in message.content_blocks:
        if block["type"] == "text":
            kind, item = "text", block["text"]
        elif _media_type(block):
            if role == "system":
                raise ValueError("a system message takes text only, not a media block")
            path = _block_path(block, media_dir)
            kind, item = "media", MediaInput(validate_attachment(path), path=path)
        else:
            raise ValueError(f"unsupported content block type {block['type']!r}: nextgpt takes text, image, audio and video blocks")
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(item)
        else:
            runs.append([kind, [item]])
    if len(runs) <= 2:  # one run of text and/or one of media: the model's own layout, media first
        texts = [t for kind, items in runs if kind == "text" for t in items]
        media = [m for kind, items in runs if kind == "media" for m in items]
        return [Message(role, "\n".join(texts), media)]
    out, media = [], []
    for kind, items in runs:  # each media run goes with the text after it; order is kept
        if kind == "media":
            media = items
        else:
            out.append(Message(role, "\n".join(items), media))
            media = []
    if media:
        out.append(Message(role, "", media))
    return out


def media_block(m) -> dict:
    extras = {k: getattr(m, k) for k in ("width", "height", "frames", "fps", "duration", "seed") if getattr(m, k, None) is not None}
    return {"type": m.modality, "url": Path(m.path).resolve().as_uri(), "mime_type": m.mime, "extras": extras}


_ASSISTANTS: dict[str, Assistant] = {}  # profile → one loaded model per process, for model="NAME"


def assistant_for(profile: str) -> Assistant:
    if profile not in _ASSISTANTS:
        from nextgpt.config import load_settings

        _ASSISTANTS[profile] = Assistant(load_settings(), profile)
    return _ASSISTANTS[profile]


def _out_of_memory() -> tuple[type[BaseException], ...]:
    import torch

    return (MemoryError, torch.OutOfMemoryError)


class NextGPTChatModel(BaseChatModel):
    assistant: Any = None  # assistant.agent.Assistant; built from `model` when not given
    model: str | None = Field(None, description="the profile (default: the assistant's)")
    want: list[str] = []
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=10)
    max_tokens: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: list[str] | None = None
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)
    timeout: float | None = Field(None, gt=0, description="seconds for a whole call, waiting for the model included")
    max_retries: int = Field(0, ge=0, description="tries again after running out of memory")
    streaming: bool = False

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    @model_validator(mode="after")
    def _resolve(self) -> "NextGPTChatModel":
        if self.assistant is None:
            if self.model is None:
                raise ValueError("give a profile (model='tiny') or an assistant")
            self.assistant = assistant_for(self.model)
        elif self.model is None:
            self.model = self.assistant.profile_name
        elif self.model != self.assistant.profile_name:
            raise ValueError(f"model={self.model!r} but the assistant serves profile {self.assistant.profile_name!r}")
        return self

    @property
    def _llm_type(self) -> str:
        return "nextgpt"

    @property
    def _identifying_params(self) -> dict:
        return {"model": self.model, "want": self.want, "seed": self.seed}

    def _get_ls_params(self, stop=None, **kwargs):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "nextgpt"
        if stop is None and self.stop:
            params["ls_stop"] = self.stop
        return params

    # ------------------------------------------------------------------ one call
    def _options(self, stop, kwargs) -> dict:
        unknown = set(kwargs) - CALL_OPTIONS - {"stream"}
        if unknown:
            raise ValueError(f"unsupported parameter(s) {', '.join(sorted(unknown))}; nextgpt takes {', '.join(sorted(CALL_OPTIONS | {'stop'}))}")
        if kwargs.get("model") not in (None, self.model):
            raise ValueError(f"this model serves profile {self.model!r}, not {kwargs['model']!r} (one model per NextGPTChatModel)")
        opt = {k: kwargs.get(k, getattr(self, k)) for k in ("want", "seed", "temperature", "top_p", "steps", "guidance", "timeout")}
        opt["max_new_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        opt["stop"] = self.stop if stop is None else stop
        return opt

    def _call(self, messages: list[BaseMessage], opt: dict, on_text=None, cancel: threading.Event | None = None):
        """Run one reply (holding the assistant's lock) and return the AssistantReply."""
        timeout = opt.pop("timeout")
        deadline = None if timeout is None else time.monotonic() + timeout

        def check():
            if cancel is not None and cancel.is_set():
                raise Cancelled("the caller stopped reading the stream")
            if deadline is not None and time.monotonic() > deadline:
                raise TimedOut(f"nextgpt: no reply within timeout={timeout} s")

        sent = []

        def stream(piece):
            sent.append(piece)
            if on_text is not None:
                on_text(piece)

        with tempfile.TemporaryDirectory(prefix="nextgpt-lc-") as tmp:
            ours = [m for message in messages for m in to_messages(message, Path(tmp))]
            for attempt in range(self.max_retries + 1):
                if not self.assistant.lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
                    raise TimedOut(f"nextgpt: the model stayed busy for the whole timeout={timeout} s")
                try:
                    return self.assistant.respond(ours, on_text=stream, check=check, **opt)
                except _out_of_memory():
                    if attempt == self.max_retries or sent:  # streamed text cannot be taken back
                        raise
                    _free_memory()
                finally:
                    self.assistant.lock.release()

    def _final(self, reply, *, stream: bool) -> dict:
        """Content, usage and metadata of a finished reply (the last chunk's, when streaming)."""
        media = [media_block(m) for m in reply.media]
        if stream:
            content = media  # the text came as it was generated
        elif any(p is not None and p < len(reply.text) for p in reply.places):  # media between words: in order
            content = [{"type": "text", "text": x} if kind == "text" else media_block(x) for kind, x in reply.parts()]
        else:
            content = [{"type": "text", "text": reply.text}] + media
        return {
            "content": content,
            "usage_metadata": {
                "input_tokens": reply.prompt_tokens,
                "output_tokens": reply.output_tokens,
                "total_tokens": reply.prompt_tokens + reply.output_tokens,
            },
            "response_metadata": {
                "token_trace": reply.trace, "seed": reply.seed, "finish_reason": reply.finish_reason,
                "failures": [f"{f.modality} decoder ({f.tool}) failed: {f.error}" for f in reply.failures],
                "model_name": self.model, "model_provider": "nextgpt",
            },
        }

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        on_text = run_manager.on_llm_new_token if run_manager else None
        reply = self._call(messages, self._options(stop, kwargs), on_text=on_text)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(**self._final(reply, stream=False)))])

    # ------------------------------------------------------------------ streaming
    def _start(self, messages, stop, kwargs, put) -> tuple[threading.Thread, threading.Event]:
        """Run the reply on a thread; `put(("text", piece))`, then `put(("end", reply))` or `put(("error", e))`."""
        opt = self._options(stop, kwargs)  # bad parameters fail here, in the caller's thread
        cancel = threading.Event()

        def work():
            try:
                put(("end", self._call(messages, opt, on_text=lambda piece: put(("text", piece)), cancel=cancel)))
            except BaseException as e:  # noqa: BLE001 - handed to the reader, who raises it
                put(("error", e))

        thread = threading.Thread(target=work, name="nextgpt-langchain", daemon=True)
        thread.start()
        return thread, cancel

    def _chunk(self, kind, value) -> ChatGenerationChunk:
        if kind == "text":
            return ChatGenerationChunk(message=AIMessageChunk(content=value))
        return ChatGenerationChunk(message=AIMessageChunk(**self._final(value, stream=True), chunk_position="last"))

    def _stream(self, messages, stop=None, run_manager=None, **kwargs) -> Iterator[ChatGenerationChunk]:
        events: queue.Queue = queue.Queue()
        thread, cancel = self._start(messages, stop, kwargs, events.put)
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "text" and run_manager:
                    run_manager.on_llm_new_token(value)
                yield self._chunk(kind, value)
                if kind == "end":
                    return
        finally:  # the reader stopped early (or is done): end generation at the next token
            cancel.set()
            thread.join()

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs) -> AsyncIterator[ChatGenerationChunk]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        thread, cancel = self._start(messages, stop, kwargs, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            while True:
                kind, value = await events.get()
                if kind == "error":
                    raise value
                if kind == "text" and run_manager:
                    await run_manager.on_llm_new_token(value)
                yield self._chunk(kind, value)
                if kind == "end":
                    return
        finally:
            cancel.set()
            await asyncio.to_thread(thread.join)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
