"""Several direct media requests, one decoder call.

The worker hands a batch — a job and the waiting jobs the queue reserved for it (same modality and
decoder settings, see `bots.discord.queue`) — to `DecoderBatcher`. It drives the turn API's two
steps itself, on the worker thread: each job's turn is begun (`TurnWork.begin`: user turn saved,
LLM, projector → a draft), then every draft is rendered in ONE `Assistant.render` call (the
decoder runs once on the stacked `prompt_embeds`, each row with its own seed), then each turn is
ended (`TurnWork.end`: its reply saved, its job's future settled) exactly as a lone turn is.

Failures stay with their job: a turn that fails before rendering fails alone; when the stacked
decoder call fails (a bad row, out of memory...), `render` decodes every row again on its own, so
only the row that really fails reports a decoder failure. A job cancelled while still waiting is
never claimed and so is simply not in the batch. A job whose function is not a two-step turn runs
alone.

Same seed, same file? Row i gets the same starting noise as alone, but the CPU's matrix kernels
round differently for a different batch size, so a batched file can differ from the lone one by
float32 rounding (a pixel by one level out of 255). `discord.batch_max: 1` turns batching off.
Decoders whose rows are not independent at all (`DecoderTool.rows_independent` is False, e.g. a
vocoder drawing one phase for the whole batch) are never batched.
"""

from __future__ import annotations

import logging

from bots.discord.queue import FairQueue, Job

log = logging.getLogger(__name__)


class DecoderBatcher:
    """`Worker(queue, batch_runner=DecoderBatcher(queue, engine))`."""

    def __init__(self, queue: FairQueue, engine):
        self.queue = queue
        self.engine = engine
        self.solo_only: set[str] = set()  # modalities whose decoder cannot batch (not rows_independent)

    @property
    def stacked_calls(self) -> int:
        """Decoder calls that rendered more than one request (for logs and tests)."""
        return self.engine.assistant.stacked_calls

    def __call__(self, lead: Job, mates: list[Job]) -> None:
        modality = lead.batch_key[0] if isinstance(lead.batch_key, tuple) and lead.batch_key else None
        if not modality or not self.engine.batchable(modality) or not _two_step(lead):
            if modality and _two_step(lead):
                self.solo_only.add(modality)  # the bot stops asking to batch this modality
            self.queue.run_job(lead)  # alone; its mates go back to the line (Worker calls end_batch)
            return
        begun: list[tuple[Job, object]] = []
        for job in [lead, *mates]:
            if job is not lead and not self.queue.claim(job):
                continue  # cancelled while waiting: not part of the batch
            if not _two_step(job):
                self.queue.run_job(job)
                continue
            try:
                begun.append((job, job.fn.begin(job)))
            except BaseException as e:  # noqa: BLE001 - this job fails alone (its future says why)
                self.queue.run_job(job, _raise(e))
        if not begun:
            return
        try:
            replies = self.engine.render([draft for _, (_, draft) in begun])
        except BaseException as e:  # noqa: BLE001 - a bug in render: every job of the batch says so
            for job, _ in begun:
                self.queue.run_job(job, _raise(e))
            return
        for (job, started), reply in zip(begun, replies):  # one at a time: each saves its reply
            self.queue.run_job(job, lambda job=job, started=started, reply=reply: job.fn.end(job, started, reply))


def _two_step(job: Job) -> bool:
    return callable(getattr(job.fn, "begin", None)) and callable(getattr(job.fn, "end", None))


def _raise(e: BaseException):
    def again():
        raise e

    return again
