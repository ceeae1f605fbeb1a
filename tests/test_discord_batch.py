"""Same-modality requests waiting together share one decoder call (issue #7).

The queue's batch planning (no model), the decoder tool's per-row seeds (tiny image pipeline), and
the bot end to end against the in-process fake Discord with the tiny model: the decoder calls are
counted by wrapping the tool object the assistant uses, never by mocking the model.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

from bots.discord.queue import FairQueue, JobCancelled, Worker

try:
    from tests import test_discord as td
except ImportError:  # pytest's rootdir-relative imports
    import test_discord as td

env = td.env  # the same module-scoped bot fixture: one bot (and fake Discord) for this module
attachment, cdn_bytes, final_of, session_of = td.attachment, td.cdn_bytes, td.final_of, td.session_of


# ------------------------------------------------------------------------------------------------ the queue
def test_batch_max_setting_is_validated():
    from pydantic import ValidationError

    from bots.discord.config import DiscordConfig

    assert DiscordConfig().batch_max == 4 and DiscordConfig(batch_max=1).batch_max == 1
    for bad in (0, 65, "many"):
        with pytest.raises(ValidationError, match="batch_max"):
            DiscordConfig(batch_max=bad)


def _names(jobs, named):
    return [next(n for n, j in named.items() if j is job) for job in jobs]


def test_queue_plans_batches_in_fair_order_and_a_cancelled_mate_leaves_the_batch():
    q = FairQueue(per_user_cap=5, rate_per_minute=100, batch_max=3)
    q.pause()
    img = ("image", None, None)
    spec = [  # name, user, batch key, scope (session)
        ("A1", 1, img, "s1"), ("A2", 1, None, "s1b"),
        ("B1", 2, ("video", None, None), "s2"),
        ("C1", 3, img, "s3"),
        ("D1", 4, img, "s1"),  # same session as A1: never in A1's batch
        ("E1", 5, img, "s5"),
        ("F1", 6, None, "s6"), ("F2", 6, img, "s6b"),  # F2 may not overtake F1, its owner's earlier job
    ]
    jobs = {}
    for name, user, key, scope in spec:
        jobs[name] = q.submit(user, lambda job, name=name: name, hold=True)
        q.release(jobs[name], batch_key=key, batch_scope=scope)
    # plain fairness would be A1 B1 C1 D1 E1 F1 A2 F2; A1 takes C1 and E1 along (batch_max 3)
    plan = ["A1", "C1", "E1", "B1", "D1", "F1", "A2", "F2"]
    assert _names(q.order(), jobs) == plan
    assert [q.position(jobs[n]) for n in plan] == list(range(1, 9))
    q.resume()
    lead = q.next(timeout=1)
    assert lead is jobs["A1"] and lead.mates == [jobs["C1"], jobs["E1"]]
    assert q.batched(jobs["C1"]) and q.batched(jobs["E1"]) and not q.batched(jobs["B1"])
    assert [q.position(jobs[n]) for n in plan] == [0, 1, 2, 3, 4, 5, 6, 7]  # the mates start next
    # a reserved mate is still waiting: its owner can cancel it, and then it is out of the batch
    assert q.cancel(jobs["E1"].id, user_id=5)
    with pytest.raises(JobCancelled):
        jobs["E1"].future.result(0)
    assert not q.claim(jobs["E1"]) and q.position(jobs["B1"]) == 2
    assert q.claim(jobs["C1"]) and q.position(jobs["C1"]) == 0 and q.pending(3) == 1
    assert not q.claim(jobs["B1"])  # never reserved
    q.end_batch(lead)
    for job in (lead, jobs["C1"]):
        q.run_job(job)
    assert _names(q.order(), jobs) == ["B1", "D1", "F1", "A2", "F2"]
    assert q.next(timeout=1) is jobs["B1"]


def test_a_worker_without_a_batch_runner_runs_the_first_job_alone():
    q = FairQueue(per_user_cap=5, rate_per_minute=100, batch_max=4)
    q.pause()
    ran = []
    jobs = []
    for user in (1, 2):
        job = q.submit(user, lambda job, u=user: ran.append(u), hold=True)
        q.release(job, batch_key=("image", None, None))
        jobs.append(job)
    worker = Worker(q)
    worker.start()
    q.resume()
    for job in jobs:
        job.future.result(5)
    assert ran == [1, 2] and all(q.position(j) is None for j in jobs)
    q.close()
    worker.join(5)


# ------------------------------------------------------------------------------------------------ the tool
@pytest.fixture(scope="module")
def image_tool(settings, tmp_path_factory):
    from tools import build_tools

    return build_tools({"image": settings.profile("tiny").decoders["image"]}, settings.cache_path,
                       tmp_path_factory.mktemp("batch-out"))["image"]


def pixels(path_or_bytes) -> np.ndarray:
    from PIL import Image

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(Image.open(src).convert("RGB"), dtype=np.int16)


def test_per_row_seeds_render_each_row_as_alone(image_tool):
    import torch

    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(1, 8, image_tool.embed_dim, generator=g) for _ in range(3)]
    alone = [image_tool(r, seed=s)[0] for r, s in zip(rows, (5, 6, 7))]
    batch = image_tool(torch.cat(rows), seed=[5, 6, 7])
    again = image_tool(torch.cat(rows), seed=(5, 6, 7))
    assert [m.seed for m in batch] == [5, 6, 7] and [m.sha256 for m in again] == [m.sha256 for m in batch]
    for a, b in zip(alone, batch):
        # same noise, same picture; float32 rounding of the batched matmuls may move a pixel by one level
        diff = np.abs(pixels(a.path) - pixels(b.path))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # a one-row list is exactly the lone call (same arithmetic, byte for byte)
    assert image_tool(rows[1], seed=[6])[0].sha256 == alone[1].sha256
    assert len({m.seed for m in image_tool(torch.cat(rows[:2]), seed=[None, None])}) == 2  # random, reported
    with pytest.raises(ValueError, match="2 seeds for 3 rows"):
        image_tool(torch.cat(rows), seed=[1, 2])
    assert image_tool.rows_independent


@pytest.fixture(scope="module")
def video_tool(settings, tmp_path_factory):
    from tools import build_tools

    return build_tools({"video": settings.profile("tiny").decoders["video"]}, settings.cache_path,
                       tmp_path_factory.mktemp("batch-video-out"))["video"]


def gif_frames(path) -> np.ndarray:
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB"), dtype=np.int16) for f in ImageSequence.Iterator(im)])


def test_per_row_seeds_render_each_video_row_as_alone(video_tool):
    """README: a batched file matches the one-by-one file up to float32 rounding. The frames (the GIF
    preview is lossless on them) are one level off at most; the MP4's lossy codec may spread such
    a level over a few pixels, never into a different clip."""
    import torch

    from nextgpt.media import load_video

    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(1, 8, video_tool.embed_dim, generator=g) for _ in range(3)]
    alone = [video_tool(r, seed=s)[0] for r, s in zip(rows, (5, 6, 7))]
    batch = video_tool(torch.cat(rows), seed=[5, 6, 7])
    assert [m.seed for m in batch] == [5, 6, 7]
    for a, b in zip(alone, batch):
        diff = np.abs(gif_frames(a.preview_path) - gif_frames(b.preview_path))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (int(diff.max()), float((diff > 0).mean()))
        (fa, _), (fb, _) = load_video(a.path), load_video(b.path)
        diff = np.abs(fa.astype(np.int16) - fb.astype(np.int16))
        assert fa.shape == fb.shape and diff.mean() < 0.5 and (diff > 1).mean() < 0.05, (float(diff.mean()), float((diff > 1).mean()))
    # and the rows are not alike: each has its own noise
    assert len({m.sha256 for m in batch}) == 3


def test_a_decoder_whose_rows_are_not_independent_says_so(image_tool):
    from types import SimpleNamespace

    from tools.base import DecoderTool
    from tools.world.vocoder import GriffinLimVocoder

    assert GriffinLimVocoder.rows_independent is False  # one phase draw for the whole batch
    tool = DecoderTool.__new__(DecoderTool)
    tool._pipe = SimpleNamespace(components={"unet": object(), "vocoder": GriffinLimVocoder.__new__(GriffinLimVocoder), "x": None})
    assert tool.rows_independent is False


# ------------------------------------------------------------------------------------------------ the bot
class Counting:
    """Wraps a decoder tool: records every call's batch size and seeds, then forwards it."""

    def __init__(self, tool, fail_seed: int | None = None):
        self.tool = tool
        self.fail_seed = fail_seed
        self.calls: list[tuple[int, list]] = []

    def __call__(self, prompt_embeds, **kwargs):
        seed = kwargs.get("seed")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        self.calls.append((int(prompt_embeds.shape[0]), seeds))
        if self.fail_seed is not None and self.fail_seed in seeds:
            raise RuntimeError(f"row with seed {self.fail_seed} is cursed")
        return self.tool(prompt_embeds, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tool, name)


