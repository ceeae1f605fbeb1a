"""MosIT-style dialogs over the shapes world: multi-turn, modality-switching instruction data.

    out_dir/dialogs.json   [{"id", "conversation": [{"from": "human"|"gpt", "value", ...}, ...]}, ...]
    out_dir/images/ audios/ videos/   the media (names relative to these folders, as the pair files)

Each dialog has 2–4 exchanges, each one of:

- describe: the user gives an image / sound / video (`image_name` | `audio_name` | `video_name` on
  the human turn) and asks about it; the reply describes it in words (no signal tokens);
- create: the user asks for an image / sound / video; the reply says what it made in words and
  carries `output_modality` + `caption` (the decoder's caption, i.e. the projector target): the
  trainer appends that modality's signal tokens to the reply;
- transform: a change to the current subject ("make it blue", "move it to the left", "now a video
  of it moving left", "show me a still picture of it", "make it higher-pitched", "make it a buzz"),
  answered with a new output of the resulting spec;
- ask: a question about the current subject ("what colour is it?"): a text-only answer;
- chat: chit-chat ("hello", "thanks", "what can you do?"): a text-only answer, NEVER an output.

Every turn has a `kind`; media turns have `attributes` (the spec, the ground truth). gpt turns
that create media also name the reference rendering of their output (`image_name`, ...; not fed
to the model). Everything is a function of (n, seed, side): the same arguments give byte-identical
files. `python -m training.world.dialogs OUT_DIR --n 100 --seed 0` writes a set.

`vary_captions=True` (`--vary-captions`): the create requests and replies name the output the many
ways users do — "a blue square", "a large blue square", "a blue square on the left", … — instead of
always the full canonical caption, and the turn's `caption` (the projector target) is those words:
the decoder fills in what was not said. Without it the files are exactly those of earlier versions.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from training.world.analyze import parse_caption
from training.world.captions import canonical_caption, fill
from training.world.dataset import EXTENSIONS, FOLDERS, NAME_KEYS, write_media
from training.world.spec import (
    COLOURS,
    DIRECTIONS,
    PITCHES,
    POSITIONS,
    SHAPES,
    SIZES,
    TIMBRES,
    AudioSpec,
    ImageSpec,
    Spec,
    VideoSpec,
    sample_spec,
)

DIALOGS_FILE = "dialogs.json"
_STREAM = 3  # random stream id (the pair files use 0-2)

ASK_INPUT = {
    "image": ("What is in this picture?", "Describe this image.", "What do you see here?", "Can you tell me what this image shows?"),
    "audio": ("What does this sound like?", "Describe this sound.", "Listen to this. What is it?", "What kind of sound is this?"),
    "video": ("What happens in this video?", "Describe this clip.", "What is moving in this video?", "Can you tell me what this video shows?"),
}
DESCRIBE = {
    "image": ("It shows {c}.", "This is {c}.", "I see {c}."),
    "audio": ("It is {c}.", "This sounds like {c}.", "That is {c}."),
    "video": ("It shows {c}.", "The clip shows {c}.", "I see {c}."),
}
REQUEST = {
    "image": ("Draw {c}.", "Please make an image of {c}.", "Can you show me a picture of {c}?", "Create an image: {c}."),
    "audio": ("Make {c}.", "Play me {c}.", "Can you generate {c}?", "I would like to hear {c}."),
    "video": ("Make a video of {c}.", "Show me a clip of {c}.", "Can you animate {c}?", "Create a video: {c}."),
}
CREATED = {
    "image": ("Here is an image of {c}.", "Sure! Here is a picture of {c}.", "I made an image of {c}."),
    "audio": ("Here is {c}.", "Sure! Here is the sound: {c}.", "I made {c} for you."),
    "video": ("Here is a video of {c}.", "Sure! Here is a clip of {c}.", "I made a video of {c}."),
}
MENTIONS = {  # vary_captions: how a create turn names its output (the first is the canonical caption)
    "image": (
        "a {size} {colour} {shape} on the {position}",
        "a {colour} {shape}",
        "a {size} {colour} {shape}",
        "a {colour} {shape} on the {position}",
        "a {colour} {shape}, {size}, on the {position}",
    ),
    "audio": ("a {pitch}-pitched {timbre}", "a {pitch} {timbre}", "a short {pitch} {timbre}", "a {pitch}-pitched {timbre} sound"),
    "video": ("a {colour} {shape} moving {direction}", "a {colour} {shape} that moves {direction}",
              "a {colour} {shape} sliding {direction}", "a {colour} {shape} going {direction}"),
}
CHAT = (
    ("Hello!", "Hello! I can describe pictures, sounds and videos of simple shapes, and make new ones."),
    ("Hi there.", "Hi! Give me an image, a sound or a video, or ask me to create one."),
    ("What can you do?", "I can tell you what is in an image, a sound or a video, and I can draw shapes, make beeps and buzzes, and animate moving shapes."),
    ("Thanks!", "You're welcome."),
    ("Thank you, that is great.", "Glad you like it!"),
    ("Who are you?", "I am a small assistant that understands and creates images, sounds and videos of coloured shapes."),
    ("Good job.", "Thank you!"),
    ("Can you explain what a square is?", "A square is a shape with four equal sides and four right angles."),
)


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _other(rng: np.random.Generator, options, current):
    return _pick(rng, [o for o in options if o != current])


def _ask(rng: np.random.Generator, spec: Spec) -> tuple[str, str]:
    if isinstance(spec, AudioSpec):
        if rng.random() < 0.5:
            return "How high is the pitch?", f"It is {spec.pitch}-pitched."
        return "Is it a beep or a buzz?", f"It is a {spec.timbre}."
    if rng.random() < 0.5:
        return "What colour is it?", f"It is {spec.colour}."
    if isinstance(spec, VideoSpec):
        return "Which way does it move?", f"It moves {spec.direction}."
    return "What shape is it?", f"It is a {spec.shape}."


def _transform(rng: np.random.Generator, spec: Spec) -> tuple[str, Spec, str]:
    """(request, new spec, reply prefix) for a change of the current subject."""
    if isinstance(spec, ImageSpec):
        kind = _pick(rng, ("colour", "shape", "size", "position", "video"))
        if kind == "colour":
            c = _other(rng, COLOURS, spec.colour)
            return f"Make it {c}.", replace(spec, colour=c), f"Here it is in {c}:"
        if kind == "shape":
            s = _other(rng, SHAPES, spec.shape)
            return f"Make it a {s} instead.", replace(spec, shape=s), f"Here it is as a {s}:"
        if kind == "size":
            z = _other(rng, SIZES, spec.size)
            return f"Make it {z}.", replace(spec, size=z), f"Here it is, now {z}:"
        if kind == "position":
            p = _other(rng, POSITIONS, spec.position)
            return f"Move it to the {p}.", replace(spec, position=p), f"Here it is on the {p}:"
        d = _pick(rng, DIRECTIONS)
        return f"Now a video of it moving {d}.", VideoSpec(spec.shape, spec.colour, d), "Here is a video of it:"
    if isinstance(spec, VideoSpec):
        kind = _pick(rng, ("colour", "direction", "image"))
        if kind == "colour":
            c = _other(rng, COLOURS, spec.colour)
            return f"Make it {c}.", replace(spec, colour=c), f"Here is the clip in {c}:"
        if kind == "direction":
            d = _other(rng, DIRECTIONS, spec.direction)
            return f"Now make it move {d}.", replace(spec, direction=d), f"Here it is moving {d}:"
        return "Show me a still picture of it.", ImageSpec(spec.shape, spec.colour, "large", "center"), "Here is a picture of it:"
    kind = _pick(rng, ("pitch", "timbre"))
    if kind == "pitch":
        p = _other(rng, PITCHES, spec.pitch)
        return f"Make it {p}-pitched.", replace(spec, pitch=p), f"Here it is, {p}-pitched:"
    t = _other(rng, TIMBRES, spec.timbre)
    return f"Make it a {t} instead.", replace(spec, timbre=t), f"Here it is as a {t}:"


def _mention(rng: np.random.Generator, spec: Spec) -> str:
    """The words a create turn uses for its output (vary_captions): one of MENTIONS, uniformly."""
    return fill(_pick(rng, MENTIONS[spec.modality]), spec.attributes())


def _said(spec: Spec, caption: str) -> dict[str, Any]:
    """What a caption says of its spec (a partial caption leaves the rest to the decoder) + rendering parameters."""
    said = parse_caption(caption, spec.modality)
    return {k: v for k, v in spec.attributes().items() if k in said or not isinstance(v, str)}


def sample_dialogs(n: int, seed: int, *, vary_captions: bool = False) -> list[list[dict[str, Any]]]:
    """The n dialogs `write_dialogs` writes, as turns with `spec` objects instead of file names."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM]))
    dialogs = []
    for _ in range(int(n)):
        turns: list[dict[str, Any]] = []
        subject: Spec | None = None
        for k in range(int(rng.integers(2, 5))):
            r = rng.random()
            if subject is not None and k > 0:
                kind = "transform" if r < 0.45 else "ask" if r < 0.6 else "chat" if r < 0.72 else "describe" if r < 0.86 else "create"
            else:
                kind = "chat" if r < 0.2 else "describe" if r < 0.6 else "create"
            if kind == "chat":
                q, a = _pick(rng, CHAT)
                turns += [{"from": "human", "value": q, "kind": kind}, {"from": "gpt", "value": a, "kind": kind}]
            elif kind == "ask":
                q, a = _ask(rng, subject)
                turns += [{"from": "human", "value": q, "kind": kind}, {"from": "gpt", "value": a, "kind": kind}]
            elif kind == "describe":
                m = _pick(rng, ("image", "audio", "video"))
                spec = sample_spec(m, rng)
                c = canonical_caption(spec)
                turns += [
                    {"from": "human", "value": _pick(rng, ASK_INPUT[m]), "kind": kind, "input": spec},
                    {"from": "gpt", "value": _pick(rng, DESCRIBE[m]).format(c=c), "kind": kind},
                ]
                subject = spec
            elif kind == "create":
                m = _pick(rng, ("image", "audio", "video"))
                spec = sample_spec(m, rng)
                c = _mention(rng, spec) if vary_captions else canonical_caption(spec)
                turns += [
                    {"from": "human", "value": _pick(rng, REQUEST[m]).format(c=c), "kind": kind},
                    {"from": "gpt", "value": _pick(rng, CREATED[m]).format(c=c), "kind": kind, "output": spec, "caption": c},
                ]
                subject = spec
            else:  # transform
                q, spec, prefix = _transform(rng, subject)
                c = canonical_caption(spec)
                turns += [
                    {"from": "human", "value": q, "kind": kind},
                    {"from": "gpt", "value": f"{prefix} {c}.", "kind": kind, "output": spec, "caption": c},
                ]
                subject = spec
        dialogs.append(turns)
    return dialogs


