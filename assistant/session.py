"""A conversation: history from memory → model context → reply → saved back to memory.

    chat = Chat.start(assistant, memory)             # or session_id=..., continue_last=True
    chat.attach("photo.png")                         # checked now, sent with the next prompt
    reply = chat.send("what is this? draw it blue", want=["image"])

Durability: the user's turn (text + attachments snapshotted into the blob store) is committed
BEFORE generation starts; the assistant's turn is written in one transaction once complete. A
Ctrl-C or a killed process mid-reply loses only the unfinished reply.

Context policy (explicit): the prompt holds the session's turns, newest last, as the model's own
template renders them: user text with one media slot per attachment, assistant replies as their
raw token trace — the reply's words, which name what it made ("Here it is in blue: a large blue
circle."), and its signal tokens. That is exactly what stage 3 trains on (and the official format):
an edit such as "now make it blue" is learned from the words of the last reply. The media a reply
produced are not fed back as input slots: the model never sees its own outputs re-encoded in
training, and a reply followed by an unseen `<Img>…</Img>` slot sent the small model into loops
("…fivefivefive"). When the rendered history would exceed `context_tokens −
max_new_tokens`, whole turns are dropped from the oldest end (a user turn and its reply go
together); the newest user turn is always kept. When it has to drop, it drops down to
`TRUNCATE_TO` (¾) of the budget and then keeps that first turn until the budget is exceeded again,
so the prompt's start — and with it the cached prefix — changes once every few turns instead of
every turn (a prompt that changes at its start must be prefilled in full).
"""

from __future__ import annotations

import functools
import mimetypes
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from assistant.agent import Assistant, AssistantReply
from memory import MediaIn, Memory, SessionInfo, TurnInfo

MEDIA_SLOT_TOKENS = 3  # <Img> [embedding] </Img>
TRUNCATE_TO = 0.75  # when the history exceeds the budget, drop oldest turns down to this share of it

MIME_BY_MODALITY = {"image": "image/png", "audio": "audio/wav", "video": "video/mp4"}


@dataclass
class ChatSettings:
    """What `/set` and `/seed` change; None means the profile's default."""

    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None

    def set(self, key: str, value: str) -> None:
        """Parse and set one setting from text; ValueError names the problem."""
        types = {f.name: f.type for f in fields(self)}
        key = {"max_tokens": "max_new_tokens", "max-tokens": "max_new_tokens"}.get(key, key)
        if key not in types:
            raise ValueError(f"unknown setting {key!r}; settable: {', '.join(types)}")
        if value.lower() in {"default", "none", "auto"}:
            setattr(self, key, None)
            return
        kind = int if "int" in str(types[key]) else float
        try:
            parsed = kind(value)
        except ValueError:
            raise ValueError(f"{key} takes {'a whole number' if kind is int else 'a number'}, not {value!r}") from None
        limits = {"steps": (1, 500), "max_new_tokens": (1, 8192), "guidance": (0, 100), "temperature": (0, 10), "top_p": (1e-6, 1)}
        lo, hi = limits.get(key, (None, None))
        if lo is not None and not lo <= parsed <= hi:
            raise ValueError(f"{key} must be between {lo} and {hi}, not {value}")
        setattr(self, key, parsed)


