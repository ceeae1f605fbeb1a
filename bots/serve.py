"""`nextgpt serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one loaded profile.

    POST /v1/chat/completions    text, image_url (data: URL; file: URL on loopback), input_audio and
                                 video_url parts; stream=true as server-sent events; media out as
                                 /v1/files/{sha256} URLs (markdown in the content + `message.media`)
    POST /v1/images/generations  forces an image; response_format url | b64_json
    GET  /v1/models              one model per profile (`loaded` marks the one this server runs)
    GET  /v1/files/{sha256}      a generated file (content-addressed; no key needed)

One model serves every request: requests wait in a fair queue (round-robin between API keys, a cap
per key) and run one at a time on a worker thread, so the event loop never waits on the model. A
client that disconnects cancels its request (still waiting: removed from the queue; running: it
stops at the next token or denoising step). Stateless by default; the `X-NextGPT-Session` header
maps a conversation onto a memory session (`new` starts one; its id comes back in the same header),
whose history and key/value cache are reused: then only the last user message of the request is new.

Keys: `Authorization: Bearer KEY`, KEY one of $NEXTGPT_API_KEYS (comma-separated) or
`serve.api_keys` in config.yaml. Without keys the server runs only on a loopback address.
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with the HTTP status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from nextgpt.messages import MediaInput, Message

log = logging.getLogger("nextgpt.serve")

KEYS_ENV = "NEXTGPT_API_KEYS"
MEMORY_URL_ENV = "NEXTGPT_MEMORY_URL"
SESSION_HEADER = "X-NextGPT-Session"
MODALITIES = ("image", "audio", "video")
AUDIO_FORMATS = {"wav", "mp3", "flac", "ogg"}
MIME = {"png": "image/png", "gif": "image/gif", "wav": "audio/wav", "mp4": "video/mp4"}


class ServeConfig(BaseModel):
    """The `serve:` section of config.yaml."""

    model_config = {"extra": "forbid"}

    api_keys: list[str] = Field(default_factory=list, description=f"accepted bearer keys (${KEYS_ENV} wins)")
    memory_url: str | None = Field(None, description=f"SQLAlchemy URL of the memory (${MEMORY_URL_ENV} wins); default SQLite in data_dir")
    public_url: str | None = Field(None, description="base URL for file links (default: from the request)")
    max_request_mb: float = Field(64, gt=0, description="largest request body")
    max_attachment_mb: float = Field(50, gt=0, description="largest single media part (decoded)")
    per_key_queue_cap: int = Field(4, ge=1, description="requests waiting or running per key")
    rate_limit_per_minute: int = Field(120, ge=1)
    max_queue: int = Field(100, ge=1)
    max_images: int = Field(4, ge=1, description="largest `n` for /v1/images/generations")

    def keys(self) -> list[str]:
        env = os.environ.get(KEYS_ENV)
        return [k.strip() for k in env.split(",") if k.strip()] if env else list(self.api_keys)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------- requests
def _number(body: dict, name: str, kind, lo=None, hi=None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or (
        kind is int and isinstance(value, float)
    ):
        raise ApiError(400, f"{name} must be {'a number' if kind is float else 'a whole number'}, not {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"{name} must be between {lo} and {hi}, not {value}", param=name)
    return kind(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    return [s for s in stop if s]


def _want(body: dict) -> list[str]:
    want = []
    modalities = body.get("modalities")
    if modalities is not None:
        if not isinstance(modalities, list) or any(m not in ("text", *MODALITIES) for m in modalities):
            raise ApiError(400, f"modalities must be a list of text, {', '.join(MODALITIES)}; got {modalities!r}", param="modalities")
        want += [m for m in modalities if m != "text"]
    extra = body.get("nextgpt") or {}
    if not isinstance(extra, dict):
        raise ApiError(400, "nextgpt must be an object", param="nextgpt")
    for m in extra.get("want") or []:
        if m not in MODALITIES:
            raise ApiError(400, f"nextgpt.want: unknown modality {m!r}; expected one of {', '.join(MODALITIES)}", param="nextgpt.want")
        want.append(m)
    return list(dict.fromkeys(want))


def _settings(body: dict) -> dict:
    """Generation settings of a request, validated (None = the profile's default)."""
    extra = body.get("nextgpt") or {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1 (one reply per request)", param="n")
    return {
        "seed": _number(body, "seed", int, 0, 2**63 - 1),
        "temperature": _number(body, "temperature", float, 0, 2),
        "top_p": _number(body, "top_p", float, 1e-6, 1),
        "max_new_tokens": _number({"max_tokens": max_tokens}, "max_tokens", int, 1, 8192),
        "steps": _number(extra, "steps", int, 1, 500),
        "guidance": _number(extra, "guidance", float, 0, 100),
    }


class Attachments:
    """Media parts of a request, written to a temp dir and checked like the CLI's attachments."""

    def __init__(self, max_bytes: int, allow_files: bool):
        self.dir = tempfile.TemporaryDirectory(prefix="nextgpt-serve-")
        self.max_bytes = max_bytes
        self.allow_files = allow_files
        self.count = 0

    def close(self) -> None:
        self.dir.cleanup()

    def _write(self, data: bytes, param: str) -> Path:
        self.count += 1
        path = Path(self.dir.name) / f"part-{self.count}"
        path.write_bytes(data)
        return path

    def _base64(self, text: str, param: str) -> bytes:
        if len(text) * 3 // 4 > self.max_bytes:
            raise ApiError(413, f"{param}: file too large (limit {self.max_bytes / 2**20:g} MiB)",
                           param=param, code="file_too_large")  # fmt: skip
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{param}: not valid base64", param=param) from None

    def url(self, url: str, param: str) -> Path:
        if not isinstance(url, str):
            raise ApiError(400, f"{param}: url must be a string", param=param)
        parsed = urlparse(url)
        if parsed.scheme == "data":
            head, sep, payload = url.partition(",")
            if not sep or ";base64" not in head:
                raise ApiError(400, f"{param}: a data: URL must be base64 (data:<mime>;base64,...)", param=param)
            return self._write(self._base64(payload, param), param)
        if parsed.scheme == "file":
            if not self.allow_files:
                raise ApiError(400, f"{param}: file: URLs are accepted only by a server on a loopback address", param=param)
            return Path(unquote(parsed.path))
        raise ApiError(400, f"{param}: only data: URLs (and file: URLs on loopback) are accepted, not {url[:40]!r}; "
                       "the server does not download", param=param)  # fmt: skip

    def part(self, part: dict, param: str) -> tuple[str, Path]:
        """(modality, path) of a media part, checked (type by content, size, decompression bombs)."""
        from nextgpt.media import AttachmentError, validate_attachment

        kind = part["type"]
        if kind == "image_url":
            path, expected = self.url((part.get("image_url") or {}).get("url"), param), "image"
        elif kind == "video_url":  # not OpenAI's: a nextgpt extension in the same shape
            path, expected = self.url((part.get("video_url") or {}).get("url"), param), "video"
        else:  # input_audio
            audio = part.get("input_audio") or {}
            if audio.get("format") not in AUDIO_FORMATS:
                raise ApiError(400, f"{param}.input_audio.format must be one of {', '.join(sorted(AUDIO_FORMATS))}", param=param)
            path, expected = self._write(self._base64(audio.get("data") or "", param), param), "audio"
        try:
            modality = validate_attachment(path, max_bytes=self.max_bytes)
        except AttachmentError as e:  # the temp file's name means nothing to the client: name the part
            too_big = "too large" in e.problem or "too long" in e.problem
            raise ApiError(413 if too_big else 400, f"{param}: {e.problem}", param=param,
                           code="file_too_large" if too_big else "invalid_file") from None  # fmt: skip
        if modality != expected:
            raise ApiError(400, f"{param}: a {kind} part holds {expected}, but this file is {modality}", param=param)
        return modality, path


def parse_messages(messages, attachments: Attachments) -> list[tuple[str, str, list[tuple[str, Path]]]]:
    """OpenAI messages → [(role, text, [(modality, path), ...])]. Media parts go before the text of
    their message, as the model was trained; text between media parts starts a new turn, so the
    order of parts is kept (as assistant.langchain)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role {m.get('role')!r} is not supported; use system, user or assistant",
                           param=f"messages[{i}].role")  # fmt: skip
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append((role, content or "", []))
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content")
        runs: list[list] = []
        for j, part in enumerate(content):
            param = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                item, run = str(part.get("text", "")), "text"
            elif kind in ("image_url", "input_audio", "video_url"):
                if role != "user":
                    raise ApiError(400, f"{param}: only user messages take media parts", param=param)
                item, run = attachments.part(part, param), "media"
            else:
                raise ApiError(400, f"{param}: unsupported content part type {kind!r}; nextgpt takes text, image_url, "
                               "input_audio and video_url", param=f"{param}.type", code="unsupported_content_type")  # fmt: skip
            if runs and runs[-1][0] == run:
                runs[-1][1].append(item)
            else:
                runs.append([run, [item]])
        if len(runs) <= 2:
            out.append((role, "\n".join(t for r, items in runs if r == "text" for t in items),
                        [x for r, items in runs if r == "media" for x in items]))  # fmt: skip
            continue
        media: list = []
        for run, items in runs:
            if run == "media":
                media = items
            else:
                out.append((role, "\n".join(items), media))
                media = []
        if media:
            out.append((role, "", media))
    return out


# ---------------------------------------------------------------------------------------- the model side
class Cancel:
    """Set when the client goes away; `check` raises in the worker at the next token or step."""

    def __init__(self):
        self.event = threading.Event()

    def check(self) -> None:
        from assistant.agent import Cancelled

        if self.event.is_set():
            raise Cancelled("the client disconnected")


class Backend:
    """The loaded assistant, the memory and the fair queue with its worker thread."""

    def __init__(self, assistant, memory, config: ServeConfig, *, max_chats: int = 64):
        from bots.discord.queue import FairQueue, Worker

        self.assistant = assistant
        self.memory = memory
        self.config = config
        self.queue = FairQueue(per_user_cap=config.per_key_queue_cap, rate_per_minute=config.rate_limit_per_minute,
                               max_waiting=config.max_queue)  # fmt: skip
        self.worker = Worker(self.queue, name="nextgpt-serve-worker")
        from assistant.session import Chats

        self.chats = Chats(assistant, memory, max_chats=max_chats)  # the sessions' chats with their KV caches

    def start(self, warmup: bool = True) -> None:
        self.worker.start()
        if warmup:  # load the model, its media parts and the tools before the first request (it waits in the queue meanwhile)
            self.queue.submit("system", lambda job: self.assistant.warm(), exempt=True)

    def stop(self) -> None:
        self.queue.close()

    def submit(self, user: str, fn, label: str):
        from bots.discord.queue import QueueClosed, QueueFull, QueueRejected

        try:
            return self.queue.submit(user, fn, label=label)
        except (QueueFull, QueueClosed) as e:
            raise ApiError(503, str(e), type="server_error", code="overloaded") from None
        except QueueRejected as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None

    def reply(self, messages, *, want, settings, stop, session: str | None, on_text, cancel: Cancel):
        """Run on the worker thread: one reply, stateless or in a memory session."""
        from assistant.agent import StopFilter, first_stop
        from assistant.session import ChatSettings

        with self.assistant.lock:
            if session is None:
                ours = [Message(role, text, [MediaInput(m, path=p) for m, p in media]) for role, text, media in messages]
                return self.assistant.respond(ours, want=want, stop=stop, on_text=on_text, check=cancel.check, **settings), None
            chat = self.chats.get(session, ChatSettings.of(settings))
            role, text, media = messages[-1]
            if role != "user":
                raise ApiError(400, "with a session the last message must be the user's new message", param="messages")
            chat.staged = list(media)
            # Chat takes no stop strings: the text is cut here (the stored turn keeps it whole)
            stream = StopFilter(stop, on_text)

            def text_piece(piece):
                cancel.check()
                stream(piece)

            reply = chat.send(text, want=want, on_text=text_piece, on_progress=lambda *a: cancel.check())
            stream.flush()
            cut = first_stop(reply.text, stop)
            if cut is not None:
                reply.text, reply.finish_reason = reply.text[:cut].rstrip(), "stop"
            return reply, chat.session.id


# ---------------------------------------------------------------------------------------- the app
def _media_json(m, base: str) -> dict:
    out = {"modality": m.modality, "url": f"{base}/v1/files/{m.sha256}", "mime_type": m.mime, "sha256": m.sha256}
    for k in ("width", "height", "frames", "fps", "duration", "sample_rate", "seed"):
        if getattr(m, k, None) is not None:
            out[k] = getattr(m, k)
    if getattr(m, "preview_path", None):
        out["preview_url"] = f"{base}/v1/files/{Path(m.preview_path).stem}"
    return out


def _markdown(media: list[dict]) -> str:
    lines = [f"![{m['modality']}]({m['url']})" if m["modality"] == "image" else f"[{m['modality']}]({m['url']})" for m in media]
    return "".join(f"\n\n{line}" for line in lines)


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def create_app(backend: Backend, *, keys: list[str], allow_file_urls: bool) -> FastAPI:
    config = backend.config
    profile = backend.assistant.profile_name
    settings = backend.assistant.settings

    app = FastAPI(title="nextgpt", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    def client(request: Request) -> str:
        """The caller: their key (fair queueing is per key), or their address when there are no keys."""
        if not keys:
            return request.client.host if request.client else "local"
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send Authorization: Bearer KEY", code="invalid_api_key")
        for k in keys:
            if secrets.compare_digest(token.strip().encode(), k.encode()):
                return "key:" + k[-6:] + str(keys.index(k))
        raise ApiError(401, "invalid API key", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        limit = int(config.max_request_mb * 2**20)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared) // 2**20} MiB is over the limit of {config.max_request_mb:g} MiB",
                           code="request_too_large")  # fmt: skip
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise ApiError(413, f"request body is over the limit of {config.max_request_mb:g} MiB", code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is None:
            raise ApiError(400, "model is required", param="model")
        if name != profile:
            known = name in settings.profiles
            raise ApiError(404, f"model {name!r} is not served here: this server runs {profile!r}"
                           + ("; start another `nextgpt serve --profile NAME` for it" if known else ""),
                           param="model", code="model_not_found")  # fmt: skip

    def base_url(request: Request) -> str:
        return (config.public_url or str(request.base_url)).rstrip("/")

    async def run(request: Request, user: str, fn, label: str, poll: dict | None = None):
        """Queue fn(on_text, cancel) on the worker; yields ("text", piece) and finally ("end", result).
        The job leaves the queue (or stops running) when the client goes away."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = Cancel()

        def put(event):
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, event)

        def job_fn(job):
            cancel.check()
            return fn(lambda piece: put(("text", piece)), cancel)

        job = backend.submit(user, job_fn, label)
        job.future.add_done_callback(lambda f: put(("done", f)))
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    # once a stream has begun, StreamingResponse itself watches for the disconnect
                    if (poll or {}).get("on", True) and await request.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if kind == "text":
                    yield kind, value
                    continue
                try:
                    result = value.result()
                except Exception as e:
                    raise _as_api_error(e) from None
                yield "end", result
                return
        finally:
            if not job.future.done():  # the client went away (or the stream was closed)
                cancel.event.set()
                backend.queue.cancel(job.id)

    @app.get("/v1/models")
    async def models(request: Request):
        client(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "nextgpt", "loaded": name == profile}
            for name in settings.profiles
        ]}  # fmt: skip

    @app.get("/v1/files/{sha256}")
    async def files(sha256: str):
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ApiError(404, "no such file", code="not_found")
        for path in sorted(backend.assistant.output_dir.glob(f"{sha256}.*")):
            return FileResponse(path, media_type=MIME.get(path.suffix[1:], "application/octet-stream"))
        if sha256 in backend.memory.blobs:  # a session's media
            return FileResponse(backend.memory.blobs.path(sha256), media_type="application/octet-stream")
        raise ApiError(404, "no such file", code="not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        user = client(request)
        body = await read_json(request)
        check_model(body)
        gen = _settings(body)
        want, stop = _want(body), _stop(body)
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        session = request.headers.get(SESSION_HEADER)
        if session:
            from memory import SessionNotFound

            try:
                session = (backend.memory.create_session(None, profile) if session == "new" else backend.memory.get_session(session)).id
            except SessionNotFound as e:
                raise ApiError(404, str(e).strip("'\""), param=SESSION_HEADER, code="session_not_found") from None
        attachments = Attachments(int(config.max_attachment_mb * 2**20), allow_file_urls)
        try:
            messages = parse_messages(body.get("messages"), attachments)
        except BaseException:
            attachments.close()
            raise
        base = base_url(request)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def fn(on_text, cancel):
            try:
                return backend.reply(messages, want=want, settings=gen, stop=stop, session=session, on_text=on_text, cancel=cancel)
            finally:
                attachments.close()

        def final(reply) -> tuple[dict, str, dict]:
            media = [_media_json(m, base) for m in reply.media]
            usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.output_tokens,
                     "total_tokens": reply.prompt_tokens + reply.output_tokens}  # fmt: skip
            extra = {"media": media, "seed": reply.seed, "session": session,
                     "failures": [f"{f.modality} decoder ({f.tool}) failed: {f.error}" for f in reply.failures]}  # fmt: skip
            return extra, _markdown(media), usage

        headers = {SESSION_HEADER: session} if session else {}
        poll = {"on": True}
        events = run(request, user, fn, "chat", poll)
        if not stream:
            async for kind, value in events:
                if kind == "end":
                    reply, _ = value
                    extra, links, usage = final(reply)
                    message = {"role": "assistant", "content": reply.text + links, "refusal": None, **extra}
                    return JSONResponse({
                        "id": rid, "object": "chat.completion", "created": created, "model": profile,
                        "choices": [{"index": 0, "message": message, "finish_reason": _finish(reply.finish_reason), "logprobs": None}],
                        "usage": usage, "system_fingerprint": None,
                    }, headers=headers)  # fmt: skip

        def chunk(delta: dict, finish: str | None = None, **more) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": profile,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **more}  # fmt: skip
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        # the first event (queued, then the first text) decides between an error status and a stream
        first = await anext(events)

        async def sse():
            poll["on"] = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                event = first
                while True:
                    kind, value = event
                    if kind == "text":
                        yield chunk({"content": value})
                    else:
                        reply, _ = value
                        extra, links, usage = final(reply)
                        yield chunk({"content": links, **extra}, _finish(reply.finish_reason))
                        if include_usage:
                            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": profile,
                                    "choices": [], "usage": usage}  # fmt: skip
                            yield f"data: {json.dumps(data)}\n\n"
                        break
                    event = await anext(events)
            except ApiError as e:  # after the stream began: the error is the last event
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                await events.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})

    @app.post("/v1/images/generations")
    async def images(request: Request):
        user = client(request)
        body = await read_json(request)
        if body.get("model") is not None:
            check_model(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        n = _number(body, "n", int, 1, config.max_images) or 1
        fmt = body.get("response_format") or "url"
        if fmt not in ("url", "b64_json"):
            raise ApiError(400, f"response_format must be url or b64_json, not {fmt!r}", param="response_format")
        decoder = backend.assistant.profile.decoders["image"]
        size = f"{decoder.width}x{decoder.height}"
        if body.get("size") not in (None, "auto", size):
            raise ApiError(400, f"size {body.get('size')!r} is not available: this profile makes {size} images", param="size")
        seed = _number(body, "seed", int, 0, 2**63 - 1)
        if seed is None:
            seed = backend.assistant.profile.generation.seed or 0
        base = base_url(request)

        def fn(on_text, cancel):

            out = []
            with backend.assistant.lock:
                for i in range(n):
                    reply = backend.assistant.respond([Message("user", prompt)], want=["image"], seed=seed + i, check=cancel.check)
                    if reply.failures:
                        raise RuntimeError(reply.failures[0].error)
                    out.append(next(m for m in reply.media if m.modality == "image"))
            return out

        async for kind, value in run(request, user, fn, "images"):
            if kind == "end":
                data = []
                for m in value:
                    if fmt == "b64_json":
                        data.append({"b64_json": base64.b64encode(Path(m.path).read_bytes()).decode(), "revised_prompt": None})
                    else:
                        data.append({"url": f"{base}/v1/files/{m.sha256}", "revised_prompt": None})
                return {"created": int(time.time()), "data": data}

    return app


def _as_api_error(e: Exception) -> ApiError:
    from assistant.agent import Cancelled
    from bots.discord.queue import JobCancelled

    if isinstance(e, ApiError):
        return e
    if isinstance(e, (Cancelled, JobCancelled)):
        return ApiError(499, "the request was cancelled", code="cancelled")
    if isinstance(e, ValueError):  # the model's own checks (a prompt over the context budget, ...)
        return ApiError(400, str(e))
    log.error("request failed", exc_info=e)
    return ApiError(500, f"the server failed: {type(e).__name__}: {e}", type="server_error")


# ---------------------------------------------------------------------------------------- entry point
def _error(message: str) -> int:
    print(f"nextgpt: error: {message}", file=sys.stderr)
    return 2


def run(settings, profile: str | None = None, *, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serve until interrupted. 2 for a setup problem (no keys on a public address, bad config)."""
    from nextgpt.config import ConfigError, validate_section

    try:
        config = validate_section(settings, "serve", ServeConfig)
    except ConfigError as e:
        return _error(str(e))
    keys = config.keys()
    if not keys and not is_loopback(host):
        return _error(f"refusing to serve on {host} without API keys: set {KEYS_ENV}=key1,key2 (or serve.api_keys "
                      "in config.yaml), or bind to 127.0.0.1")  # fmt: skip
    import uvicorn

    from assistant.agent import Assistant
    from memory import Memory

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    assistant = Assistant(settings, profile)
    memory = Memory.open(os.environ.get(MEMORY_URL_ENV) or config.memory_url, data_dir=settings.data_path)
    backend = Backend(assistant, memory, config)
    app = create_app(backend, keys=keys, allow_file_urls=is_loopback(host))
    backend.start()
    log.info("serving profile %s on http://%s:%d/v1 (%s)", assistant.profile_name, host, port,
             f"{len(keys)} API key(s)" if keys else "no API key: loopback only")  # fmt: skip
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=True, timeout_graceful_shutdown=5)
    finally:
        backend.stop()
        memory.close()
    return 0
