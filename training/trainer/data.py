"""Training data in the official NExT-GPT formats, validated record by record.

Two kinds of JSON file (a top-level list of records; UTF-8):

**Pair files** (stages 1 and 2; CC3M / WebVid / AudioCaps style, `training.world.write_pairs`)::

    [{"caption": "a red circle", "image_name": "000001.png"}, ...]

- `caption`: non-empty string.
- exactly one of `image_name` | `video_name` | `audio_name`: the media file, relative to the media
  root (see below). Other keys (e.g. `attributes`) are ignored.

**Dialog files** (stage 3: T2M, MosIT, LLaVA-style instruction data)::

    [{"conversation": [                       # or "conversations" (the later NExT-GPT rewrite)
        {"from": "human", "value": "What is this?", "image_name": "000003.png"},
        {"from": "gpt",   "value": "A large red circle."},
        {"from": "human", "value": "Now draw it in blue."},
        {"from": "gpt",   "value": "Here is a large blue circle.", "output_modality": "image",
         "caption": "a large blue circle"}
     ],
     "image_name": "..."}                     # optional, legacy T+X→T: media of the first human turn
    ]

- `from`: `human` | `gpt` (`user` / `assistant` are accepted as synonyms); the first turn is human;
  a dialog needs at least one gpt turn (trailing human turns are ignored).
- `value`: string. Placeholders `<image>` `<video>` `<audio>` (any case, e.g. the legacy MosIT
  `<Image>`) are removed from human turns (the template places one media slot per input file) and,
  in gpt turns, mark an output of that modality (see below).
- human turns: `image_name` | `video_name` | `audio_name` (a string or a list of strings): input
  media, fed through the encoder and input projection, one slot each.
- gpt turns: the media the reply creates: `output_modality` (string or list) with `caption` (the
  decoder's text for it; string or list of the same length; the projector target), or the
  placeholders in `value`, or the signal-token text itself (`[IMG0]...`). The reply is trained as
  `{value}{signal tokens of each output}` + the template's end (`\\n###`). A gpt turn's
  `*_name` fields name the reference output file; they are not fed to the model.
- The tokens the project adds (`<Img>`, `</Img>`, `[IMG0]`...) must not appear in human text.

Media names are resolved against `media_root` when given (the official `mm_root_path`), otherwise
against `<json dir>/<images|videos|audios>/` (the `training.world` layout) and then `<json dir>/`.

Every problem raises `DataError` naming the file, the record index and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextgpt.tokens import MEDIA_END, MEDIA_START, MODALITIES

NAME_KEYS = {"image": "image_name", "video": "video_name", "audio": "audio_name"}
FOLDERS = {"image": "images", "video": "videos", "audio": "audios"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
STAGE1_INSTRUCTION = "generate a caption"  # the official stage-1 prompt

_PLACEHOLDER = re.compile(r"<(image|video|audio)>", re.IGNORECASE)
_SIGNAL_TEXT = re.compile(r"\[(IMG|VID|AUD)(\d+)\]")
_OUTPUT_MARKS = re.compile(r"<(image|video|audio)>|\[(IMG|VID|AUD)(\d+)\]", re.IGNORECASE)  # in a gpt value
_MARK = "\ue000"  # where a placeholder stood while the reply text is cleaned
_PREFIX_TO_MODALITY = {spec.prefix: m for m, spec in MODALITIES.items()}
_MAX_LISTED = 20


class DataError(ValueError):
    """Training data that does not match the expected format.

    `problems` lists (file, index, field, message); `file`, `index` and `field` are those of the
    first problem (index None = the file as a whole, field None = the record as a whole).
    """

    def __init__(self, problems: list[tuple[str, int | None, str | None, str]]):
        self.problems = list(problems)
        self.file, self.index, self.field, _ = self.problems[0]
        lines = [_where(*p[:3]) + p[3] for p in self.problems[:_MAX_LISTED]]
        if len(self.problems) > _MAX_LISTED:
            lines.append(f"... and {len(self.problems) - _MAX_LISTED} more problems")
        head = "bad training data" if len(self.problems) > 1 else ""
        super().__init__((head + ":\n  " + "\n  ".join(lines)) if head else lines[0])


def _where(file: str, index: int | None, fld: str | None) -> str:
    out = f"{file}: "
    if index is not None:
        out += f"record {index}: "
    if fld is not None:
        out += f"field {fld!r}: "
    return out


# --------------------------------------------------------------------------------------------------
# what the trainer consumes


@dataclass
class Output:
    """One media the assistant creates: N signal tokens whose projection should match `caption`'s
    decoder text embedding (no projector loss when caption is None)."""

    modality: str
    caption: str | None = None
    at: int | None = None  # where in the reply text its signal group goes (a character offset); None: at the end


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str  # without signal tokens / placeholders
    media: list[tuple[str, Path]] = field(default_factory=list)  # user inputs: (modality, path)
    outputs: list[Output] = field(default_factory=list)  # assistant: media created, in order


@dataclass
class Dialog:
    turns: list[Turn]
    source: str = ""  # "file.json#index", for messages

    @property
    def media(self) -> list[tuple[str, Path]]:
        return [item for t in self.turns if t.role == "user" for item in t.media]

    @property
    def outputs(self) -> list[Output]:
        return [o for t in self.turns if t.role == "assistant" for o in t.outputs]


@dataclass
class Pair:
    modality: str
    caption: str
    path: Path | None  # None when not resolved (stage 2 needs no media)
    name: str
    source: str = ""


def pair_to_dialog(pair: Pair, stage: int) -> Dialog:
    """Stage 1: `<Img>{media}</Img> generate a caption` → `{caption}`.
    Stage 2: `{caption}` → `{caption}` + the modality's signal tokens (projector target: caption)."""
    if stage == 1:
        if pair.path is None:
            raise ValueError(f"{pair.source}: stage 1 needs the media file")
        turns = [Turn("user", STAGE1_INSTRUCTION, media=[(pair.modality, pair.path)]), Turn("assistant", pair.caption)]
    elif stage == 2:
        turns = [Turn("user", pair.caption), Turn("assistant", pair.caption, outputs=[Output(pair.modality, pair.caption)])]
    else:
        raise ValueError(f"pairs are stage 1 or 2 data, not stage {stage}")
    return Dialog(turns, source=pair.source)


