"""`nextgpt eval`: score a profile on the shapes world, per direction, on a fresh seed.

    python -m training.evaluate [--profile small] [--n 20] [--seed 12345] [--json] [--out DIR]

Every prompt is built from a spec sampled with `--seed` (never a training seed: `training.small`
uses 1 and 2) and worded with templates that differ from the training dialogs' (`training.world.dialogs`).
The model decides on its own whether to answer with media (`want=[]`): nothing is forced. Text is
sampled with the profile's `generation` settings and a fixed seed per prompt (seed + index), media
with the profile's decoder settings and the same seed, so a run is reproducible.

Directions and what counts as right:

| direction     | input → what is scored                                                                  |
|---------------|-----------------------------------------------------------------------------------------|
| text→image    | "draw a large green triangle"-style request → the PNG's colour AND shape (`analyze_image`) |
| image→text    | rendered PNG + "what is in this picture?" → the reply names its colour AND shape           |
| text→audio    | "make a high-pitched beep" → the WAV's pitch (`analyze_audio`); timbre reported beside it  |
| audio→text    | rendered WAV + "what do you hear?" → the reply names its pitch; timbre reported beside it  |
| text→video    | "a video of a red circle moving left" → the video's direction (`analyze_video`); colour+shape beside it |
| video→text    | rendered MP4 + "what happens in this video?" → the reply names the direction; colour+shape beside it |

A text→X reply without media of X (or whose decoder failed) is wrong. The X→text replies are scored
with `parse_caption` (first mention of each attribute word, synonyms accepted).

Signal tokens: the "asked" prompts are the text→X ones; the "not asked" prompts are the X→text
ones plus plain chit-chat ("hello", "how are you?", ..., `PLAIN`).
precision = replies with media to asked prompts / all replies with media;
recall = asked prompts answered with media of the asked modality / asked prompts.
(No media at all: precision is reported as 1.0 when nothing was asked wrongly, i.e. 0/0 → 1.0.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROG = "nextgpt eval"
DIRECTIONS = ("text→image", "image→text", "text→audio", "audio→text", "text→video", "video→text")
TARGETS = {"direction": 0.90, "precision": 0.95, "recall": 0.95}
COLUMNS = ("direction", "scored on", "result", "also", "target")
_STREAM = 7  # random stream for the prompts (the pair files use 0-2, the dialogs 3)

# Wordings deliberately different from the training dialogs' ("Draw {caption}.", "Make a video of ...")
T2I = (
    "draw a {size} {colour} {shape}",
    "Please draw a {colour} {shape}.",
    "Can you draw me a {size} {colour} {shape} on the {position}?",
    "I'd like a picture of a {colour} {shape}.",
    "Make an image of a {size} {colour} {shape}.",
    "show me a {colour} {shape}",
)
I2T = ("What is in this picture?", "what do you see?", "Describe this picture.", "Tell me what this image shows.", "What's this?")
T2A = (
    "make a {pitch}-pitched {timbre}",
    "Play a {pitch} {timbre}.",
    "Can you make the sound of a {pitch}-pitched {timbre}?",
    "I want to hear a {pitch} {timbre}.",
    "Generate a {pitch}-pitched {timbre} sound.",
)
A2T = ("What do you hear?", "what is this sound?", "Describe what you hear.", "Listen: what is it?", "What does this sound like?")
T2V = (
    "make a video of a {colour} {shape} moving {direction}",
    "Animate a {colour} {shape} going {direction}.",
    "Can you make a clip of a {colour} {shape} that moves {direction}?",
    "Show me a video: a {colour} {shape} moving {direction}.",
    "I'd like a short video of a {colour} {shape} sliding {direction}.",
)
V2T = ("What happens in this video?", "what do you see in this clip?", "Describe this video.", "What is moving here?", "Tell me about this clip.")
PLAIN = (
    "hello",
    "how are you?",
    "Hi! Who are you?",
    "What can you do?",
    "thanks!",
    "Good morning.",
    "What is a triangle?",
    "Tell me something about circles.",
    "Thank you, that was great.",
    "What colours do you know?",
)

# main key(s) and side keys per direction: (modality, main keys, side keys)
SCORING = {
    "text→image": ("image", ("colour", "shape"), ("size", "position")),
    "image→text": ("image", ("colour", "shape"), ("size", "position")),
    "text→audio": ("audio", ("pitch",), ("timbre",)),
    "audio→text": ("audio", ("pitch",), ("timbre",)),
    "text→video": ("video", ("direction",), ("colour", "shape")),
    "video→text": ("video", ("direction",), ("colour", "shape")),
}


def register_world_components() -> None:
    """The shapes-world audio pipeline names a component class from this repository
    (`tools.world.vocoder.GriffinLimVocoder`); diffusers loads it only once it is imported."""
    try:
        import tools.world.vocoder  # noqa: F401
    except ImportError:
        pass


@dataclass
class Case:
    direction: str
    prompt: str
    truth: dict[str, Any]  # spec attributes ({} for plain prompts)
    asked: str | None  # modality requested (text→X), else None
    attach: tuple[str, Path] | None = None
    result: dict[str, Any] = field(default_factory=dict)


def build_cases(n: int, seed: int, media_dir: Path, side: int = 64, plain: int | None = None) -> list[Case]:
    """n cases per direction + the plain prompts (all of `PLAIN`, or the first `plain`), with the
    inputs of the X→text cases rendered into media_dir. Deterministic in (n, seed)."""
    from training.world.captions import fill
    from training.world.dataset import EXTENSIONS, write_media
    from training.world.spec import sample_spec

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM]))
    media_dir.mkdir(parents=True, exist_ok=True)
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    cases: list[Case] = []
    for direction in DIRECTIONS:
        modality = SCORING[direction][0]
        for i in range(int(n)):
            spec = sample_spec(modality, rng)
            attrs = spec.attributes()
            if direction.startswith("text→"):
                template = pick({"image": T2I, "audio": T2A, "video": T2V}[modality])
                cases.append(Case(direction, fill(template, attrs), attrs, modality))
            else:
                path = media_dir / f"{modality}-{i:04d}.{EXTENSIONS[modality]}"
                write_media(spec, path, side)
                question = pick({"image": I2T, "audio": A2T, "video": V2T}[modality])
                cases.append(Case(direction, question, attrs, None, (modality, path)))
    for text in PLAIN[: len(PLAIN) if plain is None else plain]:
        cases.append(Case("plain", text, {}, None))
    return cases


def _score_case(case: Case, text: str, media: dict[str, list], failures: list[str]) -> None:
    from training.world.analyze import attributes, parse_caption, score

    r = case.result
    r["text"] = text
    r["media"] = sorted(media)
    if failures:
        r["failures"] = failures
    if case.direction == "plain":
        return
    modality, main, side = SCORING[case.direction]
    if case.asked:
        files = media.get(modality) or []
        if not files:
            r.update(ok=False, side_ok=False, predicted=None)
            return
        predicted = attributes(modality, files[0])
    else:
        predicted = parse_caption(text, modality)
    r["predicted"] = predicted
    r["ok"] = score(modality, predicted, case.truth, main)
    r["side_ok"] = score(modality, predicted, case.truth, side)
    r["all_ok"] = score(modality, predicted, case.truth, main + side)


def summarize(cases: list[Case]) -> dict[str, Any]:
    out: dict[str, Any] = {"directions": {}}
    for d in DIRECTIONS:
        cs = [c for c in cases if c.direction == d]
        if not cs:
            continue
        modality, main, side = SCORING[d]
        k = len(cs)
        out["directions"][d] = {
            "n": k,
            "accuracy": sum(bool(c.result.get("ok")) for c in cs) / k,
            "scored": "+".join(main),
            "side": "+".join(side),
            "side_accuracy": sum(bool(c.result.get("side_ok")) for c in cs) / k,
            "all_accuracy": sum(bool(c.result.get("all_ok")) for c in cs) / k,
            "media_rate": sum(bool(c.result.get("media")) for c in cs) / k,
        }
    asked = [c for c in cases if c.asked]
    with_media = [c for c in cases if c.result.get("media")]
    tp = sum(1 for c in with_media if c.asked)
    right = sum(1 for c in asked if c.asked in c.result.get("media", []))
    not_asked = [c for c in cases if not c.asked]
    out["signals"] = {
        "precision": tp / len(with_media) if with_media else 1.0,
        "recall": right / len(asked) if asked else 1.0,
        "asked": len(asked),
        "not_asked": len(not_asked),
        "replies_with_media": len(with_media),
        "unasked_with_media": len(with_media) - tp,
        "plain_with_media": sum(1 for c in cases if c.direction == "plain" and c.result.get("media")),
    }
    return out


def evaluate(
    settings,
    profile=None,
    *,
    n_per_direction: int = 20,
    seed: int = 12345,
    out_dir: str | Path | None = None,
    plain: int | None = None,
    max_new_tokens: int | None = None,
    steps: int | None = None,
    progress: bool = True,
    assistant=None,
) -> dict[str, Any]:
    """Run every case and return the numbers (see the module docstring). `profile`: a profile
    name, a `Profile` object (e.g. with another `checkpoint`) or None (the default profile).
    `out_dir`: where inputs, generated media and `cases.jsonl` go (default: a temporary folder).
    `assistant`: an already-built `Assistant` to reuse (tests)."""
    import tempfile

    import torch

    from assistant.agent import Assistant
    from nextgpt.messages import MediaInput, Message

    register_world_components()
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nextgpt-eval-")
        out_dir = tmp.name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if assistant is None:
        if profile is None or isinstance(profile, str):
            assistant = Assistant(settings, profile, output_dir=out_dir / "generated")
        else:  # a Profile object
            assistant = Assistant(settings, None, output_dir=out_dir / "generated")
            assistant.profile = profile
            assistant.profile_name = "custom"
    prof = assistant.profile
    gen = prof.generation
    cases = build_cases(n_per_direction, seed, out_dir / "inputs", plain=plain)
    t0 = time.perf_counter()
    bar = _Bar(len(cases), progress)
    try:
        model = assistant.model
        for i, case in enumerate(cases):
            media_in = [MediaInput(case.attach[0], path=case.attach[1])] if case.attach else []
            reply = model.generate(
                [Message("user", case.prompt, media_in)],
                want=[],
                seed=seed + i,
                **gen.sampling(max_new_tokens),
            )
            media: dict[str, list] = {s.modality: [] for s in reply.signals}
            failures = []
            # decode only what is scored: the asked modality's first signal (others are counted, not rendered)
            for s in reply.signals:
                if case.asked and s.modality == case.asked and not media[s.modality]:
                    try:
                        with torch.inference_mode():
                            files = assistant.tools[s.modality](s.prompt_embeds, seed=seed + i, steps=steps)
                        media[s.modality] += [f.path for f in files]
                    except Exception as e:  # noqa: BLE001 - a failed decoder is a wrong answer, not a crash
                        failures.append(f"{s.modality}: {type(e).__name__}: {e}")
            _score_case(case, reply.text, media, failures)
            case.result["signals"] = [s.modality for s in reply.signals]
            bar.advance(case.direction)
    finally:
        bar.close()
    result = summarize(cases)
    result.update(
        profile=assistant.profile_name,
        checkpoint=str(prof.checkpoint) if prof.checkpoint else None,
        seed=seed,
        n_per_direction=n_per_direction,
        seconds=round(time.perf_counter() - t0, 1),
        max_new_tokens=max_new_tokens or gen.max_new_tokens,
        sampling={"temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k},
        targets=TARGETS,
    )
    with (out_dir / "cases.jsonl").open("w") as f:
        for c in cases:
            rec = {"direction": c.direction, "prompt": c.prompt, "truth": c.truth, "asked": c.asked,
                   "attach": str(c.attach[1]) if c.attach else None, **c.result}  # fmt: skip
            f.write(json.dumps(rec, default=str) + "\n")
    if tmp is not None:
        tmp.cleanup()
    else:
        result["cases"] = str(out_dir / "cases.jsonl")
    return result


# ----------------------------------------------------------------------------------------- dialogs
# `nextgpt eval --dialogs`: whole conversations, driven live — each user turn in order, the model's
# OWN replies kept in the context (as `nextgpt chat` keeps them: the reply's trace) — and the last
# turn scored. Scenarios, wording and attributes come from `training.world.conversations` with its
# held-out wording pool and the evaluation seed, so no request is a training sentence.

DIALOG_TARGET = 0.90
DIALOG_COLUMNS = ("scenario", "what", "last turn right", "also", "target")
MAIN_KEYS = {"image": ("colour", "shape"), "audio": ("pitch",), "video": ("direction",)}  # as the single-turn table
_DIALOG_STREAM = 9


@dataclass
class DialogCase:
    scenario: str
    turns: list[dict[str, Any]]  # the scripted conversation (human turns are replayed; the last gpt turn is the truth)
    result: dict[str, Any] = field(default_factory=dict)


def build_dialog_cases(n: int, seed: int, media_dir: Path, side: int = 64, scenarios=None) -> list[DialogCase]:
    """n conversations per scenario (held-out wording), their input media rendered into media_dir."""
    from training.world.conversations import EVAL_SCENARIOS, sample_scenarios
    from training.world.dataset import EXTENSIONS, write_media

    media_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for sc in scenarios or EVAL_SCENARIOS:
        for i, turns in enumerate(sample_scenarios(sc, n, seed, wording="eval")):
            for j, t in enumerate(turns):
                paths = []
                for k, spec in enumerate(t.get("inputs", ())):
                    path = media_dir / f"{sc}-{i:04d}-{j}-{k}.{EXTENSIONS[spec.modality]}"
                    write_media(spec, path, side)
                    paths.append((spec.modality, path))
                t["paths"] = paths
            cases.append(DialogCase(sc, turns))
    return cases


def score_dialog_turn(case: DialogCase, text: str, signals: list[str], media: list[tuple[str, Path]], finish: str,
                      words: list[str] | None = None) -> dict:
    """The last turn against the script: media turns — each asked output present, in the order asked,
    its main attributes (and the edited one) right in the decoded file; question turns — the answer
    word in the text and no media. `words`: the reply's text before each of its signal groups (with several
    outputs, each one's words are read there).

    Beside the score, media turns get `words_keep`: the reply's words contradict none of the attributes the
    script's own caption of that output names ("make it bigger" after "a small green circle on the left":
    "a large green circle on the right" breaks "left", which the score, on main attributes only, does not see).
    A reply with several outputs is read per output only when each has its own words (`words`); else it has none."""
    from training.world.analyze import attributes, canonical_value, parse_caption, score

    truth = case.turns[-1]
    r: dict[str, Any] = {"text": text, "signals": signals, "finish_reason": finish}
    if "outputs" in truth:
        specs, captions = truth["outputs"], truth.get("captions") or []
        r["asked"] = [s.modality for s in specs]
        r["order_ok"] = signals == r["asked"]
        per = []
        # with several outputs, each one's words are those before its own signal group (a reply's groups follow the
        # words naming them); the first thing named would otherwise be read for every output
        own = words if words is not None and len(specs) > 1 and len(words) == len(specs) else None
        scored = truth.get("scored")  # the script says what the request asked for ("make it move": not a direction)
        for k, spec in enumerate(specs):
            attrs = spec.attributes()
            said = parse_caption(own[k] if own else text, spec.modality)
            keep = {}  # several outputs and no words of their own: nothing to read them against
            if own or len(specs) == 1:
                named = parse_caption(captions[k], spec.modality) if k < len(captions) else {}
                # "make it move": the script's caption picked a direction the user left open
                broken = [a for a, v in said.items() if a in named and (not scored or a in scored)
                          and canonical_value(a, v) != canonical_value(a, attrs[a])]  # fmt: skip
                keep = {"words_keep": not broken} | ({"words_break": broken} if broken else {})
            files = [p for m, p in media if m == spec.modality]
            nth = sum(1 for s in specs[:k] if s.modality == spec.modality)
            if nth >= len(files):
                per.append({"ok": False, "predicted": None} | keep)
                continue
            predicted = attributes(spec.modality, files[nth])
            if scored:
                keys = list(scored)
            else:  # the modality's main attributes + the edited one (an edit's first output; a second is new)
                keys = list(MAIN_KEYS[spec.modality])
                changed = (truth.get("changed") or []) if k == 0 else []
                keys += [c for c in ([changed] if isinstance(changed, str) else changed) if c not in keys]
            per.append({"ok": score(spec.modality, predicted, attrs, keys), "keys": keys, "predicted": predicted,
                        "text_ok": score(spec.modality, said, attrs, keys)} | keep)  # fmt: skip
        r["outputs"] = per
        r["ok"] = bool(r["order_ok"] and all(o["ok"] for o in per))
        r["text_ok"] = all(o.get("text_ok") for o in per)
        kept = [o["words_keep"] for o in per if "words_keep" in o]
        if kept:
            r["words_keep"] = all(kept)
    else:
        (key, value), = truth["answer"].items()
        said = parse_caption(text, None).get(key)
        r["ok"] = said == value and not signals
        r["text_ok"] = said == value
    return r


def evaluate_dialogs(settings, profile=None, *, n: int = 20, seed: int = 12345, out_dir=None, max_new_tokens=None,
                     steps=None, progress: bool = True, assistant=None, scenarios=None) -> dict[str, Any]:  # fmt: skip
    """Every scenario n times; returns {"scenarios": {name: {...}}, "length_finishes", ...}."""
    import tempfile

    import torch

    from assistant.agent import Assistant
    from nextgpt.messages import MediaInput, Message
    from nextgpt.model import PromptCache

    register_world_components()
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nextgpt-eval-dialogs-")
        out_dir = tmp.name
    out_dir = Path(out_dir)
    if assistant is None:
        assistant = Assistant(settings, profile if isinstance(profile, str) else None, output_dir=out_dir / "generated")
        if profile is not None and not isinstance(profile, str):
            assistant.profile, assistant.profile_name = profile, "custom"
    gen = assistant.profile.generation
    cases = build_dialog_cases(n, seed + _DIALOG_STREAM, out_dir / "inputs", scenarios=scenarios)
    model = assistant.model
    t0 = time.perf_counter()
    bar = _Bar(len(cases), progress)
    turns_total, length_finishes = 0, 0
    try:
        for i, case in enumerate(cases):
            messages, cache, long_turns = [], PromptCache(), []  # long_turns: replies that ran to the token limit
            humans = [t for t in case.turns if t["from"] == "human"]
            for j, h in enumerate(humans):
                messages.append(Message("user", h["value"], [MediaInput(m, path=p) for m, p in h["paths"]]))
                reply = model.generate(messages, want=[], seed=seed + 1000 * i + j, cache=cache, **gen.sampling(max_new_tokens))
                messages.append(Message("assistant", reply.trace))
                turns_total += 1
                if reply.finish_reason == "length":  # kept with its text: a loop the guard missed, or a long reply?
                    length_finishes += 1
                    long_turns.append({"turn": j, "text": reply.text[-300:]})
            media: list[tuple[str, Path]] = []
            failures = []
            for k, s in enumerate(reply.signals):  # only the last turn is rendered and scored
                try:
                    with torch.inference_mode():
                        files = assistant.tools[s.modality](s.prompt_embeds, seed=seed + i + k, steps=steps)
                    media += [(s.modality, f.path) for f in files]
                except Exception as e:  # noqa: BLE001 - a failed decoder is a wrong answer, not a crash
                    failures.append(f"{s.modality}: {type(e).__name__}: {e}")
            starts = [0] + [s.position for s in reply.signals]  # each group's words follow the group before it
            words = [model._text(reply.token_ids[a : s.position]) for a, s in zip(starts, reply.signals)]
            case.result = score_dialog_turn(case, reply.text, [s.modality for s in reply.signals], media, reply.finish_reason, words)
            if failures:
                case.result["failures"] = failures
            if long_turns:
                case.result["length_turns"] = long_turns
            bar.advance(case.scenario)
    finally:
        bar.close()
    out: dict[str, Any] = {"scenarios": {}}
    for sc in dict.fromkeys(c.scenario for c in cases):
        cs = [c for c in cases if c.scenario == sc]
        out["scenarios"][sc] = {
            "n": len(cs),
            "accuracy": sum(bool(c.result.get("ok")) for c in cs) / len(cs),
            "text_accuracy": sum(bool(c.result.get("text_ok")) for c in cs) / len(cs),
            "turns": sum(len(c.turns) // 2 for c in cs) / len(cs),
        }
        kept = [bool(c.result["words_keep"]) for c in cs if "words_keep" in c.result]  # media turns only
        if kept:
            out["scenarios"][sc]["words_keep"] = sum(kept) / len(kept)
    out.update(turns=turns_total, length_finishes=length_finishes, seed=seed, n=n, seconds=round(time.perf_counter() - t0, 1),
               profile=assistant.profile_name, checkpoint=str(assistant.profile.checkpoint) if assistant.profile.checkpoint else None,
               target=DIALOG_TARGET)  # fmt: skip
    with (out_dir / "dialog-cases.jsonl").open("w") as f:
        for c in cases:
            script = [{"from": t["from"], "value": t["value"], "kind": t["kind"]} for t in c.turns]
            f.write(json.dumps({"scenario": c.scenario, "script": script, **c.result}, default=str) + "\n")
    if tmp is not None:
        tmp.cleanup()
    else:
        out["cases"] = str(out_dir / "dialog-cases.jsonl")
    return out


SCENARIO_WHAT = {
    "edit": "change one attribute of the last output",
    "convert": "the same as a video / a picture",
    "refer": "edit an earlier output (\"the first circle\")",
    "multi": "two or three modalities in one message",
    "chat-create": "a request after chit-chat",
    "recall": "\"what colour was the first circle?\"",
    "ask": "a question about the last output",
    "attach": "an attachment + \"draw this shape in green\"",
}


def dialog_rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    out = []
    for sc, r in result["scenarios"].items():
        keep = f", words keep the rest {_pct(r['words_keep'])}" if "words_keep" in r else ""
        out.append((sc, SCENARIO_WHAT.get(sc, ""), f"{_pct(r['accuracy'])} ({r['n']})", f"text {_pct(r['text_accuracy'])}{keep}, {r['turns']:.1f} turns",
                    f"≥ 90% {_mark(r['accuracy'], DIALOG_TARGET)}"))  # fmt: skip
    out.append(("token limit", "replies that ran to max_new_tokens", f"{result['length_finishes']} of {result['turns']}", "", "0"))
    return out


def format_dialogs_markdown(result: dict) -> str:
    head = f"profile `{result.get('profile')}`, seed {result.get('seed')}, {result.get('n')} conversations per scenario, {result.get('seconds')} s\n\n"
    return head + _markdown_table(DIALOG_COLUMNS, dialog_rows(result))


class _Bar:
    def __init__(self, total: int, show: bool):
        self.p = None
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("eval {task.fields[what]}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                              transient=True)  # fmt: skip
            self.task = self.p.add_task("eval", total=total, what="")
            self.p.start()

    def advance(self, what: str) -> None:
        if self.p is not None:
            self.p.update(self.task, advance=1, what=what)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


# ----------------------------------------------------------------------------------------- output


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _mark(x: float, target: float) -> str:
    return "✓" if x >= target else "✗"


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(what, scored on, result, beside it, target) per line of the table."""
    out = []
    for d, r in result["directions"].items():
        out.append((d, r["scored"], f"{_pct(r['accuracy'])} ({r['n']})", f"{r['side']} {_pct(r['side_accuracy'])}",
                    f"≥ 90% {_mark(r['accuracy'], TARGETS['direction'])}"))  # fmt: skip
    s = result["signals"]
    out.append(("signal precision", "media only when asked", _pct(s["precision"]),
                f"{s['unasked_with_media']} unasked with media ({s['plain_with_media']} plain)",
                f"≥ 95% {_mark(s['precision'], TARGETS['precision'])}"))  # fmt: skip
    out.append(("signal recall", "asked modality produced", f"{_pct(s['recall'])} ({s['asked']})", "",
                f"≥ 95% {_mark(s['recall'], TARGETS['recall'])}"))  # fmt: skip
    return out


