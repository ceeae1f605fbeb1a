"""Captions of shapes-world samples: the contract's canonical template plus paraphrases.

Every template keeps the words the contract requires (images/videos: colour and shape; audio:
pitch and timbre; video: direction too) spelled exactly as in the vocabulary, so that
`analyze.parse_caption` recovers them. Image templates that drop size/position (the contract's
"a picture of a red circle") are used only when `require_all=False`.
"""

from __future__ import annotations

import re

import numpy as np

from training.world.spec import AudioSpec, ImageSpec, VideoSpec

IMAGE_CANONICAL = "a {size} {colour} {shape} on the {position}"
IMAGE_PARAPHRASES = (
    "a picture of a {size} {colour} {shape} on the {position}",
    "an image of a {size} {colour} {shape} on the {position}",
    "a {colour} {shape}, {size}, on the {position}",
    "on the {position}, a {size} {colour} {shape}",
    "a {size} {colour} {shape} on the {position} of a white background",
    "a {size} {shape} in {colour} on the {position}",
)
IMAGE_PARTIAL = (  # colour and shape only: allowed by the contract, never for require_all
    "a picture of a {colour} {shape}",
    "a {colour} {shape}",
)

AUDIO_CANONICAL = "a {pitch}-pitched {timbre}"
AUDIO_PARAPHRASES = (
    "a {pitch} {timbre}",
    "the sound of a {pitch}-pitched {timbre}",
    "a {timbre} with a {pitch} pitch",
    "a {pitch}-pitched {timbre} sound",
    "a short {pitch} {timbre}",
)

VIDEO_CANONICAL = "a {colour} {shape} moving {direction}"
VIDEO_PARAPHRASES = (
    "a video of a {colour} {shape} moving {direction}",
    "a {colour} {shape} that moves {direction}",
    "a {colour} {shape} sliding {direction}",
    "a {colour} {shape} moving {direction} across a white background",
    "a clip of a {colour} {shape} going {direction}",
)

_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiou])")


def fill(template: str, attributes: dict) -> str:
    """A caption template with the attributes in, "a" → "an" before a vowel."""
    return _ARTICLE.sub(r"\1n ", template.format(**attributes))


def _choose(rng: np.random.Generator | None, templates) -> str:
    if rng is None:
        return templates[0]
    return templates[int(rng.integers(len(templates)))]


def caption_image(spec: ImageSpec, rng: np.random.Generator | None = None, *, require_all: bool = False) -> str:
    """Canonical or paraphrased caption (uniform over templates; canonical when rng is None)."""
    templates = (IMAGE_CANONICAL, *IMAGE_PARAPHRASES) + (() if require_all else IMAGE_PARTIAL)
    return fill(_choose(rng, templates), spec.attributes())


def caption_audio(spec: AudioSpec, rng: np.random.Generator | None = None) -> str:
    return fill(_choose(rng, (AUDIO_CANONICAL, *AUDIO_PARAPHRASES)), spec.attributes())


def caption_video(spec: VideoSpec, rng: np.random.Generator | None = None) -> str:
    return fill(_choose(rng, (VIDEO_CANONICAL, *VIDEO_PARAPHRASES)), spec.attributes())


def caption(spec, rng: np.random.Generator | None = None) -> str:
    """Dispatch on the spec's type."""
    if isinstance(spec, ImageSpec):
        return caption_image(spec, rng)
    if isinstance(spec, AudioSpec):
        return caption_audio(spec, rng)
    if isinstance(spec, VideoSpec):
        return caption_video(spec, rng)
    raise TypeError(f"not a shapes-world spec: {spec!r}")


def canonical_caption(spec) -> str:
    """The contract's template, no randomness: "a small red circle on the left",
    "a high-pitched buzz", "a blue square moving up"."""
    return caption(spec, None)