# --------------------------------------------------------------------------------------------------
# reading


def _read_json_list(path: Path) -> list:
    p = str(path)
    if not path.is_file():
        raise DataError([(p, None, None, "file not found")])
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError([(p, None, None, f"not UTF-8 text: {e}")]) from None
    except json.JSONDecodeError as e:
        raise DataError([(p, None, None, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")]) from None
    if not isinstance(data, list):
        raise DataError([(p, None, None, f"expected a JSON list of records at the top level, got {type(data).__name__}")])
    if not data:
        raise DataError([(p, None, None, "no records")])
    return data


def _resolve(json_path: Path, media_root: Path | None, modality: str, name: str) -> tuple[Path | None, list[Path]]:
    candidates = [media_root / name] if media_root is not None else [json_path.parent / FOLDERS[modality] / name, json_path.parent / name]
    for c in candidates:
        if c.is_file():
            return c, candidates
    return None, candidates


def _kind(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "conversation" in record or "conversations" in record:
        return "dialog"
    if "caption" in record:
        return "pair"
    return None


def read_pairs_file(
    path: str | Path, media_root: str | Path | None = None, *, need_media: bool = True
) -> list[Pair]:
    """Validate and load a pair file. `need_media=False` (stage 2) skips the file-existence check."""
    path = Path(path).expanduser()
    root = Path(media_root).expanduser() if media_root is not None else None
    data = _read_json_list(path)
    p = str(path)
    if _kind(data[0]) == "dialog":
        raise DataError([(p, 0, None, "this is a dialog record ('conversation'); stages 1 and 2 take X-caption "
                                      "pair records [{\"caption\", \"image_name\"|\"video_name\"|\"audio_name\"}]; "
                                      "use dialog files with --stage 3")])
    problems: list[tuple[str, int | None, str | None, str]] = []
    pairs: list[Pair] = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            problems.append((p, i, None, f"expected an object, got {type(rec).__name__}"))
            continue
        cap = rec.get("caption")
        bad = False
        if "caption" not in rec:
            problems.append((p, i, "caption", "missing"))
            bad = True
        elif not isinstance(cap, str) or not cap.strip():
            problems.append((p, i, "caption", f"must be a non-empty string, got {cap!r}"))
            bad = True
        elif _reserved_in(cap):
            problems.append((p, i, "caption", f"contains a reserved token ({_reserved_in(cap)})"))
            bad = True
        keys = [k for k in NAME_KEYS.values() if k in rec]
        if len(keys) != 1:
            what = "none of" if not keys else "more than one of"
            problems.append((p, i, "|".join(NAME_KEYS.values()), f"{what} the media-name fields (exactly one is required)"))
            continue
        key = keys[0]
        modality = next(m for m, k in NAME_KEYS.items() if k == key)
        name = rec[key]
        if not isinstance(name, str) or not name.strip():
            problems.append((p, i, key, f"must be a non-empty string, got {name!r}"))
            continue
        resolved = None
        if need_media:
            resolved, tried = _resolve(path, root, modality, name)
            if resolved is None:
                problems.append((p, i, key, f"media file not found (tried {', '.join(map(str, tried))})"))
                continue
        if not bad:
            pairs.append(Pair(modality, cap.strip(), resolved, name, source=f"{p}#{i}"))
    if problems:
        raise DataError(problems)
    return pairs


def _reserved_in(text: str) -> str | None:
    for tok in (MEDIA_START, MEDIA_END):
        if tok in text:
            return tok
    m = _SIGNAL_TEXT.search(text)
    return m.group(0) if m else None


def _as_list(value: Any) -> list | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def read_dialogs_file(path: str | Path, media_root: str | Path | None = None) -> list[Dialog]:
    """Validate and load a dialog (T2M / MosIT / LLaVA-style) file; see the module docstring."""
    path = Path(path).expanduser()
    root = Path(media_root).expanduser() if media_root is not None else None
    data = _read_json_list(path)
    p = str(path)
    if _kind(data[0]) == "pair":
        raise DataError([(p, 0, None, "this is an X-caption pair record; stage 3 takes dialog records "
                                      "[{\"conversation\": [{\"from\", \"value\"}, ...]}]; use pair files with --stage 1 or 2")])
    problems: list[tuple[str, int | None, str | None, str]] = []
    dialogs: list[Dialog] = []

    def bad(i, fld, msg):
        problems.append((p, i, fld, msg))

    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            bad(i, None, f"expected an object, got {type(rec).__name__}")
            continue
        key = "conversation" if "conversation" in rec else "conversations"
        conv = rec.get(key)
        if conv is None:
            bad(i, "conversation", "missing (a list of {\"from\", \"value\"} turns)")
            continue
        if not isinstance(conv, list) or not conv:
            bad(i, key, "must be a non-empty list of turns")
            continue
        n_before = len(problems)
        turns: list[Turn] = []
        for j, t in enumerate(conv):
            f = f"{key}[{j}]"
            if not isinstance(t, dict):
                bad(i, f, f"expected an object, got {type(t).__name__}")
                continue
            who = t.get("from")
            if who not in ROLES:
                bad(i, f + ".from", f"must be 'human' or 'gpt', got {who!r}")
                continue
            role = ROLES[who]
            if j == 0 and role != "user":
                bad(i, f + ".from", "the first turn must be 'human'")
            value = t.get("value")
            if not isinstance(value, str):
                bad(i, f + ".value", f"must be a string, got {type(value).__name__ if value is not None else 'nothing'}")
                continue
            if role == "user":
                turn = _user_turn(
                    t, value, rec if j == 0 else None, path, root,
                    lambda fld, msg, f=f: bad(i, f + fld, msg), lambda fld, msg: bad(i, fld, msg),
                )
            else:
                turn = _gpt_turn(t, value, lambda fld, msg, f=f: bad(i, f + fld, msg))
            if turn is not None:
                turns.append(turn)
        if len(problems) > n_before:
            continue
        while turns and turns[-1].role == "user":
            turns.pop()
        if not any(t.role == "assistant" for t in turns):
            bad(i, key, "no 'gpt' turn to train on")
            continue
        if not any(t.text or t.outputs for t in turns if t.role == "assistant"):
            bad(i, key, "every 'gpt' turn is empty")
            continue
        dialogs.append(Dialog(turns, source=f"{p}#{i}"))
    if problems:
        raise DataError(problems)
    return dialogs


def _user_turn(t: dict, value: str, record: dict | None, path: Path, root: Path | None, bad, bad_record) -> Turn | None:
    reserved = _reserved_in(value)
    if reserved:
        bad(".value", f"contains the reserved token {reserved}; human turns take media through *_name fields")
        return None
    media: list[tuple[str, Path]] = []
    ok = True
    sources = [(t, lambda key, msg: bad("." + key, msg))]
    if record is not None:  # legacy T+X→T: the record's media belong to the first human turn
        sources.append((record, bad_record))
    for src, report in sources:
        for modality, key in NAME_KEYS.items():
            if key not in src:
                continue
            names = _as_list(src[key])
            if names is None or not all(n.strip() for n in names):
                report(key, f"must be a file name or a list of them, got {src[key]!r}")
                ok = False
                continue
            for n in names:
                resolved, tried = _resolve(path, root, modality, n)
                if resolved is None:
                    report(key, f"media file not found (tried {', '.join(map(str, tried))})")
                    ok = False
                else:
                    media.append((modality, resolved))
    if not ok:
        return None
    text = _PLACEHOLDER.sub("", value)
    text = re.sub(r"[ \t]*\n[ \t]*\n+", "\n", text).strip()
    return Turn("user", text, media=media)


def _gpt_turn(t: dict, value: str, bad) -> Turn | None:
    for tok in (MEDIA_START, MEDIA_END):
        if tok in value:
            bad(".value", f"contains the reserved token {tok}")
            return None
    # outputs: explicit fields first, else placeholders / signal text in the value, in order
    explicit = t.get("output_modality")
    # each placeholder / signal group names an output and marks where its group goes: "a green square <image>
    # and a beep <audio>" trains "a green square[IMG0..3] and a beep[AUD0..7]"; one at the very end (the usual
    # case) is at=None
    inline: list[str] = []

    def mark(m: re.Match) -> str:
        if m.group(1) or m.group(3) == "0":
            inline.append(m.group(1).lower() if m.group(1) else _PREFIX_TO_MODALITY[m.group(2).upper()])
            return _MARK
        return ""  # [IMG1] ... : the rest of a group

    marked = _OUTPUT_MARKS.sub(mark, value)
    marked = re.sub(r"[ \t]+\n", "\n", marked).strip()
    marked = re.sub(r"[ \t]+" + _MARK, _MARK, marked)  # "square <image> and" -> "square" + group + " and"
    text, offsets = "", []
    for piece in marked.split(_MARK):
        offsets.append(len(text))
        text += piece
    lead = len(text) - len(text.lstrip())
    text = text.strip()
    offsets = [min(max(o - lead, 0), len(text)) for o in offsets[1:]]
    if explicit is not None:
        modalities = _as_list(explicit)
        if modalities is None or any(m not in MODALITIES for m in modalities):
            bad(".output_modality", f"must be one of {', '.join(MODALITIES)} (or a list of them), got {explicit!r}")
            return None
        if inline and inline != modalities:
            bad(".value", f"its placeholders/signal tokens ({', '.join(inline)}) disagree with output_modality ({', '.join(modalities)})")
            return None
    else:
        modalities = inline
    captions: list[str | None] = [None] * len(modalities)
    if "caption" in t and t["caption"] is not None:
        caps = _as_list(t["caption"])
        if caps is None or any(not c.strip() for c in caps):
            bad(".caption", f"must be a non-empty string or a list of them, got {t['caption']!r}")
            return None
        if not modalities:
            bad(".caption", "a caption needs an output: set output_modality (image|video|audio)")
            return None
        if len(caps) != len(modalities):
            bad(".caption", f"{len(caps)} caption(s) for {len(modalities)} output(s)")
            return None
        captions = [c.strip() for c in caps]
    ats: list[int | None] = [None] * len(modalities)
    if len(offsets) == len(modalities):
        ats = [a if a < len(text) else None for a in offsets]
    return Turn("assistant", text, outputs=[Output(m, c, a) for m, c, a in zip(modalities, captions, ats)])


def load_stage_data(stage: int, files: list[str | Path], media_root: str | Path | None = None) -> list[Dialog]:
    """All examples of a stage as dialogs: pair files for stages 1 and 2, dialog files for stage 3."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    if not files:
        raise ValueError("no data files given")
    out: list[Dialog] = []
    for f in files:
        if stage in (1, 2):
            out += [pair_to_dialog(pr, stage) for pr in read_pairs_file(f, media_root, need_media=stage == 1)]
        else:
            out += read_dialogs_file(f, media_root)
    return out
