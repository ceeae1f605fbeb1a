"""Vocabulary of the synthetic "shapes world" and the specs that describe one sample.

The values here are the contract of /work/shared/reference/shapes-world.md: the palette's exact
RGB, the two sizes (fraction of the image side spanned by the shape's bounding box), the three
horizontal positions, the three pitches (fundamental, Hz), the two timbres and the four directions.
Everything downstream (rendering, captions, dataset files, the analyzer) reads them from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MODALITIES: tuple[str, ...] = ("image", "audio", "video")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
WHITE: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.3, "large": 0.6}
POSITIONS: tuple[str, ...] = ("left", "center", "right")
PITCHES: dict[str, float] = {"low": 220.0, "mid": 440.0, "high": 880.0}
TIMBRES: tuple[str, ...] = ("beep", "buzz")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

SAMPLE_RATE = 16000
AUDIO_SECONDS = (1.0, 2.0)  # inclusive range of clip durations
VIDEO_FRAMES = (8, 16)  # inclusive range of frame counts
VIDEO_FPS = 8
VIDEO_SIZE = "small"  # moving shapes are always small so that they have room to travel

# Which attributes describe each modality (spec field names; also the analyzer's keys).
ATTRIBUTE_KEYS: dict[str, tuple[str, ...]] = {
    "image": ("shape", "colour", "size", "position"),
    "audio": ("pitch", "timbre"),
    "video": ("shape", "colour", "direction"),
}
VOCABULARY: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": POSITIONS,
    "pitch": tuple(PITCHES),
    "timbre": TIMBRES,
    "direction": DIRECTIONS,
}


def _check(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


@dataclass(frozen=True)
class ImageSpec:
    shape: str
    colour: str
    size: str
    position: str

    modality = "image"

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, COLOURS)
        _check("size", self.size, SIZES)
        _check("position", self.position, POSITIONS)

    def attributes(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AudioSpec:
    pitch: str
    timbre: str
    seconds: float = 1.5

    modality = "audio"

    def __post_init__(self) -> None:
        _check("pitch", self.pitch, PITCHES)
        _check("timbre", self.timbre, TIMBRES)
        lo, hi = AUDIO_SECONDS
        if not lo <= float(self.seconds) <= hi:
            raise ValueError(f"seconds must be in [{lo}, {hi}], got {self.seconds!r}")
        object.__setattr__(self, "seconds", float(self.seconds))  # plain float (JSON-able)

    @property
    def frequency(self) -> float:
        return PITCHES[self.pitch]

    def attributes(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VideoSpec:
    shape: str
    colour: str
    direction: str
    frames: int = 12

    modality = "video"

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, COLOURS)
        _check("direction", self.direction, DIRECTIONS)
        lo, hi = VIDEO_FRAMES
        if not (isinstance(self.frames, (int, np.integer)) and lo <= self.frames <= hi):
            raise ValueError(f"frames must be an int in [{lo}, {hi}], got {self.frames!r}")
        object.__setattr__(self, "frames", int(self.frames))  # plain int (JSON-able)

    def attributes(self) -> dict[str, Any]:
        return asdict(self)


Spec = ImageSpec | AudioSpec | VideoSpec


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_image_spec(rng: np.random.Generator) -> ImageSpec:
    return ImageSpec(
        shape=_pick(rng, SHAPES),
        colour=_pick(rng, COLOURS),
        size=_pick(rng, SIZES),
        position=_pick(rng, POSITIONS),
    )


def sample_audio_spec(rng: np.random.Generator) -> AudioSpec:
    pitch, timbre = _pick(rng, PITCHES), _pick(rng, TIMBRES)
    lo, hi = AUDIO_SECONDS
    seconds = round(float(rng.uniform(lo, hi)), 2)  # 10 ms steps: a whole number of samples
    return AudioSpec(pitch=pitch, timbre=timbre, seconds=min(max(seconds, lo), hi))


def sample_video_spec(rng: np.random.Generator) -> VideoSpec:
    shape, colour, direction = _pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, DIRECTIONS)
    lo, hi = VIDEO_FRAMES
    return VideoSpec(shape=shape, colour=colour, direction=direction, frames=int(rng.integers(lo, hi + 1)))


SAMPLERS = {"image": sample_image_spec, "audio": sample_audio_spec, "video": sample_video_spec}


def sample_spec(modality: str, rng: np.random.Generator) -> Spec:
    _check("modality", modality, MODALITIES)
    return SAMPLERS[modality](rng)


def spec_from_attributes(modality: str, attributes: dict[str, Any]) -> Spec:
    """Inverse of `spec.attributes()` (e.g. from a pair-data record's "attributes")."""
    cls = {"image": ImageSpec, "audio": AudioSpec, "video": VideoSpec}[modality]
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in attributes.items() if k in fields})
