"""Rendering of shapes-world specs: images (PIL), audio (float32 waveform), video (uint8 frames).

Pixel-exact, no anti-aliasing, deterministic (no randomness at all: a spec fully decides its media).

Geometry (side S, pixel i covers [i, i+1)):
- the shape's bounding box is s = round(fraction * S) pixels wide and high (30% or 60%);
- it is vertically centred (top row (S - s) // 2);
- its centre is the centre of its horizontal third (S/6, S/2, 5S/6), moved inwards just as much
  as needed for the box to fit in the frame: a large (60%) shape on the left/right therefore
  touches the border, and its centre (0.3 S from the border) is still inside the outer third.
- circle: pixels whose centres lie in the inscribed disc; square: the whole box; triangle:
  isosceles, apex up, base = bottom row of the box (fill ratio ≈ 0.5).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.world.spec import (
    COLOURS,
    PITCHES,
    POSITIONS,
    SAMPLE_RATE,
    SIZES,
    VIDEO_SIZE,
    AudioSpec,
    ImageSpec,
    VideoSpec,
)

AUDIO_PEAK = 0.8  # contract: ≤ 0.9
FADE_SECONDS = 0.01  # raised-cosine fade in/out against clicks
VIDEO_MARGIN = 2  # pixels kept between the moving shape and the border at both ends of its track


def box_side(size: str, side: int) -> int:
    """Side in pixels of the shape's bounding box for a size name."""
    return max(2, int(round(SIZES[size] * side)))


def shape_mask(shape: str, s: int) -> np.ndarray:
    """Boolean (s, s) mask of a filled shape whose bounding box is exactly the s×s box."""
    c = np.arange(s) + 0.5 - s / 2  # pixel-centre offsets from the box centre
    dx = c[None, :]
    dy = c[:, None]
    if shape == "square":
        return np.ones((s, s), bool)
    if shape == "circle":
        return dx**2 + dy**2 <= (s / 2) ** 2
    if shape == "triangle":
        # pixel centres inside the triangle (apex at the top edge's middle, base = bottom edge);
        # the top row keeps at least its middle pixel(s) so that the box is exactly s high
        half_width = np.maximum((np.arange(s)[:, None] + 0.5) / 2, 0.5)
        return np.abs(dx) <= half_width
    raise ValueError(f"unknown shape {shape!r}")


def _paint(shape: str, colour: str, s: int, x0: int, y0: int, side: int) -> np.ndarray:
    frame = np.full((side, side, 3), 255, np.uint8)
    mask = shape_mask(shape, s)
    frame[y0 : y0 + s, x0 : x0 + s][mask] = COLOURS[colour]
    return frame


def image_box(spec: ImageSpec, side: int = 64) -> tuple[int, int, int]:
    """(x0, y0, s): top-left corner and side of the shape's bounding box in a side×side image."""
    s = box_side(spec.size, side)
    third = POSITIONS.index(spec.position)
    cx = (2 * third + 1) * side / 6
    cx = min(max(cx, s / 2), side - s / 2)
    x0 = min(max(int(round(cx - s / 2)), 0), side - s)
    y0 = (side - s) // 2
    return x0, y0, s


def image_array(spec: ImageSpec, side: int = 64) -> np.ndarray:
    """uint8 (side, side, 3) rendering of an image spec."""
    if side < 32:
        raise ValueError(f"side must be at least 32, got {side}")
    x0, y0, s = image_box(spec, side)
    return _paint(spec.shape, spec.colour, s, x0, y0, side)


def draw_image(spec: ImageSpec, side: int = 64) -> Image.Image:
    """White side×side RGB image with exactly one filled shape in the exact palette colour."""
    return Image.fromarray(image_array(spec, side), mode="RGB")


def synth_audio(spec: AudioSpec, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 waveform: sine ("beep") or square wave ("buzz") at the pitch's fundamental.

    The square wave is synthesised band-limited (odd harmonics k·f with k·f ≤ 0.475·sr, weights
    1/k), i.e. the alias-free square wave; peak normalised to AUDIO_PEAK, 10 ms fades at both ends.
    """
    f = PITCHES[spec.pitch]
    n = int(round(float(spec.seconds) * sr))
    t = np.arange(n, dtype=np.float64) / sr
    if spec.timbre == "beep":
        x = np.sin(2 * np.pi * f * t)
    elif spec.timbre == "buzz":
        x = np.zeros(n)
        k = 1
        while k * f <= 0.475 * sr:
            x += np.sin(2 * np.pi * k * f * t) / k
            k += 2
    else:
        raise ValueError(f"unknown timbre {spec.timbre!r}")
    x *= AUDIO_PEAK / np.max(np.abs(x))
    nf = min(int(round(FADE_SECONDS * sr)), n // 2)
    if nf > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(nf) + 0.5) / nf)
        x[:nf] *= ramp
        x[n - nf :] *= ramp[::-1]
    return x.astype(np.float32)


def video_track(spec: VideoSpec, side: int = 64) -> list[tuple[int, int, int]]:
    """Per-frame (x0, y0, s) of the moving shape's bounding box: a straight, uniform track."""
    s = box_side(VIDEO_SIZE, side)
    travel = side - s - 2 * VIDEO_MARGIN
    fixed = (side - s) // 2
    out = []
    for i in range(spec.frames):
        a = i / (spec.frames - 1)
        if spec.direction in ("left", "up"):
            a = 1 - a
        moving = VIDEO_MARGIN + int(round(a * travel))
        if spec.direction in ("left", "right"):
            out.append((moving, fixed, s))
        else:
            out.append((fixed, moving, s))
    return out


def draw_video(spec: VideoSpec, side: int = 64) -> np.ndarray:
    """uint8 (T, side, side, 3): a small shape moving in a straight line over ≥ 40% of the side."""
    if side < 32:
        raise ValueError(f"side must be at least 32, got {side}")
    return np.stack([_paint(spec.shape, spec.colour, s, x0, y0, side) for x0, y0, s in video_track(spec, side)])


def render(spec, side: int = 64, sr: int = SAMPLE_RATE):
    """Dispatch on the spec's type: PIL image, float32 waveform or uint8 frames."""
    if isinstance(spec, ImageSpec):
        return draw_image(spec, side)
    if isinstance(spec, AudioSpec):
        return synth_audio(spec, sr)
    if isinstance(spec, VideoSpec):
        return draw_video(spec, side)
    raise TypeError(f"not a shapes-world spec: {spec!r}")
