"""The model side of the bot: memory sessions' turns through the assistant's turn API, run only on
the queue's worker thread.

The engine decides nothing of its own: the context, the settings' meaning (assistant.settings),
the regenerate rule and what is saved are `assistant.session.Chat`'s. A turn is a `TurnWork` (the
job's function): run alone it does `Chat.generate` → `Chat.finish`; a batch (bots.discord.batch)
calls `begin` on each of its jobs, renders all their drafts in one `Assistant.render`, and calls
`end` on each. `Assistant` is not safe for concurrent generation, so every method that touches the
model runs in jobs of the single `Worker`; session creation only touches memory (thread-safe).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from assistant.session import Chats, ChatSettings

log = logging.getLogger(__name__)


@dataclass
class TurnResult:
    session_id: str
    turn_index: int  # index of the assistant turn in the session (its record: memory.turns(...)[turn_index])
    text: str
    media: list  # tools.base.MediaOutput
    failures: list  # assistant.agent.ToolFailure
    seed: int | None


class TurnWork:
    """One Discord turn, a job's function: `work(job)` runs it alone; `begin(job)` and
    `end(job, begun, reply)` are its two halves for a batch (see the module doc)."""

    def __init__(self, engine: "Engine", session_id: str, *, text: str | None = None,
                 attachments: list[tuple[str, Path]] = (), want=(), settings: ChatSettings | dict | None = None,
                 regenerate: bool = False, reseed: bool = False):
        self.engine = engine
        self.session_id = session_id
        self.text = text
        self.attachments = list(attachments)
        self.want = list(want)
        self.settings = settings if isinstance(settings, ChatSettings) else ChatSettings.of(settings)
        self.regenerate = regenerate
        self.reseed = reseed

    def begin(self, job):
        """The chat's draft (its text and signals; the user's message saved): (chat, draft)."""
        engine = self.engine
        engine._check_thread()
        chat = engine.chats.get(self.session_id, self.settings)
        stream, report = (job.stream, job.report) if job is not None else (None, None)
        if self.regenerate:
            draft = chat.generate_again(reseed=self.reseed, on_text=stream, on_progress=report)
        else:
            chat.staged = list(self.attachments)
            draft = chat.generate(self.text, want=self.want, on_text=stream, on_progress=report)
        return chat, draft

    def end(self, job, begun, reply=None) -> TurnResult:
        """Render (unless `reply` is the draft's rendering from a batch) and save: the result."""
        chat, draft = begun
        reply = chat.finish(draft, reply)
        self.engine.chats.bound_caches()  # this turn grew its cache
        session = chat.session
        return TurnResult(session_id=session.id, turn_index=session.turn_count - 1, text=reply.text,
                          media=list(reply.media), failures=list(reply.failures), seed=reply.seed)

    def __call__(self, job) -> TurnResult:
        return self.end(job, self.begin(job))


class Engine:
    def __init__(self, assistant, memory, *, max_chats: int = 64, max_cache_bytes: int = 1 << 30):
        """`max_chats`, `max_cache_bytes`: see `assistant.session.Chats`."""
        self.assistant = assistant
        self.memory = memory
        self.chats = Chats(assistant, memory, max_chats=max_chats, max_cache_bytes=max_cache_bytes)
        self._worker_thread: int | None = None

    @property
    def profile_name(self) -> str:
        return self.assistant.profile_name

    # ------------------------------------------------------------------ any thread
    def new_session(self, title: str | None):
        return self.memory.create_session(title, self.assistant.profile_name)

    def session(self, session_id: str):
        return self.memory.get_session(session_id)

    def work(self, session_id: str, **turn) -> TurnWork:
        """A job function for one turn (TurnWork's keywords)."""
        return TurnWork(self, session_id, **turn)

    # ------------------------------------------------------------------ worker thread only
    def warmup(self) -> None:
        """Load the model with its media parts (and build the decoder tools) before the first user asks."""
        self._check_thread()
        self.assistant.warm()

    def batchable(self, modality: str) -> bool:
        self._check_thread()
        return self.assistant.batchable(modality)

    def render(self, drafts: list) -> list:
        """Several turns' drafts → their replies, same-modality signals in one decoder call."""
        self._check_thread()
        return self.assistant.render(drafts)

    def turn(self, job, session_id: str, *, text: str, attachments: list[tuple[str, Path]] = (), want=(),
             settings: ChatSettings | dict | None = None) -> TurnResult:
        return self.work(session_id, text=text, attachments=attachments, want=want, settings=settings)(job)

    def regenerate(self, job, session_id: str, *, reseed: bool = False,
                   settings: ChatSettings | dict | None = None) -> TurnResult:
        """Answer the last user turn again (`Chat.regenerate`'s rule: the replaced reply's seed,
        steps and guidance pinned; `reseed` moves to the next seed)."""
        return self.work(session_id, regenerate=True, reseed=reseed, settings=settings)(job)

    # ------------------------------------------------------------------ internals
    def _check_thread(self) -> None:
        me = threading.get_ident()
        if self._worker_thread is None:
            self._worker_thread = me
        elif self._worker_thread != me:  # a bug, not a user error: the model must stay on one thread
            log.warning("model work from a second thread (%s, worker is %s)", me, self._worker_thread)