@pytest.fixture
def wrapped(env):
    """tools[m] → Counting(tools[m]) for the test; the originals are put back afterwards."""
    tools = env.fake.call(lambda: env.bot.engine.assistant.tools)
    saved = dict(tools)
    made = {}

    def wrap(modality, **kw):
        made[modality] = tools[modality] = Counting(saved[modality], **kw)
        return made[modality]

    yield wrap
    tools.update(saved)


def queue_together(env, asks):
    """Ask everything (name → (user, command, options)) while the queue is paused; wait until every
    job is in line (its position is shown only once its input is ready)."""
    fake = env.fake
    itxs = {}
    for name, (user, command, options) in asks.items():
        itxs[name] = fake.slash(user, env.general, command, **options)
        fake.wait(lambda n=name: (m := fake.original(itxs[n])) and "position **" in m["content"], 30, f"{name} queued")
    return itxs


def image_of(env, msg) -> tuple[str, np.ndarray]:
    att = attachment(msg, "image-")
    return att["filename"], pixels(cdn_bytes(env, att))


def new_users(env, *names):
    return [env.fake.call(lambda n=n: env.fake.add_user(n, env.guild)) for n in names]  # never served yet


def test_two_imagines_queued_together_run_as_one_decoder_call(env, wrapped):
    fake, queue = env.fake, env.bot.queue
    ann, ben, cy = new_users(env, "ann", "ben", "cy")
    images, videos = wrapped("image"), wrapped("video")
    asks = {
        "ann": (ann, "imagine", {"prompt": "a red square", "seed": 5}),
        "cy": (cy, "video", {"prompt": "a moving dot", "seed": 9}),  # another modality: not batched
        "ben": (ben, "imagine", {"prompt": "a blue circle", "seed": 6}),
    }
    queue.pause()
    try:
        itxs = queue_together(env, asks)
        # ben's image goes with ann's, so ben starts before cy although he asked after: the positions say so
        expected = {"ann": 1, "ben": 2, "cy": 3}
        fake.wait(lambda: all(f"position **{p}**" in fake.original(itxs[n])["content"] for n, p in expected.items()),
                  30, "the queue positions")
    finally:
        queue.resume()
    finals = {name: final_of(env, itx) for name, itx in itxs.items()}
    stacked = [c for c in images.calls if c[0] > 1]
    assert stacked == [(2, stacked[0][1])] and images.calls[0] == stacked[0]  # ONE decoder call for both
    assert all(rows == 1 for rows, _ in videos.calls) and videos.calls  # the video went alone
    got = {}
    for name in ("ann", "ben"):
        msg = finals[name]
        assert msg["content"].startswith(f"<@{asks[name][0]}>: {asks[name][2]['prompt']}")
        filename, img = image_of(env, msg)
        seed = int(filename.removeprefix("image-").split(".")[0])
        assert seed in stacked[0][1]  # the row's own seed, reported on the file
        turns = env.memory.turns(session_of(env, msg["id"]))  # each saved to its own session
        assert [t.role for t in turns] == ["user", "assistant"] and turns[0].text == asks[name][2]["prompt"]
        assert turns[1].media_out[0].meta["seed"] == seed
        got[name] = (filename, img)
    assert got["ann"][0] != got["ben"][0]
    assert attachment(finals["cy"], "video-")
    done = {name: env.memory.turns(session_of(env, m["id"]))[-1].id for name, m in finals.items()}
    assert sorted(done, key=done.get) == ["ann", "ben", "cy"]
    assert env.bot.batcher.stacked_calls >= 1

    # the same requests one by one (batching off), same seeds: the same pictures
    images.calls.clear()
    queue.batch_max = 1
    queue.pause()
    try:
        again = queue_together(env, {k: v for k, v in asks.items() if k != "cy"})
        queue.resume()
        again = {name: final_of(env, itx) for name, itx in again.items()}
    finally:
        queue.resume()
        queue.batch_max = env.config.batch_max
    for name, msg in again.items():
        filename, img = image_of(env, msg)
        assert filename == got[name][0]
        diff = np.abs(img - got[name][1])  # identical up to float32 rounding (see bots.discord.batch)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (name, int(diff.max()), float((diff > 0).mean()))
    assert all(rows == 1 for rows, _ in images.calls)


