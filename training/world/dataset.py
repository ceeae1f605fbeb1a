"""Shapes-world X-caption pair data in the official NExT-GPT pair-data layout.

    out_dir/images/000000.png   out_dir/image_pairs.json  [{"caption", "image_name", "attributes"}, ...]
    out_dir/audios/000000.wav   out_dir/audio_pairs.json  [{"caption", "audio_name", "attributes"}, ...]
    out_dir/videos/000000.mp4   out_dir/video_pairs.json  [{"caption", "video_name", "attributes"}, ...]

"caption" + "<modality>_name" is the official format (names relative to the media folder);
"attributes" is an extra key holding the sample's spec (the ground truth for evaluation).
Everything is a function of (modality, n, seed, side): the same arguments give byte-identical
files (PNG by PIL without metadata, WAV PCM16 by soundfile, MP4 H.264 by PyAV/libx264 with one
thread and the bitexact flags, so no encoder/muxer version strings and no timestamps).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.world.captions import caption
from training.world.render import draw_image, draw_video, synth_audio
from training.world.spec import MODALITIES, SAMPLE_RATE, VIDEO_FPS, Spec, sample_spec

FOLDERS = {"image": "images", "audio": "audios", "video": "videos"}
EXTENSIONS = {"image": "png", "audio": "wav", "video": "mp4"}
NAME_KEYS = {"image": "image_name", "audio": "audio_name", "video": "video_name"}
_STREAM = {"image": 0, "audio": 1, "video": 2}  # separate random streams per modality


def pairs_json_path(out_dir: str | Path, modality: str) -> Path:
    return Path(out_dir) / f"{modality}_pairs.json"


def sample_pairs(modality: str, n: int, seed: int) -> list[tuple[Spec, str]]:
    """The n (spec, caption) pairs that `write_pairs` would write; deterministic in (modality, seed)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM[modality]]))
    out = []
    for _ in range(int(n)):
        spec = sample_spec(modality, rng)
        out.append((spec, caption(spec, rng)))
    return out


def write_png(image, path: str | Path) -> None:
    image.save(path, format="PNG")


def write_wav(wave: np.ndarray, path: str | Path, sr: int = SAMPLE_RATE) -> None:
    import soundfile as sf

    sf.write(str(path), np.asarray(wave, np.float32), sr, subtype="PCM_16", format="WAV")


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = VIDEO_FPS) -> None:
    """uint8 (T, H, W, 3) → H.264 (yuv420p, CRF 18) MP4, byte-reproducible."""
    import av

    frames = np.asarray(frames, np.uint8)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:  # yuv420p needs even sides: replicate the last row/column
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path), "w", format="mp4", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(
            "libx264", rate=int(fps), options={"crf": "18", "preset": "medium", "flags": "+bitexact", "threads": "1"}
        )
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_media(spec: Spec, path: str | Path, side: int = 64) -> None:
    """Render a spec into a file of its modality's format."""
    modality = spec.modality
    if modality == "image":
        write_png(draw_image(spec, side), path)
    elif modality == "audio":
        write_wav(synth_audio(spec), path)
    else:
        write_mp4(draw_video(spec, side), path)


def write_pairs(
    out_dir: str | Path,
    modality: str,
    n: int,
    seed: int,
    side: int = 64,
    *,
    progress: Callable[[int], Any] | None = None,
) -> Path:
    """Write n media files + the pair JSON for one modality; returns the JSON's path.

    `progress(1)` is called after each file (for a progress bar)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    out_dir = Path(out_dir)
    folder = out_dir / FOLDERS[modality]
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (spec, text) in enumerate(sample_pairs(modality, n, seed)):
        name = f"{i:06d}.{EXTENSIONS[modality]}"
        write_media(spec, folder / name, side)
        records.append({"caption": text, NAME_KEYS[modality]: name, "attributes": spec.attributes()})
        if progress is not None:
            progress(1)
    path = pairs_json_path(out_dir, modality)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_all(
    out_dir: str | Path, n: int, seed: int, side: int = 64, *, progress: Callable[[int], Any] | None = None
) -> dict[str, Path]:
    """`write_pairs` for image, audio and video (n each); modality → JSON path."""
    return {m: write_pairs(out_dir, m, n, seed, side, progress=progress) for m in MODALITIES}


def read_pairs(json_path: str | Path) -> list[dict[str, Any]]:
    """Load a pair JSON; each record gains "path" (absolute media path) and "modality"."""
    json_path = Path(json_path)
    records = json.loads(json_path.read_text(encoding="utf-8"))
    for r in records:
        for modality, key in NAME_KEYS.items():
            if key in r:
                r["modality"] = modality
                r["path"] = str(json_path.parent / FOLDERS[modality] / r[key])
    return records
