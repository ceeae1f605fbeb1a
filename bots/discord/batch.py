"""Several direct media requests, one decoder call.

The worker hands a batch — a job and the waiting jobs the queue reserved for it (same modality and
decoder settings, see `bots.discord.queue`) — to `DecoderBatcher`. Every job runs its own turn as
it would alone (user turn saved, LLM, projector), each on a helper thread but strictly one at a
time, until the turn calls the batch's decoder: that call is held and the thread parks. When all
of them got that far (or finished, or failed), the decoder runs ONCE on the stacked
`prompt_embeds`, each row with its own seed (its own `torch.Generator`), and the parked turns
resume one at a time with their own row: they save their reply to memory and settle their job's
future exactly as a lone turn does.

Failures stay with their job: a turn that fails before its decoder call fails alone; when the
stacked call fails (a bad row, out of memory...), every row is decoded again on its own, so only
the row that really fails reports a decoder failure. A job cancelled while still waiting is never
claimed and so is simply not in the batch.

Same seed, same file? Row i gets the same starting noise as alone, but the CPU's matrix kernels
round differently for a different batch size, so a batched file can differ from the lone one by
float32 rounding (a pixel by one level out of 255). `discord.batch_max: 1` turns batching off.
Decoders whose rows are not independent at all (`DecoderTool.rows_independent` is False, e.g. a
vocoder drawing one phase for the whole batch) are never batched.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from typing import Any, Callable

from bots.discord.queue import FairQueue, Job

log = logging.getLogger(__name__)

_CALL_KEYS = ("seed", "steps", "guidance", "callback")
_here = threading.local()  # .member: the _Member whose turn runs on this thread


class _Member:
    """One job of a batch: its turn on its own thread, parked at the batch's decoder call."""

    def __init__(self, job: Job, queue: FairQueue, delegate: Callable[[], Any]):
        self.job = job
        self.queue = queue
        self.delegate = delegate
        self.call: dict[str, Any] | None = None  # the held decoder call: embeds + keywords
        self.outcome: Any = RuntimeError("the batch this request was in broke off")
        self.finished = False
        self._arrived = threading.Event()  # parked at the decoder, or finished
        self._resume = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"nextgpt-batch-job-{job.id}", daemon=True)

    def _run(self) -> None:
        _here.member = self
        try:
            with self.delegate():
                self.queue.run_job(self.job)  # settles the job's future, whatever happens
        finally:
            _here.member = None
            self.finished = True
            self._arrived.set()

    # on the member's thread (from _Capture)
    def park(self, call: dict[str, Any]):
        self.call = call
        self._arrived.set()
        self._resume.wait()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    # on the worker thread
    def run_until_decoder(self) -> None:
        self.thread.start()
        self._arrived.wait()

    @property
    def parked(self) -> bool:
        return self.call is not None and not self.finished

    def finish(self) -> None:
        self._resume.set()
        self.thread.join()


class _Capture:
    """Stands in for the batch's decoder tool while the batch's turns run: a member's first
    single-row call is held (parked) for the stacked call; every other call goes to the tool."""

    def __init__(self, real):
        self.real = real

    def __call__(self, prompt_embeds, **kwargs):
        member = getattr(_here, "member", None)
        shape = getattr(prompt_embeds, "shape", None)
        if (member is None or member.call is not None or shape is None or len(shape) < 2 or shape[0] != 1
                or isinstance(kwargs.get("seed"), (list, tuple))):
            return self.real(prompt_embeds, **kwargs)
        return member.park({"embeds": prompt_embeds, **kwargs})

    def __getattr__(self, name):
        return getattr(self.real, name)


_capture_classes: dict[str, type] = {}


def _capture(real) -> _Capture:
    """A _Capture whose class is named like the tool's (failures name the tool by its class)."""
    name = type(real).__name__
    cls = _capture_classes.get(name)
    if cls is None:
        cls = _capture_classes[name] = type(name, (_Capture,), {"__module__": __name__})
    return cls(real)


