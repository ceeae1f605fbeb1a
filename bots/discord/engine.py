"""The model side of the bot: `Chat` turns for memory sessions, run only on the queue's worker thread.

`Assistant` is not safe for concurrent generation, so every method that touches the model is
called from jobs of the single `Worker`; session creation only touches memory (thread-safe). A
batch (bots.discord.batch) lends the worker's turn to helper threads, strictly one at a time, each
inside `delegate()`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from assistant.session import Chat, ChatSettings

log = logging.getLogger(__name__)

SETTING_NAMES = ("seed", "steps", "guidance", "temperature", "top_p", "max_new_tokens")
# what a server's /settings may also set: decoder options applied around its turns (Assistant.decoder_options)
SERVER_SETTING_NAMES = SETTING_NAMES + ("safety_checker",)


@dataclass
class TurnResult:
    session_id: str
    turn_index: int  # index of the assistant turn in the session
    text: str
    media: list  # tools.base.MediaOutput
    failures: list  # assistant.agent.ToolFailure
    seed: int | None
    info: dict = field(default_factory=dict)


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


class Engine:
    def __init__(self, assistant, memory, *, max_chats: int = 64, max_cache_bytes: int = 1 << 30):
        """`max_cache_bytes` bounds the chats' key/value caches together (77 MB for 890 tokens on
        `small`, GBs on a 7B): the least recently used chats lose theirs first (recomputed if they
        come back); `max_chats` bounds the number of chats kept at all."""
        self.assistant = assistant
        self.memory = memory
        self.max_chats = max_chats
        self.max_cache_bytes = max_cache_bytes
        self._chats: collections.OrderedDict[str, Chat] = collections.OrderedDict()
        self._worker_thread: int | None = None
        self._local = threading.local()  # .delegate: this thread works for the worker (a batch)

    @property
    def profile_name(self) -> str:
        return self.assistant.profile_name

    # ------------------------------------------------------------------ any thread
    def new_session(self, title: str | None):
        return self.memory.create_session(title, self.assistant.profile_name)

    def session(self, session_id: str):
        return self.memory.get_session(session_id)

    # ------------------------------------------------------------------ worker thread only
    def decoder_tools(self) -> dict:
        """The assistant's modality → decoder tool dict (the batcher swaps one entry during a batch)."""
        self._check_thread()
        return self.assistant.tools

    @contextlib.contextmanager
    def delegate(self):
        """Model work on this thread is the worker's, handed over while the worker waits."""
        self._local.delegate = True
        try:
            yield
        finally:
            self._local.delegate = False

    def warmup(self) -> None:
        """Load the model (and build the decoder tools) before the first user asks."""
        self._check_thread()
        self.assistant.model
        self.assistant.tools

    def turn(
        self, job, session_id: str, *, text: str, attachments: list[tuple[str, Path]] = (), want=(),
        settings: dict | None = None,
    ) -> TurnResult:
        from nextgpt.limits import check_chat_message

        chat = self._chat(session_id, settings)
        chat.staged = list(attachments)
        check_chat_message(chat, text)  # over the budget: a one-line notice, nothing saved
        with self._decoder_options(settings):
            reply = chat.send(text, want=list(want), on_text=job.stream if job else None,
                              on_progress=job.report if job else None)  # fmt: skip
        self._bound_caches()  # this turn grew its cache
        return self._result(chat, reply)

    def regenerate(self, job, session_id: str, *, reseed: bool = False, settings: dict | None = None) -> TurnResult:
        """Answer the last user turn again. The replaced reply's seed, steps and guidance are kept
        (so 🔁 after a change of server defaults changes only what changed); `reseed` moves to the
        next seed."""
        last = self.memory.turns(session_id, last=1)
        previous = (last[-1].settings or {}) if last and last[-1].role == "assistant" else {}
        merged = dict(settings or {})
        merged.update({k: previous[k] for k in ("seed", "steps", "guidance") if previous.get(k) is not None})
        chat = self._chat(session_id, merged)
        with self._decoder_options(settings):
            reply = chat.regenerate(reseed=reseed, on_text=job.stream if job else None,
                                    on_progress=job.report if job else None)  # fmt: skip
        self._bound_caches()
        return self._result(chat, reply)

    # ------------------------------------------------------------------ internals
    def _decoder_options(self, settings: dict | None):
        """The server's decoder options (its `safety_checker`) for the turn run inside."""
        return self.assistant.decoder_options(safety_checker=(settings or {}).get("safety_checker"))

    def _check_thread(self) -> None:
        me = threading.get_ident()
        if getattr(self._local, "delegate", False):
            return
        if self._worker_thread is None:
            self._worker_thread = me
        elif self._worker_thread != me:  # a bug, not a user error: the model must stay on one thread
            log.warning("model work from a second thread (%s, worker is %s)", me, self._worker_thread)

    def _chat(self, session_id: str, settings: dict | None) -> Chat:
        self._check_thread()
        chat = self._chats.pop(session_id, None)
        if chat is None:
            chat = Chat.start(self.assistant, self.memory, session_id=session_id)
        self._chats[session_id] = chat
        while len(self._chats) > self.max_chats:
            self._chats.popitem(last=False)
        self._bound_caches()
        chat.settings = ChatSettings(**{k: v for k, v in (settings or {}).items() if k in SETTING_NAMES})
        chat.staged = []
        return chat

    def _bound_caches(self) -> None:
        """Drop the least recently used chats' KV caches until all of them fit `max_cache_bytes`."""
        sizes = {sid: cache_bytes(c) for sid, c in self._chats.items()}
        total = sum(sizes.values())
        for sid, chat in self._chats.items():  # oldest first
            if total <= self.max_cache_bytes:
                break
            if sizes[sid]:
                chat.cache = None
                total -= sizes[sid]

    def _result(self, chat: Chat, reply) -> TurnResult:
        session = chat.session
        profile = self.assistant.profile
        info = {
            "seed": reply.seed,
            "profile": self.assistant.profile_name,
            "llm": profile.llm.source,
            "media": [
                {
                    "modality": m.modality, "seed": m.seed, "steps": m.steps, "guidance": m.guidance,
                    "decoder": profile.decoders[m.modality].source if m.modality in profile.decoders else None,
                }
                for m in reply.media
            ],
        }
        return TurnResult(
            session_id=session.id, turn_index=session.turn_count - 1, text=reply.text, media=list(reply.media),
            failures=list(reply.failures), seed=reply.seed, info=info,
        )