@functools.cache  # the same for the whole process; reading package metadata cost ~10 ms per turn
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("nextgpt", "torch", "transformers", "diffusers", "peft"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


class Chat:
    def __init__(self, assistant: Assistant, memory: Memory, session: SessionInfo, *, context_tokens: int = 2048):
        self.assistant = assistant
        self.memory = memory
        self.session = session
        self.settings = ChatSettings()
        self.context_tokens = context_tokens
        self.staged: list[tuple[str, Path]] = []  # (modality, path) sent with the next prompt
        self._embeddings: dict[str, object] = {}  # sha256 → ImageBind vector of stored media
        self._token_counts: dict[str, int] = {}  # message text → its token count (for truncation)
        self._window_start: str | None = None  # id of the first turn kept in the context (truncation)
        self.cache = None  # nextgpt.model.PromptCache: the LLM's key/value cache across turns
        self.use_cache = True

    @classmethod
    def start(
        cls, assistant: Assistant, memory: Memory, *, session_id: str | None = None,
        continue_last: bool = False, title: str | None = None,
    ) -> "Chat":
        """Resume `session_id` (an id or unique prefix), or the last session, or start a new one."""
        session = None
        if session_id:
            session = memory.get_session(session_id)
        elif continue_last:
            session = memory.last_session()
        if session is None:
            session = memory.create_session(title, assistant.profile_name)
        return cls(assistant, memory, session)

    def new(self, title: str | None = None) -> SessionInfo:
        self.session = self.memory.create_session(title, self.assistant.profile_name)
        self.staged, self.cache = [], None
        return self.session

    def resume(self, session_id: str) -> SessionInfo:
        self.session = self.memory.get_session(session_id)
        self.staged, self.cache = [], None
        return self.session

    def history(self) -> list[TurnInfo]:
        return self.memory.turns(self.session.id)

    # ------------------------------------------------------------------ turns
    def attach(self, path: str | Path) -> str:
        """Check an attachment now (AttachmentError if bad); it is sent with the next prompt."""
        from nextgpt.media import validate_attachment

        modality = validate_attachment(path)
        self.staged.append((modality, Path(path)))
        return modality

    def send(self, text: str, *, want=(), on_text=None, on_progress=None, stop=None, check=None) -> AssistantReply:
        """Save the user's turn, then answer it. `stop` / `check`: as `Assistant.respond` (API callers)."""
        if not text.strip() and not self.staged:
            raise ValueError("empty message: type something or /attach a file")
        media = [MediaIn(path=p, direction="in", modality=m, mime=self._mime(p, m)) for m, p in self.staged]
        self.memory.add_turn(self.session.id, "user", text, media=media)  # committed before generation
        if self.session.title is None:
            self.session = self.memory.rename_session(self.session.id, text.strip()[:60] or "(media)")
        self.staged = []
        return self._reply(want=list(want), on_text=on_text, on_progress=on_progress, stop=stop, check=check)

    def regenerate(self, *, reseed: bool = False, on_text=None, on_progress=None) -> AssistantReply:
        """Drop the last reply and answer the last user turn again (with a new seed if `reseed`)."""
        turns = self.memory.turns(self.session.id, last=2)
        if not turns:
            raise ValueError("nothing to regenerate: this session has no turns yet")
        want: list[str] = []
        if turns[-1].role == "assistant":
            previous = turns[-1].settings or {}
            want = previous.get("want", [])
            if reseed:
                self.settings.seed = (previous.get("seed") or 0) + 1
            self.memory.delete_last_turns(self.session.id, 1)
        return self._reply(want=want, on_text=on_text, on_progress=on_progress)

    def _reply(self, *, want, on_text, on_progress, stop=None, check=None) -> AssistantReply:
        s = self.settings
        messages = self.context(self.memory.turns(self.session.id))
        if self.use_cache and self.cache is None:
            from nextgpt.model import PromptCache

            self.cache = PromptCache()
        reply = self.assistant.respond(
            messages, want=want, seed=s.seed, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
            top_p=s.top_p, steps=s.steps, guidance=s.guidance, on_text=on_text, on_progress=on_progress,
            cache=self.cache if self.use_cache else None, stop=stop, check=check,
        )
        gen = self.assistant.profile.generation
        profile = self.assistant.profile
        settings = {
            "seed": reply.seed,
            "steps": s.steps,
            "guidance": s.guidance,
            "temperature": gen.temperature if s.temperature is None else s.temperature,
            "top_p": s.top_p or gen.top_p,
            "max_new_tokens": s.max_new_tokens or gen.max_new_tokens,
            "want": want,
            "profile": self.assistant.profile_name,
            "llm": profile.llm.source,
            "checkpoint": profile.checkpoint,
            "decoders": {m: d.source for m, d in profile.decoders.items()},
            "versions": dict(_versions()),
            "finish_reason": reply.finish_reason,
            "failures": [asdict(f) for f in reply.failures],
        }
        out = [
            MediaIn(
                path=m.path, direction="out", modality=m.modality, mime=m.mime, width=m.width, height=m.height,
                frames=m.frames, duration=m.duration, meta={"seed": m.seed, "steps": m.steps, "guidance": m.guidance},
            )
            for m in reply.media
        ]
        self.memory.add_turn(
            self.session.id, "assistant", reply.text, token_trace=reply.trace, settings=settings,
            timings=reply.timings, media=out,
        )
        self.session = self.memory.get_session(self.session.id)
        return reply

    # ------------------------------------------------------------------ context
    def context(self, turns: list[TurnInfo]) -> list:
        """Model messages for the session's turns, truncated to the token budget (see module doc)."""
        from nextgpt.model import MediaInput, Message

        messages = []
        for t in turns:
            if t.role == "system":
                messages.append(Message("system", t.text))
                continue
            text = t.text if t.role == "user" else (t.token_trace or t.text)
            present = [m for m in t.media_in if m.path.is_file()] if t.role == "user" else []
            if t.role == "user" and len(present) < len(t.media_in):  # a blob deleted by hand: the session goes on
                text = f"{text} (an attachment of this message is missing)".strip()
            items = [MediaInput(m.modality, embedding=self._embedding(m)) for m in present]
            messages.append(Message(t.role, text, items))
        start = self._truncate(messages, [t.id for t in turns])
        return messages[start:]

    def _embedding(self, media):
        """The ImageBind vector of a stored file, computed once per process (files never change)."""
        if media.sha256 not in self._embeddings:
            self._embeddings[media.sha256] = self.assistant.model.encoder.encode([(media.modality, media.path)])[0]
        return self._embeddings[media.sha256]

    def _truncate(self, messages: list, ids: list[str]) -> int:
        """Index of the first message kept (see the module doc); remembers it by turn id."""
        budget = self.context_tokens - (self.settings.max_new_tokens or self.assistant.profile.generation.max_new_tokens)
        cost = [self._token_count(m.text) + 8 + MEDIA_SLOT_TOKENS * len(m.media) for m in messages]
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        if not users:
            return 0
        start = ids.index(self._window_start) if self._window_start in ids else 0
        start = min(start, users[-1])
        if sum(cost[start:]) > budget:
            while start < users[-1] and sum(cost[start:]) > budget * TRUNCATE_TO:
                start = next(i for i in users if i > start)  # drop the oldest user turn with its reply
        self._window_start = ids[start]
        return start

    def _token_count(self, text: str) -> int:
        """Tokens in a message's text, counted once: the history is not re-tokenised every turn."""
        if text not in self._token_counts:
            if len(self._token_counts) > 10_000:  # a bound for a long-lived Chat across many sessions
                self._token_counts.clear()
            tokenizer = self.assistant.model.tokenizer
            self._token_counts[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._token_counts[text]

    @staticmethod
    def _mime(path: Path, modality: str) -> str:
        guess, _ = mimetypes.guess_type(str(path))
        return guess if guess and guess.startswith(modality) else MIME_BY_MODALITY[modality]