class DecoderBatcher:
    """`Worker(queue, batch_runner=DecoderBatcher(queue, tools=..., delegate=...))`.

    `tools()`: the assistant's modality → decoder tool dict (looked up per batch, on the worker
    thread); `delegate()`: a context manager under which a helper thread may do the worker's model
    work (`Engine.delegate`).
    """

    def __init__(self, queue: FairQueue, *, tools: Callable[[], dict], delegate: Callable[[], Any] | None = None):
        self.queue = queue
        self.tools = tools
        self.delegate = delegate or contextlib.nullcontext
        self.stacked_calls = 0  # decoder calls that rendered more than one request (for logs and tests)
        self.solo_only: set[str] = set()  # modalities whose decoder cannot batch (not rows_independent)

    def __call__(self, lead: Job, mates: list[Job]) -> None:
        modality = lead.batch_key[0] if isinstance(lead.batch_key, tuple) and lead.batch_key else None
        try:
            tools = self.tools() if modality else {}
        except Exception:  # noqa: BLE001 - the lone job meets (and reports) the same problem
            log.exception("no decoder tools for a batch")
            tools = {}
        real = tools.get(modality)
        independent = _rows_independent(real) if real is not None else None
        if not independent:
            if independent is False:
                self.solo_only.add(modality)  # the bot stops asking to batch this modality
            self.queue.run_job(lead)  # alone; its mates go back to the line (Worker calls end_batch)
            return
        capture = _capture(real)
        tools[modality] = capture
        members: list[_Member] = []
        try:
            for job in [lead, *mates]:
                if job is not lead and not self.queue.claim(job):
                    continue  # cancelled while waiting: not part of the batch
                member = _Member(job, self.queue, self.delegate)
                members.append(member)
                member.run_until_decoder()
            if tools.get(modality) is capture:
                tools[modality] = real  # turns resumed below call the tool itself for anything more
            parked = [m for m in members if m.parked]
            if parked:
                self._decode(real, modality, parked)
            for m in parked:  # one at a time: each saves its reply and settles its future
                m.finish()
        finally:
            if tools.get(modality) is capture:
                tools[modality] = real
            for m in members:  # only after a bug above: no thread may stay parked
                if m.thread.is_alive():
                    m.finish()

    # ------------------------------------------------------------------ the decoder call(s)
    def _decode(self, real, modality: str, parked: list[_Member]) -> None:
        groups: dict[Any, list[_Member]] = {}
        for m in parked:  # the queue's key makes these one group; a differing call still decodes right
            c = m.call
            sizes = tuple(sorted((k, repr(v)) for k, v in c.items() if k not in _CALL_KEYS and k != "embeds"))
            e = c["embeds"]
            key = (c.get("steps"), c.get("guidance"), sizes, tuple(e.shape[1:]), str(getattr(e, "dtype", "")),
                   str(getattr(e, "device", "")))
            groups.setdefault(key, []).append(m)
        for group in groups.values():
            if len(group) == 1:
                m = group[0]
                m.outcome = _attempt(real, m.call["embeds"], m.call)  # exactly the call it made
                continue
            self._decode_stacked(real, modality, group)

    def _decode_stacked(self, real, modality: str, group: list[_Member]) -> None:
        import torch

        seeds = [secrets.randbits(63) if m.call.get("seed") is None else int(m.call["seed"]) for m in group]
        first = group[0].call
        sizes = {k: v for k, v in first.items() if k not in _CALL_KEYS and k != "embeds"}
        callbacks = [m.call.get("callback") for m in group]

        def progress(step: int, total: int) -> None:
            for cb in callbacks:
                if cb is not None:
                    cb(step, total)

        try:
            embeds = torch.cat([m.call["embeds"] for m in group])
            outputs = real(embeds, seed=seeds, steps=first.get("steps"), guidance=first.get("guidance"),
                           callback=progress, **sizes)
            if len(outputs) != len(group):
                raise RuntimeError(f"{len(outputs)} outputs for {len(group)} rows")
        except Exception as e:  # noqa: BLE001 - one bad row must not cost the others their result
            log.warning("stacked %s decode of jobs %s failed (%s: %s); decoding them one by one",
                        modality, [m.job.id for m in group], type(e).__name__, e)
            for m, seed in zip(group, seeds):
                m.outcome = _attempt(real, m.call["embeds"], {**m.call, "seed": seed})
            return
        self.stacked_calls += 1
        log.info("decoded %d %s requests in one call (jobs %s)", len(group), modality, [m.job.id for m in group])
        for m, out in zip(group, outputs):
            m.outcome = [out]


def _attempt(tool, embeds, call: dict[str, Any]):
    """tool(embeds, **call) → its outputs, or the exception it raised (given to that job's turn)."""
    try:
        return tool(embeds, **{k: v for k, v in call.items() if k != "embeds"})
    except Exception as e:  # noqa: BLE001 - raised again in the job's own turn
        return e


def _rows_independent(tool) -> bool | None:
    """The tool's `rows_independent`; None when it cannot tell (its pipeline does not load: the
    job then runs alone and reports that)."""
    try:
        return bool(getattr(tool, "rows_independent", True))
    except Exception as e:  # noqa: BLE001
        log.warning("cannot batch the %s decoder: %s: %s", type(tool).__name__, type(e).__name__, e)
        return None