def test_a_failing_request_does_not_cost_the_others_their_results(env, wrapped, monkeypatch):
    queue = env.bot.queue
    model = env.bot.engine.assistant.model
    real_generate = model.generate

    def generate(messages, **kw):  # the model itself is real; one prompt makes its turn fail
        if "explode" in messages[-1].text:
            raise RuntimeError("the LLM tripped")
        return real_generate(messages, **kw)

    monkeypatch.setattr(model, "generate", generate)
    dee, eve, fay = new_users(env, "dee", "eve", "fay")
    images = wrapped("image", fail_seed=666)  # that row's decoder call fails
    asks = {
        "ok": (dee, "imagine", {"prompt": "a green tree", "seed": 11}),
        "cursed": (eve, "imagine", {"prompt": "a grey cat", "seed": 666}),
        "explode": (fay, "imagine", {"prompt": "please explode", "seed": 12}),
    }
    queue.pause()
    try:
        itxs = queue_together(env, asks)
    finally:
        queue.resume()
    finals = {name: final_of(env, itx) for name, itx in itxs.items()}
    assert images.calls[0][0] == 2  # ok + cursed stacked (explode never reached its decoder) ...
    assert sorted(c[1][0] for c in images.calls[1:3]) == [11, 666]  # ... then each row alone
    filename, _ = image_of(env, finals["ok"])
    assert filename == "image-11.png"
    cursed = finals["cursed"]
    assert not [a for a in cursed["attachments"] if a["filename"].startswith("image-")]
    # (the tool is named by its class: here the test's wrapper)
    assert "the image decoder (Counting) failed: RuntimeError: row with seed 666 is cursed" in cursed["content"]
    assert "⚠️ Generation failed: RuntimeError: the LLM tripped" in finals["explode"]["content"]
    [user, reply] = env.memory.turns(session_of(env, cursed["id"]))
    assert reply.settings["failures"][0]["tool"] == "Counting" and not reply.media_out