def write_dialogs(
    out_dir: str | Path,
    n: int,
    seed: int,
    side: int = 64,
    *,
    outputs: bool = True,
    vary_captions: bool = False,
    progress: Callable[[int], Any] | None = None,
) -> Path:
    """Write n dialogs (stage-3 JSON) and their media; returns the JSON's path. `outputs=False`
    skips rendering the reference outputs (the gpt turns then name no file)."""
    return write_records(out_dir, sample_dialogs(n, seed, vary_captions=vary_captions), side, outputs=outputs, progress=progress)


def write_records(
    out_dir: str | Path, dialogs: list[list[dict[str, Any]]], side: int = 64, *, outputs: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> Path:
    """Write sampled dialogs (`sample_dialogs`, `conversations.sample_conversations`) as stage-3 JSON
    with their media. A turn's `input` / `output` (one spec) or `inputs` / `outputs` + `captions`
    (lists: several media in one turn) become the official fields (lists where there are several)."""
    out_dir = Path(out_dir)
    counters = {m: 0 for m in FOLDERS}

    def media(spec: Spec) -> str:
        m = spec.modality
        folder = out_dir / FOLDERS[m]
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{counters[m]:06d}.{EXTENSIONS[m]}"
        counters[m] += 1
        write_media(spec, folder / name, side)
        return name

    records = []
    for i, turns in enumerate(dialogs):
        conv = []
        for t in turns:
            turn = {"from": t["from"], "value": t["value"], "kind": t["kind"]}
            if "input" in t:
                spec = t["input"]
                turn[NAME_KEYS[spec.modality]] = media(spec)
                turn["attributes"] = spec.attributes()
            if "inputs" in t:  # conversations: one or more inputs, all of one modality per name key
                for spec in t["inputs"]:
                    turn.setdefault(NAME_KEYS[spec.modality], []).append(media(spec))
                turn["attributes"] = [spec.attributes() for spec in t["inputs"]]
            if "outputs" in t:
                specs, caps = t["outputs"], t["captions"]
                turn["output_modality"] = [spec.modality for spec in specs]
                turn["caption"] = list(caps)
                turn["attributes"] = [_said(spec, cap) for spec, cap in zip(specs, caps)]
                if outputs:
                    for spec in specs:
                        turn.setdefault(NAME_KEYS[spec.modality], []).append(media(spec))
            for key in ("answer", "changed"):  # what a question's answer / an edit's change is (for scoring)
                if key in t:
                    turn[key] = t[key]
            if "output" in t:
                spec = t["output"]
                turn["output_modality"] = spec.modality
                turn["caption"] = t["caption"]
                # what the caption says (a partial caption leaves the rest to the decoder) + rendering parameters
                turn["attributes"] = _said(spec, t["caption"])
                if outputs:
                    turn[NAME_KEYS[spec.modality]] = media(spec)
            conv.append(turn)
        records.append({"id": f"dialog-{i:06d}", "conversation": conv})
        if progress is not None:
            progress(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / DIALOGS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.world.dialogs", description="Write shapes-world MosIT dialogs (stage-3 data).")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--no-outputs", action="store_true", help="don't render the reference outputs")
    p.add_argument("--vary-captions", action="store_true", help="name requested outputs in varied, partial wordings")
    p.add_argument("--conversations", action="store_true",
                   help="multi-turn conversations instead (edits, follow-ups, several outputs at once; training.world.conversations)")
    args = p.parse_args(argv)
    if args.conversations:
        from training.world.conversations import sample_conversations

        path = write_records(args.out_dir, sample_conversations(args.n, args.seed), args.side, outputs=not args.no_outputs)
    else:
        path = write_dialogs(args.out_dir, args.n, args.seed, args.side, outputs=not args.no_outputs, vary_captions=args.vary_captions)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
