"""Attribute analyzer: reads shapes-world attributes back from media and from text.

Used to score generated media against their captions (text→X) and model replies against the
truth (X→text). It is meant to work on imperfect generated media, not only perfect renders:

- image: background = median of the border pixels (white when the border is not light);
  foreground = pixels far from it after a 3×3 median filter (threshold: half the strongest
  distance), largest 4-connected blob only. colour = palette entry nearest (Euclidean RGB) to the
  median colour of the blob's core; shape = triangle when the top half of the bounding box holds
  much less than the bottom half (apex up: ≈ 1/3, others ≈ 1), else square vs circle by the fill
  ratio of the box (1 vs π/4) and the diagonal/axis extent ratio (√2 vs 1), combined; size = bounding-box span
  relative to the side (boundary 45%); position = third holding the blob's centroid.
- audio: pitch = strongest spectral peak in 100–2000 Hz, nearest of 220/440/880 Hz in log
  frequency; timbre = (|X(3f)| + |X(5f)|) / |X(f)| (square wave ≈ 1/3 + 1/5, sine ≈ 0) ≥ 0.15 → buzz.
- video: per-frame blob centroid; direction from the least-squares track's net displacement
  (dominant axis and sign; image y grows downward, so "up" is negative dy); colour and shape by
  majority over the frames (middle frame breaks ties).

Every analyzer returns the modality's attributes (value "none" when nothing is found), a
"confidence" in [0, 1] (the minimum over attributes) and "details" (per-attribute confidences and
the raw measurements).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.world.spec import ATTRIBUTE_KEYS, COLOURS, PITCHES, POSITIONS, SAMPLE_RATE, WHITE

NONE = "none"
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], np.float64)
_WHITE = np.array(WHITE, np.float64)

MIN_LEVEL = 60.0  # RGB distance from the background below which nothing counts as foreground
MAX_ANALYSIS_SIDE = 128  # larger images are box-downsampled first (fractions are unchanged)
SIZE_BOUNDARY = 0.45  # bounding-box span / side between small (0.3) and large (0.6)
# 0 = circle, 1 = square (see analyze_image); above → square. Measured: the small decoder's circles
# 0.17 at most (a 19-px circle is 0.09 even when drawn exactly: its pixels fill the box more than π/4;
# a soft rim adds more), its squares 0.38 at least, a square blurred with radius 2.5 px 0.25 at least.
# (0.15 read a third of the decoder's small red circles as squares.)
SQUARENESS = 0.21
TRIANGLE_ASYMMETRY = 0.75  # top-half / bottom-half area below which a blob is an apex-up triangle
BUZZ_RATIO = 0.15  # (|X(3f)| + |X(5f)|) / |X(f)| above which a tone is a square wave
MIN_MOTION = 0.1  # net displacement (fraction of the side) below which a video shows no motion


# ----------------------------------------------------------------------------------- loading


def load_rgb(image: Any) -> np.ndarray:
    """PIL image, path, or array (H, W[, 3|4]) uint8 or float in [0, 1] → float64 (H, W, 3) 0–255."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    a = a[:, :, :3]
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        if a.max(initial=0.0) <= 1.0 + 1e-6:
            a = a * 255.0
        return np.clip(a, 0.0, 255.0)
    return a.astype(np.float64)


def load_audio(audio: Any, sr: int | None = None) -> tuple[np.ndarray, int]:
    """Path or array → (mono float64 waveform, sample rate)."""
    if isinstance(audio, (str, Path)):
        import soundfile as sf

        x, file_sr = sf.read(str(audio), dtype="float64", always_2d=True)
        return x.mean(axis=1), int(file_sr)
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 2:  # (channels, n) or (n, channels): average the short axis
        x = x.mean(axis=0 if x.shape[0] < x.shape[1] else 1)
    return x.reshape(-1), int(sr or SAMPLE_RATE)


