"""A conversation: history from memory → model context → reply → saved back to memory.

    chat = Chat.start(assistant, memory)             # or session_id=..., continue_last=True
    chat.attach("photo.png")                         # checked now, sent with the next prompt
    reply = chat.send("what is this? draw it blue", want=["image"])
    reply = chat.regenerate(reseed=True)             # the one regenerate rule (assistant.settings)

A turn is two steps a caller may drive itself: `draft = chat.generate(text, want=...)` (the
message checked and saved, the reply's text and signals generated) and `chat.finish(draft, reply)`
(the media rendered unless `reply` already holds them, the reply saved). `send` / `regenerate` do
both. The Discord bot renders several chats' drafts in one `Assistant.render` call and then
finishes each. Every front end uses this class: it decides the context, the settings (`settings`,
a ChatSettings; a turn's own layer over it) and what is saved; front ends only present.

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
from dataclasses import asdict
from pathlib import Path

from assistant.agent import Assistant, AssistantReply, Draft
from assistant.settings import ChatSettings, regenerate_settings  # noqa: F401 - ChatSettings is imported from here too
from memory import MediaIn, Memory, SessionInfo, TurnInfo
from nextgpt.messages import MediaInput, Message

MEDIA_SLOT_TOKENS = 3  # <Img> [embedding] </Img>
TRUNCATE_TO = 0.75  # when the history exceeds the budget, drop oldest turns down to this share of it

MIME_BY_MODALITY = {"image": "image/png", "audio": "audio/wav", "video": "video/mp4"}


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
        self.cache = None  # nextgpt.loop.PromptCache: the LLM's key/value cache across turns
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
        """Save the user's turn, then answer it: `finish(generate(...))`."""
        return self.finish(self.generate(text, want=want, on_text=on_text, on_progress=on_progress, stop=stop, check=check))

    def regenerate(self, *, reseed: bool = False, on_text=None, on_progress=None) -> AssistantReply:
        """Answer the last user turn again: `finish(generate_again(...))`."""
        return self.finish(self.generate_again(reseed=reseed, on_text=on_text, on_progress=on_progress))

    def generate(self, text: str, *, want=(), on_text=None, on_progress=None, stop=None, check=None,
                 settings: ChatSettings | None = None) -> Draft:
        """Step 1 of a turn: check the message against the context budget (nothing is saved when it
        is over: `nextgpt.limits.BudgetExceeded`), save it with the staged attachments (committed
        before generation), and generate the reply's text and signals. `settings`: this turn's,
        over the chat's (None: the chat's). `stop` / `check`: as `Assistant.generate`."""
        from nextgpt.limits import check_chat_message

        if not text.strip() and not self.staged:
            raise ValueError("empty message: type something or /attach a file")
        check_chat_message(self, text, settings=self.turn_settings(settings))
        media = [MediaIn(path=p, direction="in", modality=m, mime=self._mime(p, m)) for m, p in self.staged]
        self.memory.add_turn(self.session.id, "user", text, media=media)  # committed before generation
        if self.session.title is None:
            self.session = self.memory.rename_session(self.session.id, text.strip()[:60] or "(media)")
        self.staged = []
        return self._generate(list(want), self.turn_settings(settings), on_text=on_text, on_progress=on_progress,
                              stop=stop, check=check)

    def generate_again(self, *, reseed: bool = False, on_text=None, on_progress=None,
                       settings: ChatSettings | None = None) -> Draft:
        """Step 1 of a regenerate: drop the last reply and generate the last user turn's answer again,
        with the replaced reply's seed, steps and guidance pinned (`reseed`: its seed + 1) over the
        current settings: `assistant.settings.regenerate_settings`, the one rule for every front end."""
        turns = self.memory.turns(self.session.id, last=2)
        if not turns:
            raise ValueError("nothing to regenerate: this session has no turns yet")
        replaced = turns[-1].settings if turns[-1].role == "assistant" else None
        turn = regenerate_settings(self.turn_settings(settings), replaced, reseed=reseed)
        want = list((replaced or {}).get("want", []))
        if turns[-1].role == "assistant":
            self.memory.delete_last_turns(self.session.id, 1)
        return self._generate(want, turn, on_text=on_text, on_progress=on_progress)

    def finish(self, draft: Draft, reply: AssistantReply | None = None) -> AssistantReply:
        """Step 2: render the draft's media (unless `reply` is its rendering already, e.g. from a
        batched `Assistant.render`) and save the reply, in one transaction."""
        if reply is None:
            reply = self.assistant.render([draft])[0]
        profile = self.assistant.profile
        settings = {
            **reply.settings.record(),
            "want": list(reply.want),
            "profile": self.assistant.profile_name,
            "llm": profile.llm.source,
            "checkpoint": profile.checkpoint,
            "decoders": {m: d.source for m, d in profile.decoders.items()},
            "versions": dict(_versions()),
            "finish_reason": reply.finish_reason,
            "failures": [asdict(f) for f in reply.failures],
        }
        # where each item stood among the words, kept only when one stood before the end (ordered parts)
        inside = any(p is not None and p < len(reply.text) for p in reply.places)
        out = [
            MediaIn(
                path=m.path, direction="out", modality=m.modality, mime=m.mime, width=m.width, height=m.height,
                frames=m.frames, duration=m.duration,
                meta={"seed": m.seed, "steps": m.steps, "guidance": m.guidance,
                      **({"at": at} if inside and at is not None else {})},
            )
            for m, at in zip(reply.media, reply.places or [None] * len(reply.media))
        ]
        self.memory.add_turn(
            self.session.id, "assistant", reply.text, token_trace=reply.trace, settings=settings,
            timings=reply.timings, media=out,
        )
        self.session = self.memory.get_session(self.session.id)
        return reply

    def turn_settings(self, settings: ChatSettings | None = None) -> ChatSettings:
        """The settings of the next turn: `settings` over the chat's (None: not set; see
        assistant.settings)."""
        return ChatSettings.layered(self.settings, settings)

    def _generate(self, want, settings: ChatSettings, *, on_text, on_progress, stop=None, check=None) -> Draft:
        messages = self.context(self.memory.turns(self.session.id), settings)
        if self.use_cache and self.cache is None:
            from nextgpt.loop import PromptCache

            self.cache = PromptCache()
        return self.assistant.generate(
            messages, settings=settings, want=want, on_text=on_text, on_progress=on_progress,
            cache=self.cache if self.use_cache else None, stop=stop, check=check,
        )

    # ------------------------------------------------------------------ context
    def context(self, turns: list[TurnInfo], settings: ChatSettings | None = None) -> list:
        """Model messages for the session's turns, truncated to the token budget (see module doc)
        left by the turn's `max_new_tokens` (`settings`, else the chat's)."""
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
        max_new = (settings or self.turn_settings()).resolved(self.assistant.profile).max_new_tokens
        start = self._truncate(messages, [t.id for t in turns], self.context_tokens - max_new)
        return messages[start:]

    def _embedding(self, media):
        """The ImageBind vector of a stored file, computed once per process (files never change)."""
        if media.sha256 not in self._embeddings:
            self._embeddings[media.sha256] = self.assistant.model.encoder.encode([(media.modality, media.path)])[0]
        return self._embeddings[media.sha256]

    def _truncate(self, messages: list, ids: list[str], budget: int) -> int:
        """Index of the first message kept (see the module doc); remembers it by turn id."""
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


