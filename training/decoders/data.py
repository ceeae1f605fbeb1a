"""Training data of the world decoders, drawn from the shapes-world generator (`training.world`).

The world is small and discrete: 108 images (3 shapes × 6 colours × 2 sizes × 3 positions), 72
videos at a fixed frame count (3 shapes × 6 colours × 4 directions) and 6 sounds (3 pitches × 2
timbres). Every sample is rendered once, exactly, by `training.world.render`; captions come from
the world's own templates (`training.world.captions`), so the decoders learn the caption language
the rest of the project produces. Synonyms the analyzer accepts ("big", "upwards", ...) are mixed
into the text encoders' pre-training.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from training.world import captions as C
from training.world.analyze import parse_caption
from training.world.render import draw_video, image_array, synth_audio
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
    VideoSpec,
)

# attribute → its values, in a fixed order (class indices of the text encoders' pre-training heads)
LABELS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": POSITIONS,
    "direction": DIRECTIONS,
    "pitch": tuple(PITCHES),
    "timbre": TIMBRES,
}
IGNORE = -100

IMAGE_TEMPLATES = (C.IMAGE_CANONICAL, *C.IMAGE_PARAPHRASES, *C.IMAGE_PARTIAL)
VIDEO_TEMPLATES = (C.VIDEO_CANONICAL, *C.VIDEO_PARAPHRASES)
AUDIO_TEMPLATES = (C.AUDIO_CANONICAL, *C.AUDIO_PARAPHRASES)
TEMPLATES = {"image": IMAGE_TEMPLATES, "video": VIDEO_TEMPLATES, "audio": AUDIO_TEMPLATES}

# Words a user prompt or a model reply may wrap a caption in: whole tokens in the tokenizers.
EXTRA_WORDS = (
    "draw make create generate show render paint play give me us please an the this that it of with "
    "and or in at to for is are sound sounds noise tone note audio clip video movie animation "
    "image picture photo drawing shape colour color white background moving moves going sliding "
    "slides towards toward from top bottom side now instead same another one two"
)


def image_specs() -> list[ImageSpec]:
    return [ImageSpec(*a) for a in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)]


def video_specs(frames: int) -> list[VideoSpec]:
    return [VideoSpec(s, c, d, frames) for s, c, d in itertools.product(SHAPES, COLOURS, DIRECTIONS)]


def audio_specs(seconds: float = 2.0) -> list[AudioSpec]:
    return [AudioSpec(p, t, seconds) for p, t in itertools.product(PITCHES, TIMBRES)]


@dataclass
class CaptionBank:
    """Every (sample, template) caption of one modality: `texts[k]` describes sample `owner[k]`."""

    texts: list[str]
    owner: np.ndarray  # (K,) int: index of the sample


def caption_bank(modality: str, specs) -> CaptionBank:
    texts, owner = [], []
    for i, spec in enumerate(specs):
        for template in TEMPLATES[modality]:
            texts.append(C.fill(template, spec.attributes()))
            owner.append(i)
    return CaptionBank(texts, np.asarray(owner, np.int64))


# ---- media -------------------------------------------------------------------------------------


def image_array_batch(specs, side: int) -> np.ndarray:
    """(N, 3, side, side) float32 in [-1, 1]."""
    a = np.stack([image_array(s, side) for s in specs]).astype(np.float32)
    return a.transpose(0, 3, 1, 2) / 127.5 - 1.0


def video_array_batch(specs, side: int) -> np.ndarray:
    """(N, F, 3, side, side) float32 in [-1, 1]."""
    a = np.stack([draw_video(s, side) for s in specs]).astype(np.float32)
    return a.transpose(0, 1, 4, 2, 3) / 127.5 - 1.0


def video_frames_unique(side: int, frames: int) -> np.ndarray:
    """The distinct frames of all videos, (M, 3, side, side) in [-1, 1] (for the VAE)."""
    v = video_array_batch(video_specs(frames), side).reshape(-1, 3, side, side)
    _, idx = np.unique(v.reshape(len(v), -1), axis=0, return_index=True)
    return v[np.sort(idx)]


def audio_waves(seconds: float = 2.0) -> np.ndarray:
    """(6, N) float32 waveforms of the 6 sounds, `seconds` long (fades at both ends)."""
    return np.stack([synth_audio(s) for s in audio_specs(seconds)])


# ---- text --------------------------------------------------------------------------------------


def _synonyms() -> dict[str, dict[str, list[str]]]:
    """attribute → canonical value → [synonyms] (from the analyzer's table; canonical excluded)."""
    try:
        from training.world.analyze import _SYNONYMS as table
    except ImportError:  # pragma: no cover - the analyzer's private table moved
        return {}
    out: dict[str, dict[str, list[str]]] = {}
    for key, words in table.items():
        for word, value in words.items():
            if word != value and word not in _NOT_SWAPPED:
                out.setdefault(key, {}).setdefault(value, []).append(word)
    return out


# plurals and adjectives read awkwardly in the templates; "square" (a buzz) would confuse shapes
_NOT_SWAPPED = {"circles", "squares", "triangles", "beeps", "buzzes", "square", "circular", "triangular", "centered", "centred"}


SYNONYMS = _synonyms()


def label_caption(text: str, modality: str) -> dict[str, int]:
    """attribute → class index for the attributes the caption names (parse_caption's reading)."""
    found = parse_caption(text, "video" if modality == "video" else modality)
    return {k: LABELS[k].index(v) for k, v in found.items() if k in LABELS and v in LABELS[k]}


def sample_text(modality: str, rng: np.random.Generator, synonym_p: float = 0.3) -> tuple[str, dict[str, str]]:
    """A random caption of a random sample (with synonyms swapped in at rate `synonym_p`) and the
    attributes it names."""
    if modality == "image":
        spec = image_specs()[int(rng.integers(108))]
    elif modality == "video":
        spec = video_specs(8)[int(rng.integers(72))]
    else:
        spec = audio_specs(1.0)[int(rng.integers(6))]
    attrs = {k: v for k, v in spec.attributes().items() if k in LABELS}
    template = TEMPLATES[modality][int(rng.integers(len(TEMPLATES[modality])))]
    shown = dict(attrs)
    for key, value in attrs.items():
        options = SYNONYMS.get(key, {}).get(value, [])
        if options and rng.random() < synonym_p:
            shown[key] = options[int(rng.integers(len(options)))]
    text = C.fill(template, shown)
    named = {k: attrs[k] for k in attrs if "{" + k + "}" in template}
    return text, named


def corpus() -> list[str]:
    """Texts the tokenizers are trained on: every caption of every sample, synonyms, extra words."""
    texts: list[str] = []
    for modality, specs in (("image", image_specs()), ("video", video_specs(8)), ("audio", audio_specs(1.0))):
        texts += caption_bank(modality, specs).texts
    words = {w for d in SYNONYMS.values() for ws in d.values() for w in ws} | set(EXTRA_WORDS.split())
    texts += [f"a {w}" for w in sorted(words)] * 4  # after a space (RoBERTa spells those words "Ġword")
    texts += ["a high-pitched beep, a low-pitched buzz, a mid-pitched beep."] * 4
    return texts