def load_video(video: Any) -> np.ndarray:
    """Path (any format PyAV reads) or array (T, H, W, 3) → uint8/float frames (T, H, W, 3)."""
    if isinstance(video, (str, Path)):
        import av

        with av.open(str(video)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    a = np.asarray(video)
    if a.ndim != 4 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected (T, H, W, 3) frames, got shape {a.shape}")
    return a


# ----------------------------------------------------------------------------------- images


def _median3(a: np.ndarray) -> np.ndarray:
    """3×3 median filter (edge-replicated) of a 2-D array."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    stack = np.stack([p[i : i + h, j : j + w] for i in range(3) for j in range(3)])
    return np.median(stack, axis=0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (label propagation, numpy only)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        m = lab.copy()
        np.minimum(m[1:], lab[:-1], out=m[1:])
        np.minimum(m[:-1], lab[1:], out=m[:-1])
        np.minimum(m[:, 1:], lab[:, :-1], out=m[:, 1:])
        np.minimum(m[:, :-1], lab[:, 1:], out=m[:, :-1])
        m[~mask] = big
        if np.array_equal(m, lab):
            break
        lab = m
    counts = np.bincount(lab[mask])
    return lab == int(np.argmax(counts))


def _shrink(rgb: np.ndarray) -> np.ndarray:
    h, w, _ = rgb.shape
    if max(h, w) <= MAX_ANALYSIS_SIDE:
        return rgb
    scale = MAX_ANALYSIS_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize(size, Image.Resampling.BOX)
    return np.asarray(im).astype(np.float64)


def foreground(image: Any) -> dict[str, Any] | None:
    """The main blob of an image: {"mask", "core", "level", "background", "rgb"} or None."""
    rgb = _shrink(load_rgb(image))
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0)
    if np.linalg.norm(bg - _WHITE) > 120:  # a dark/colourful border: not a background, assume white
        bg = _WHITE
    dist = _median3(np.linalg.norm(rgb - bg, axis=2))
    level = float(dist.max(initial=0.0))
    if level < MIN_LEVEL:
        return None
    mask = _largest_component(dist > 0.5 * level)
    core = mask & (dist > 0.75 * level)
    if not core.any():
        core = mask
    return {"mask": mask, "core": core, "level": level, "background": bg, "rgb": rgb}


def _nearest_colour(rgb: np.ndarray) -> tuple[str, float]:
    d = np.linalg.norm(_PALETTE - rgb, axis=1)
    order = np.argsort(d)
    d1, d2 = float(d[order[0]]), float(d[order[1]])
    return _PALETTE_NAMES[int(order[0])], (d2 - d1) / (d2 + d1 + 1e-9)


def _none_result(keys, **details) -> dict[str, Any]:
    out: dict[str, Any] = {k: NONE for k in keys}
    out["confidence"] = 0.0
    out["details"] = {"confidence": {k: 0.0 for k in keys}, **details}
    return out


def analyze_image(image: Any) -> dict[str, Any]:
    """{"shape", "colour", "size", "position", "confidence", "details"} of an image's main blob."""
    keys = ATTRIBUTE_KEYS["image"]
    fg = foreground(image)
    if fg is None:
        return _none_result(keys, foreground_fraction=0.0)
    mask, rgb = fg["mask"], fg["rgb"]
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    bw, bh = int(x1 - x0 + 1), int(y1 - y0 + 1)
    area = int(mask.sum())
    fill = area / (bw * bh)
    rows = mask[y0 : y1 + 1, x0 : x1 + 1].sum(axis=1)
    half = bh // 2
    top, bottom = float(rows[:half].sum()), float(rows[bh - half :].sum())
    asymmetry = top / bottom if bottom > 0 else 1.0

    # Square vs circle: fill ratio of the bounding box (1 vs π/4) and extent along the diagonals
    # relative to the axes (√2 vs 1), each scaled to 0 (circle) … 1 (square), averaged. Blur
    # rounds a square's corners, lowering both; a soft rim raises a small circle's (see SQUARENESS).
    px, py = xs + 0.5, ys + 0.5
    diagonal = max(np.ptp(px + py), np.ptp(px - py)) / np.sqrt(2) + 1
    diag_ratio = diagonal / max(bw, bh)
    squareness = 0.5 * ((fill - np.pi / 4) / (1 - np.pi / 4) + (diag_ratio - 1) / (np.sqrt(2) - 1))
    if asymmetry < TRIANGLE_ASYMMETRY:
        shape = "triangle"
        c_shape = (TRIANGLE_ASYMMETRY - asymmetry) / 0.3
    elif squareness >= SQUARENESS:
        shape = "square"
        c_shape = min((squareness - SQUARENESS) / 0.35, (asymmetry - TRIANGLE_ASYMMETRY) / 0.25)
    else:
        shape = "circle"
        c_shape = min((SQUARENESS - squareness) / 0.35, (asymmetry - TRIANGLE_ASYMMETRY) / 0.25)

    median_rgb = np.median(rgb[fg["core"]], axis=0)
    colour, c_colour = _nearest_colour(median_rgb)

    span = max(bw / w, bh / h)
    size = "large" if span >= SIZE_BOUNDARY else "small"
    c_size = abs(span - SIZE_BOUNDARY) / 0.15

    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    third = min(int(cx * 3), 2)
    position = POSITIONS[third]
    c_position = min(abs(cx - b) for b in (1 / 3, 2 / 3)) / (1 / 6)

    conf = {
        "shape": float(np.clip(c_shape, 0, 1)),
        "colour": float(np.clip(c_colour * 2, 0, 1)),
        "size": float(np.clip(c_size, 0, 1)),
        "position": float(np.clip(c_position, 0, 1)),
    }
    return {
        "shape": shape,
        "colour": colour,
        "size": size,
        "position": position,
        "confidence": min(conf.values()),
        "details": {
            "confidence": conf,
            "fill": fill,
            "diagonal_ratio": float(diag_ratio),
            "squareness": float(squareness),
            "asymmetry": asymmetry,
            "span": span,
            "bbox": (int(x0), int(y0), bw, bh),
            "centroid": (float(cx), float(cy)),
            "median_rgb": tuple(float(v) for v in median_rgb),
            "foreground_fraction": area / (h * w),
        },
    }


# ----------------------------------------------------------------------------------- audio


def _band_peak(freqs: np.ndarray, mag: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    sel = (freqs >= lo) & (freqs <= hi)
    if not sel.any():
        return 0.0, 0.0
    i = int(np.argmax(mag[sel]))
    return float(freqs[sel][i]), float(mag[sel][i])


def analyze_audio(audio: Any, sr: int | None = None) -> dict[str, Any]:
    """{"pitch", "timbre", "confidence", "details"} of a waveform (array + sr, or a file path)."""
    keys = ATTRIBUTE_KEYS["audio"]
    x, sr = load_audio(audio, sr)
    if x.size < 0.05 * sr or not np.isfinite(x).all() or np.sqrt(np.mean(x**2)) < 1e-4:
        return _none_result(keys)
    x = x - x.mean()
    nfft = 1 << int(np.ceil(np.log2(max(x.size, sr)))) + 1  # ≤ 0.5 Hz bins
    mag = np.abs(np.fft.rfft(x * np.hanning(x.size), nfft))
    freqs = np.fft.rfftfreq(nfft, 1.0 / sr)
    nyquist = sr / 2
    f0, m1 = _band_peak(freqs, mag, 100.0, min(2000.0, nyquist))
    if m1 <= 0:
        return _none_result(keys)
    names = list(PITCHES)
    octaves = np.abs(np.log2(f0 / np.array([PITCHES[n] for n in names])))
    pitch = names[int(np.argmin(octaves))]
    c_pitch = 1.0 - float(octaves.min()) / 0.5

    harmonics = []
    for k in (3, 5):
        if k * f0 * 1.03 < nyquist:
            harmonics.append(_band_peak(freqs, mag, k * f0 * 0.97, k * f0 * 1.03)[1])
    ratio = sum(harmonics) / m1 if harmonics else 0.0
    timbre = "buzz" if ratio >= BUZZ_RATIO else "beep"
    c_timbre = abs(ratio - BUZZ_RATIO) / 0.1

    conf = {"pitch": float(np.clip(c_pitch, 0, 1)), "timbre": float(np.clip(c_timbre, 0, 1))}
    return {
        "pitch": pitch,
        "timbre": timbre,
        "confidence": min(conf.values()),
        "details": {
            "confidence": conf,
            "f0": f0,
            "harmonic_ratio": ratio,
            "seconds": x.size / sr,
            "peak": float(np.abs(x).max()),
        },
    }


# ----------------------------------------------------------------------------------- video


def _vote(values: list[str], middle: str) -> str:
    counts = Counter(v for v in values if v != NONE)
    if not counts:
        return NONE
    best = max(counts.values())
    winners = [v for v, c in counts.items() if c == best]
    return middle if middle in winners else winners[0]


def analyze_video(video: Any) -> dict[str, Any]:
    """{"shape", "colour", "direction", "confidence", "details"} of frames (T, H, W, 3) or a file."""
    keys = ATTRIBUTE_KEYS["video"]
    frames = load_video(video)
    t_count = len(frames)
    per_frame = [analyze_image(f) for f in frames]
    times, track = [], []
    for i, r in enumerate(per_frame):
        if r["shape"] != NONE:
            times.append(i)
            track.append(r["details"]["centroid"])
    if not per_frame or not times:
        return _none_result(keys, frames=t_count)
    mid = per_frame[t_count // 2]
    shape = _vote([r["shape"] for r in per_frame], mid["shape"])
    colour = _vote([r["colour"] for r in per_frame], mid["colour"])
    c_shape = sum(r["shape"] == shape for r in per_frame) / t_count
    c_colour = sum(r["colour"] == colour for r in per_frame) / t_count

    dx = dy = 0.0
    if len(times) >= 2:
        t = np.array(times, np.float64)
        xy = np.array(track, np.float64)
        span = float(t_count - 1)  # net displacement over the whole clip
        dx = float(np.polyfit(t, xy[:, 0], 1)[0]) * span
        dy = float(np.polyfit(t, xy[:, 1], 1)[0]) * span
    major, minor = (abs(dx), abs(dy)) if abs(dx) >= abs(dy) else (abs(dy), abs(dx))
    if major < MIN_MOTION:
        direction, c_direction = NONE, 0.0
    else:
        if abs(dx) >= abs(dy):
            direction = "right" if dx > 0 else "left"
        else:
            direction = "down" if dy > 0 else "up"
        c_direction = min((major - minor) / 0.3, major / 0.4)

    conf = {
        "shape": float(np.clip(c_shape, 0, 1)),
        "colour": float(np.clip(c_colour, 0, 1)),
        "direction": float(np.clip(c_direction, 0, 1)),
    }
    return {
        "shape": shape,
        "colour": colour,
        "direction": direction,
        "confidence": min(conf.values()),
        "details": {
            "confidence": conf,
            "displacement": (dx, dy),
            "frames": t_count,
            "track": track,
            "frames_with_shape": len(times),
        },
    }


def analyze(modality: str, media: Any, **kwargs) -> dict[str, Any]:
    """Dispatch: analyze_image / analyze_audio / analyze_video."""
    fn = {"image": analyze_image, "audio": analyze_audio, "video": analyze_video}.get(modality)
    if fn is None:
        raise ValueError(f"modality must be image, audio or video, got {modality!r}")
    return fn(media, **kwargs)


def attributes(modality: str, media: Any, **kwargs) -> dict[str, Any]:
    """analyze() without its "confidence" and "details": the attributes alone, as scores compare them."""
    return {k: v for k, v in analyze(modality, media, **kwargs).items() if k not in ("confidence", "details")}


# ----------------------------------------------------------------------------------- text

# word (lower case, hyphenated words split) → attribute value, per attribute
_SYNONYMS: dict[str, dict[str, str]] = {
    "colour": {
        **{c: c for c in COLOURS},
        "violet": "purple",
    },
    "shape": {
        "circle": "circle", "circles": "circle", "circular": "circle", "disc": "circle", "disk": "circle",
        "square": "square", "squares": "square",
        "triangle": "triangle", "triangles": "triangle", "triangular": "triangle",
    },
    "size": {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"},
    "position": {
        "left": "left", "center": "center", "centre": "center", "middle": "center",
        "centered": "center", "centred": "center", "right": "right",
    },
    "pitch": {"low": "low", "mid": "mid", "medium": "mid", "middle": "mid", "high": "high"},
    "timbre": {
        "beep": "beep", "beeps": "beep", "beeping": "beep", "sine": "beep",
        "buzz": "buzz", "buzzes": "buzz", "buzzing": "buzz", "buzzer": "buzz", "square": "buzz",
    },
    "direction": {
        "left": "left", "leftward": "left", "leftwards": "left",
        "right": "right", "rightward": "right", "rightwards": "right",
        "up": "up", "upward": "up", "upwards": "up",
        "down": "down", "downward": "down", "downwards": "down",
    },
}  # fmt: skip
_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str, modality: str | None = None, *, all_mentions: bool = False) -> dict[str, Any]:
    """Attribute words found in a caption or a model's reply, for one modality's keys.

    "I see a large green triangle on the left" (image) → {"shape": "triangle", "colour": "green",
    "size": "large", "position": "left"}. Accepts simple synonyms ("big", "middle", "high-pitched",
    "buzzing", "upwards", ...). Absent attributes are left out. With several words for one
    attribute, the first mention wins (all_mentions=True: lists of distinct values, in order).
    modality None parses every attribute (then "left"/"right" are both position and direction).
    """
    keys = ATTRIBUTE_KEYS[modality] if modality else tuple(_SYNONYMS)
    words = _WORD.findall(text.lower())
    found: dict[str, list[str]] = {}
    for key in keys:
        table = _SYNONYMS[key]
        values: list[str] = []
        for word in words:
            v = table.get(word)
            if v is not None and v not in values:
                values.append(v)
        if values:
            found[key] = values
    if all_mentions:
        return found
    return {k: v[0] for k, v in found.items()}


def canonical_value(key: str, value: Any) -> Any:
    """Map a synonym ("big", "centre", "upwards") to the vocabulary's word; other values unchanged."""
    if isinstance(value, str):
        return _SYNONYMS.get(key, {}).get(value.strip().lower(), value.strip().lower())
    return value


def score(modality: str, predicted: dict, truth: dict, keys=None) -> bool:
    """True when every key (default: all the modality's attributes) matches; "none"/missing fails."""
    keys = tuple(keys) if keys is not None else ATTRIBUTE_KEYS[modality]
    for k in keys:
        p, t = predicted.get(k), truth.get(k)
        if p is None or p == NONE or canonical_value(k, p) != canonical_value(k, t):
            return False
    return True