def cache_bytes(chat: Chat) -> int:
    """Memory held by a chat's LLM key/value cache (its buffers, spare room included)."""
    kv = getattr(chat.cache, "kv", None)
    if kv is None:
        return 0
    total = 0
    for layer in getattr(kv, "layers", ()):
        tensors = getattr(layer, "buffers", None) or (getattr(layer, "keys", None), getattr(layer, "values", None))
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


class Chats:
    """The open chats of a server front end (Discord, `nextgpt serve`), one per memory session,
    kept with their KV caches. `max_cache_bytes` bounds the caches together (77 MB for 890 tokens
    on `small`, GBs on a 7B): the least recently used chats lose theirs first (recomputed if they
    come back); `max_chats` bounds the number of chats kept at all. Used from the thread that runs
    the model."""

    def __init__(self, assistant: Assistant, memory: Memory, *, max_chats: int = 64, max_cache_bytes: int | None = None):
        import collections

        self.assistant = assistant
        self.memory = memory
        self.max_chats = max_chats
        self.max_cache_bytes = max_cache_bytes
        self._chats: collections.OrderedDict[str, Chat] = collections.OrderedDict()

    def get(self, session_id: str, settings: ChatSettings | None = None) -> Chat:
        """The session's chat (resumed from memory if not open), most recently used now, with
        `settings` as its settings and nothing staged."""
        chat = self._chats.pop(session_id, None)
        if chat is None:
            chat = Chat.start(self.assistant, self.memory, session_id=session_id)
        self._chats[session_id] = chat
        while len(self._chats) > self.max_chats:
            self._chats.popitem(last=False)
        self.bound_caches()
        chat.settings = settings or ChatSettings()
        chat.staged = []
        return chat

    def __len__(self) -> int:
        return len(self._chats)

    def __getitem__(self, session_id: str) -> Chat:
        return self._chats[session_id]

    def items(self) -> list[tuple[str, Chat]]:
        return list(self._chats.items())

    def bound_caches(self) -> None:
        """Drop the least recently used chats' KV caches until all of them fit `max_cache_bytes`."""
        if self.max_cache_bytes is None:
            return
        sizes = {sid: cache_bytes(c) for sid, c in self._chats.items()}
        total = sum(sizes.values())
        for sid, chat in self._chats.items():  # oldest first
            if total <= self.max_cache_bytes:
                break
            if sizes[sid]:
                chat.cache = None
                total -= sizes[sid]