def format_markdown(result: dict) -> str:
    head = (f"profile `{result.get('profile')}`, seed {result.get('seed')}, {result.get('n_per_direction')} prompts per direction, "
            f"sampling {result.get('sampling')}, at most {result.get('max_new_tokens')} new tokens, {result.get('seconds')} s\n\n")  # fmt: skip
    return head + _markdown_table(COLUMNS, rows(result))


def _markdown_table(columns, table_rows) -> str:
    lines = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    return "\n".join(lines + [f"| {' | '.join(r)} |" for r in table_rows])


def _print_table(title: str, columns, table_rows) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col)
    for r in table_rows:
        t.add_row(*r)
    Console().print(t)


def print_table(result: dict) -> None:
    _print_table(f"nextgpt eval — profile {result.get('profile')}, seed {result.get('seed')}, "
                 f"{result.get('n_per_direction')} per direction ({result.get('seconds')} s)", COLUMNS, rows(result))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Score a profile on the shapes world per direction (fresh seed; the model decides the modality).",
                                epilog="`nextgpt eval world` scores the shapes-world encoder and decoders instead (`nextgpt eval world --help`).")  # fmt: skip
    p.add_argument("--profile", "-p", help="profile from config.yaml (default: its default_profile)")
    p.add_argument("--config", help="config.yaml to use")
    p.add_argument("--checkpoint", help="evaluate this checkpoint folder instead of the profile's ('none': the untrained model)")
    p.add_argument("--n", type=int, default=20, help="prompts per direction (default 20)")
    p.add_argument("--seed", type=int, default=12345, help="world + sampling seed (default 12345; training uses 1 and 2)")
    p.add_argument("--plain", type=int, help=f"how many plain chit-chat prompts (default all {len(PLAIN)})")
    p.add_argument("--backend", choices=["transformers", "llama_cpp", "auto"],
                   help="who runs the LLM (default: the profile's llm.backend)")
    p.add_argument("--max-new-tokens", type=int, help="default: the profile's generation.max_new_tokens")
    p.add_argument("--steps", type=int, help="denoising steps (default: the profile's)")
    p.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default: the profile's generation.temperature)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: the profile's generation.top_p)")
    p.add_argument("--out", help="keep inputs, generated media and cases.jsonl here")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    p.add_argument("--dialogs", action="store_true",
                   help="score whole conversations instead (edits, follow-ups, several modalities at once, ...; --n per scenario)")
    p.add_argument("--both", action="store_true", help="the single-turn table and the conversation table")
    p.add_argument("--scenario", action="append", help="with --dialogs: only this scenario (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nextgpt.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
        name = settings.profile_name(args.profile)
        profile = settings.profile(name)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    if args.checkpoint:
        ckpt = None if args.checkpoint.lower() == "none" else args.checkpoint
        profile = profile.model_copy(update={"checkpoint": ckpt})
    if args.backend:
        profile = profile.model_copy(update={"llm": profile.llm.model_copy(update={"backend": args.backend})})
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
    if sampling:  # validated by the config's own bounds (model_copy would not check them)
        from pydantic import ValidationError

        try:
            generation = type(profile.generation).model_validate(profile.generation.model_dump() | sampling)
        except ValidationError:
            print(f"{PROG}: error: --temperature must be >= 0 and --top-p in (0, 1]", file=sys.stderr)
            return 2
        profile = profile.model_copy(update={"generation": generation})
    from assistant.agent import Assistant

    out_dir = Path(args.out) if args.out else None
    assistant = Assistant(settings, name, output_dir=(out_dir / "generated") if out_dir else None)
    assistant.profile = profile
    if out_dir is None:
        import tempfile

        holder = tempfile.TemporaryDirectory(prefix="nextgpt-eval-out-")
        assistant.output_dir = Path(holder.name)
    progress = not args.json and sys.stderr.isatty()
    if args.scenario:
        from training.world.conversations import EVAL_SCENARIOS

        unknown = [x for x in args.scenario if x not in EVAL_SCENARIOS]
        if unknown:
            print(f"{PROG}: error: unknown scenario {unknown[0]!r}; expected one of {', '.join(EVAL_SCENARIOS)}", file=sys.stderr)
            return 2
    results = {}
    if not args.dialogs or args.both:
        results["single"] = evaluate(settings, profile, n_per_direction=args.n, seed=args.seed, out_dir=out_dir, plain=args.plain,
                                     max_new_tokens=args.max_new_tokens, steps=args.steps, progress=progress, assistant=assistant)  # fmt: skip
        results["single"]["profile"] = name
    if args.dialogs or args.both:
        results["dialogs"] = evaluate_dialogs(settings, profile, n=args.n, seed=args.seed, out_dir=out_dir, max_new_tokens=args.max_new_tokens,
                                              steps=args.steps, progress=progress, assistant=assistant, scenarios=args.scenario)  # fmt: skip
        results["dialogs"]["profile"] = name
    if args.json:
        print(json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=2))
        return 0
    if "single" in results:
        print_table(results["single"])
    if "dialogs" in results:
        print_dialog_table(results["dialogs"])
    return 0


def print_dialog_table(result: dict) -> None:
    _print_table(f"nextgpt eval --dialogs — profile {result.get('profile')}, seed {result.get('seed')}, "
                 f"{result.get('n')} conversations per scenario ({result.get('seconds')} s)", DIALOG_COLUMNS, dialog_rows(result))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