def test_cancelling_a_reserved_request_takes_it_out_of_the_running_batch(env, wrapped, monkeypatch):
    fake, queue = env.fake, env.bot.queue
    model = env.bot.engine.assistant.model
    real_generate = model.generate
    gate, inside = threading.Event(), threading.Event()

    def generate(messages, **kw):
        if "slowly" in messages[-1].text:  # hold the first job's turn while the others wait reserved
            inside.set()
            gate.wait(30)
        return real_generate(messages, **kw)

    monkeypatch.setattr(model, "generate", generate)
    gus, hal, ivy = new_users(env, "gus", "hal", "ivy")
    images = wrapped("image")
    asks = {
        "gus": (gus, "imagine", {"prompt": "draw slowly", "seed": 21}),
        "hal": (hal, "imagine", {"prompt": "a yellow sun", "seed": 22}),
        "ivy": (ivy, "imagine", {"prompt": "a purple hat", "seed": 23}),
    }
    queue.pause()
    try:
        itxs = queue_together(env, asks)
    finally:
        queue.resume()
    try:
        assert inside.wait(60)
        fake.wait(lambda: "in the batch now running" in fake.original(itxs["hal"])["content"], 30, "hal's batch status")
        msg = fake.original(itxs["hal"])
        assert "position **1**" in msg["content"]
        [cancel] = [c["custom_id"] for row in msg["components"] for c in row["components"]]
        fake.click(hal, msg["id"], cancel)
        fake.wait(lambda: fake.original(itxs["hal"])["content"].endswith("✖️ Cancelled."), 30, "the cancellation")
        fake.wait(lambda: "position **1**" in fake.original(itxs["ivy"])["content"], 30, "ivy moving up")
    finally:
        gate.set()
    for name in ("gus", "ivy"):
        filename, _ = image_of(env, final_of(env, itxs[name]))
        assert filename == f"image-{asks[name][2]['seed']}.png"
    assert images.calls[0] == (2, [21, 23])  # hal's row is not in the call
    assert queue.pending(hal) == 0
