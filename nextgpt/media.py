"""User attachments: detect, validate and load images, audio and video, and preprocess them for ImageBind.

Every problem with a file is an `AttachmentError` whose message is one line, `"{path}: {problem}"`.

The preprocessing reproduces Meta's ImageBind `data.py` (which needs torchvision, torchaudio and
pytorchvideo, none of which can be installed beside our torch) with PIL, soundfile, PyAV, numpy
and torch only:

- image: shorter side resized to 224 (bicubic, antialiased as PIL does), centre crop 224,
  [0, 1], CLIP mean/std.
- video: `n_clips` evenly spaced 2 s clips (pytorchvideo's ConstantClipsPerVideoSampler), 2 frames
  per clip (UniformTemporalSubsample: the clip's first and last frame), shorter side scaled to 224
  (bilinear, no antialias, as pytorchvideo's ShortSideScale), CLIP mean/std, then 1 centre crop
  or ImageBind's 3 spatial crops (`spatial_crops=3`).
- audio: resampled to 16 kHz, `n_clips` evenly spaced 2 s clips, Kaldi-compatible log-mel fbank
  (128 bins), padded/cropped to 204 frames, normalised with mean -4.268 and std 9.138.

Deliberate differences from ImageBind's loaders, all in loading rather than in the transforms:
images are turned upright by their EXIF orientation and transparent pixels are composited onto
white (ImageBind's `convert("RGB")` keeps whatever colour hides under the alpha); multi-channel
audio is averaged to mono (torchaudio's Kaldi fbank takes channel 0); very long videos are thinned
in time while decoding (see `load_video`) so that memory stays bounded.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import torch

Modality = Literal["image", "audio", "video"]
MODALITY_NAMES = ("image", "audio", "video")

MAX_BYTES = 50 * 2**20
MAX_PIXELS = 40_000_000
# The per-attachment resource budget: checked from the header before decoding, and again while
# decoding (a header can lie). Each error names its limit.
MAX_AUDIO_SECONDS = 600.0  # audio duration (a FLAC of 93 min of silence is 850 KB)
MAX_AUDIO_SAMPLES = 2**25  # decoded mono samples (128 MiB of float32; ~11.6 min at 48 kHz)
MAX_VIDEO_SECONDS = 600.0  # video duration
MAX_VIDEO_DECODED_PIXELS = 10**10  # decoded frames × width × height (1080p: ~80 s at 60 fps)
MAX_VIDEO_FRAMES = 200_000  # decoded frames (over an hour at 30 fps) before giving up
VIDEO_MEMORY_BUDGET = 1 << 30  # bytes of kept RGB frames in `load_video`

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUDIO_SAMPLE_RATE = 16_000
AUDIO_MEL_BINS = 128
AUDIO_TARGET_FRAMES = 204
AUDIO_MEAN = -4.268
AUDIO_STD = 9.138

_PathLike = str | os.PathLike


class AttachmentError(ValueError):
    """A file that cannot be used as an attachment; `str(err)` is `"{path}: {problem}"` on one line."""

    def __init__(self, path: _PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem))


# --------------------------------------------------------------------------------------------
# File checks and type detection


def _fmt_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _check_file(path: _PathLike, max_bytes: int | None = None) -> int:
    """Exists, is a regular file, is not empty, is not over `max_bytes`, can be read: returns its size."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise AttachmentError(path, "no such file") from None
    except PermissionError:
        raise AttachmentError(path, "permission denied") from None
    except OSError as e:
        raise AttachmentError(path, f"cannot access file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise AttachmentError(path, "is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise AttachmentError(path, "not a regular file")
    if st.st_size == 0:
        raise AttachmentError(path, "file is empty")
    if max_bytes is not None and st.st_size > max_bytes:
        raise AttachmentError(path, f"file too large ({_fmt_bytes(st.st_size)}, limit {_fmt_bytes(max_bytes)})")
    return st.st_size


def _read_head(path: _PathLike, n: int = 64) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except PermissionError:
        raise AttachmentError(path, "permission denied") from None
    except OSError as e:
        raise AttachmentError(path, f"cannot read file ({e.strerror or e})") from None


_IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


def _sniff(h: bytes) -> tuple[str | None, str]:
    """(modality, container kind) from a file's first bytes; (None, "") when unrecognised."""
    if h.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "png"
    if h.startswith(b"\xff\xd8\xff"):
        return "image", "jpeg"
    if h[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "gif"
    if h[:2] == b"BM" and len(h) >= 18 and int.from_bytes(h[14:18], "little") in _BMP_HEADER_SIZES:
        return "image", "bmp"
    if h[:4] == b"RIFF" and len(h) >= 12:
        return {b"WEBP": ("image", "webp"), b"WAVE": ("audio", "wav"), b"AVI ": ("video", "avi")}.get(h[8:12], (None, ""))
    if h[:4] in (b"RF64", b"BW64") and h[8:12] == b"WAVE":
        return "audio", "wav"
    if h[:4] == b"FORM" and h[8:12] in (b"AIFF", b"AIFC"):
        return "audio", "aiff"
    if h[:4] == b"fLaC":
        return "audio", "flac"
    if h[:4] == b"OggS":
        return ("video", "ogg") if b"\x80theora" in h else ("audio", "ogg")
    if h[:3] == b"ID3":
        return "audio", "mp3"
    if len(h) >= 2 and h[0] == 0xFF and h[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
        layer, version = (h[1] >> 1) & 3, (h[1] >> 3) & 3
        if layer and version != 1:
            return "audio", "mp3"
        if not layer and h[1] & 0xF6 == 0xF0:
            return "audio", "aac"  # ADTS
    if h[4:8] == b"ftyp":
        brand = h[8:12]
        if brand in _IMAGE_BRANDS:
            return "image", "heif"
        return ("audio", "mp4") if brand in _AUDIO_BRANDS else ("video", "mp4")
    if h[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"):
        return "video", "mov"
    if h[:4] == b"\x1a\x45\xdf\xa3":
        return "video", "mkv"  # Matroska / WebM
    return None, ""


def _is_picture_stream(stream) -> bool:
    """Cover art in an audio file shows up as a one-frame video stream marked 'attached picture'."""
    try:
        import av

        return bool(stream.disposition & av.stream.Disposition.attached_pic)
    except Exception:
        return False


def _av_streams(path: _PathLike) -> tuple[bool, bool] | None:
    """(has video, has audio) according to FFmpeg, or None when it cannot open the file."""
    try:
        import av

        with av.open(os.fspath(path)) as c:
            video = any(not _is_picture_stream(s) for s in c.streams.video)
            return video, bool(c.streams.audio)
    except Exception:
        return None


def detect_modality(path: _PathLike) -> Modality:
    """'image', 'audio' or 'video' from the file's content (magic bytes), never its extension.

    A video container (MP4/MOV, Matroska/WebM, AVI, Ogg) that holds audio but no video stream is
    audio. Raises AttachmentError for a missing, empty or unreadable file, or an unknown type.
    """
    _check_file(path)
    modality, kind = _sniff(_read_head(path))
    if modality is None:
        raise AttachmentError(path, "unsupported file type (expected an image, audio or video file)")
    if kind in ("mp4", "mov", "mkv", "avi", "ogg"):
        streams = _av_streams(path)
        if streams is not None:
            has_video, has_audio = streams
            if has_video:
                return "video"
            if has_audio:
                return "audio"
    return modality  # type: ignore[return-value]


def validate_attachment(path: _PathLike, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> Modality:
    """Check that `path` is a usable image, audio or video file and return its modality.

    Checks, in order: the file exists, is a regular file, is not empty, is at most `max_bytes`,
    is a recognised type (by content), is not a decompression bomb (an image's or video's
    width × height from its header, before any decoding, against `max_pixels`), and actually
    decodes (the whole image; the whole audio stream; the first video frame).
    """
    _check_file(path, max_bytes)
    modality = detect_modality(path)
    if modality == "image":
        img = _open_image(path, max_pixels)
        try:
            _load_pixels(path, img)
        finally:
            img.close()
    elif modality == "audio":
        load_audio(path)
    else:
        with _open_video(path, max_pixels) as (container, stream):
            if _first_frame(path, container, stream) is None:
                raise AttachmentError(path, "corrupt or unreadable video file (no frames)")
    return modality


def _require(path: _PathLike, wanted: str) -> str:
    found = detect_modality(path)
    if found != wanted and not (wanted == "audio" and found == "video"):  # a video's sound track is audio
        article = "an" if found[0] in "aeiou" else "a"
        raise AttachmentError(path, f"is {article} {found} file, not {'an' if wanted[0] in 'aeiou' else 'a'} {wanted} file")
    return found


# --------------------------------------------------------------------------------------------
# Images


def _pil_formats() -> list[str]:
    from PIL import Image

    Image.init()
    return [f for f in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "AVIF", "HEIF") if f in Image.OPEN]


def _open_image(path: _PathLike, max_pixels: int):
    """Open (header only, no decoding) and check the claimed dimensions against `max_pixels`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(os.fspath(path), formats=_pil_formats())
    except Image.DecompressionBombError:  # beyond Pillow's own limit (2 × Image.MAX_IMAGE_PIXELS)
        size = _claimed_size(path)
        what = f"{size[0]}x{size[1]} pixels" if size else f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"
        raise AttachmentError(path, f"image too large ({what}, limit {max_pixels}) — possible decompression bomb") from None
    except UnidentifiedImageError:
        raise AttachmentError(path, "corrupt or unreadable image file (not a decodable PNG, JPEG, GIF, WebP or BMP image)") from None
    except Exception as e:
        raise AttachmentError(path, f"corrupt or unreadable image file ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise AttachmentError(path, f"image too large ({w}x{h} pixels, limit {max_pixels}) — possible decompression bomb")
    if w <= 0 or h <= 0:
        img.close()
        raise AttachmentError(path, f"corrupt or unreadable image file ({w}x{h} pixels)")
    return img


def _claimed_size(path: _PathLike) -> tuple[int, int] | None:
    """Width and height from the header through Pillow's format plugin, skipping the bomb check
    that `Image.open` makes (used only to word the error message for a refused file)."""
    from PIL import Image

    try:
        with open(path, "rb") as fp:
            prefix = fp.read(16)
            for fmt in _pil_formats():
                factory, accept = Image.OPEN[fmt]
                if accept is None or accept(prefix):
                    fp.seek(0)
                    return tuple(factory(fp, os.fspath(path)).size)
    except Exception:
        pass
    return None


def _load_pixels(path: _PathLike, img) -> None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as e:
        raise AttachmentError(path, f"image too large ({e}) — possible decompression bomb") from None
    except Exception as e:
        raise AttachmentError(path, f"corrupt or unreadable image file ({e or type(e).__name__})") from None


def _to_rgb(img):
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit greyscale: scale, don't clip
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: _PathLike, max_pixels: int = MAX_PIXELS):
    """The image as an RGB PIL image (first frame of an animation), upright per its EXIF orientation."""
    from PIL import ImageOps

    _check_file(path)
    _require(path, "image")
    img = _open_image(path, max_pixels)
    _load_pixels(path, img)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # a broken EXIF block is no reason to refuse the pixels
    return _to_rgb(img)


def image_tensor(img) -> torch.Tensor:
    """ImageBind's vision transform: (3, 224, 224) float32.

    Resize the shorter side to 224 (bicubic; the longer side to int(224 * long / short), as
    torchvision's Resize), centre crop 224 (torchvision's rounding), scale to [0, 1], normalise
    with CLIP's mean and std. For an absurdly elongated image (resized size over 4 Mpixels) only
    the cropped window is resampled (PIL's `box=`), so that no huge intermediate is made.
    """
    from PIL import Image

    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    s = IMAGE_SIZE
    if w <= h:
        new_w, new_h = s, int(s * h / w)
    else:
        new_w, new_h = int(s * w / h), s
    top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
    if (new_w, new_h) == (w, h):
        crop = img.crop((left, top, left + s, top + s))
    elif new_w * new_h <= 4_000_000:
        crop = img.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, left + s, top + s))
    else:  # absurd aspect ratio: resample only the window (close, not bit-identical: PIL's pass order)
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
        crop = img.resize((s, s), Image.Resampling.BICUBIC, box=box)
    x = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    return _normalise(x)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """CLIP mean/std over the channel dimension (dim 0) of a (3, ...) tensor."""
    shape = (3,) + (1,) * (x.ndim - 1)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(shape)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(shape)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------
# Audio


def load_audio(path: _PathLike, max_samples: int = MAX_AUDIO_SAMPLES) -> tuple[np.ndarray, int]:
    """(float32 mono waveform in [-1, 1], sample rate): channels averaged.

    libsndfile (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF) first, FFmpeg (PyAV) for anything else it
    cannot read, such as AAC/M4A or a video's sound track.
    """
    _check_file(path)
    kind = _require(path, "audio")
    wave = sr = None
    first_error: Exception | None = None
    if kind == "audio":
        try:
            wave, sr = _decode_soundfile(path, max_samples)
        except AttachmentError:
            raise
        except Exception as e:
            first_error = e
    if wave is None:
        try:
            wave, sr = _decode_av_audio(path, max_samples)
        except AttachmentError:
            raise
        except Exception as e:
            reason = first_error or e
            raise AttachmentError(path, f"corrupt or unreadable audio file ({str(reason) or type(reason).__name__})") from None
    if wave.size == 0 or not sr:
        raise AttachmentError(path, "corrupt or unreadable audio file (no audio samples)")
    if not np.isfinite(wave).all():
        raise AttachmentError(path, "corrupt or unreadable audio file (non-finite samples)")
    return wave, int(sr)


def _audio_too_long(path: _PathLike, seconds: float | None = None, samples: int | None = None,
                    max_samples: int = MAX_AUDIO_SAMPLES) -> AttachmentError:
    if seconds is not None:
        limit = f"{seconds:.0f} s, limit max_audio_seconds = {MAX_AUDIO_SECONDS:.0f} s"
    else:
        limit = f"{samples} samples, limit max_audio_samples = {max_samples}"
    return AttachmentError(path, f"audio too long ({limit}) — possible decompression bomb")


def _check_audio_size(path: _PathLike, frames: float, sr: float, max_samples: int) -> None:
    if sr > 0 and frames / sr > MAX_AUDIO_SECONDS:
        raise _audio_too_long(path, seconds=frames / sr)
    if frames > max_samples:
        raise _audio_too_long(path, samples=int(frames), max_samples=max_samples)


def _decode_soundfile(path: _PathLike, max_samples: int) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(os.fspath(path)) as f:
        sr = f.samplerate
        _check_audio_size(path, f.frames, sr, max_samples)  # from the header, before decoding
        blocks, total = [], 0
        while True:  # in blocks, channels averaged as read: never all channels of the file at once
            data = f.read(1 << 18, dtype="float32", always_2d=True)
            if not len(data):
                break
            blocks.append(data[:, 0].copy() if data.shape[1] == 1 else data.mean(axis=1))
            total += len(data)
            _check_audio_size(path, total, sr, max_samples)  # a header may understate the length
    wave = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return np.ascontiguousarray(wave, dtype=np.float32), sr


def _decode_av_audio(path: _PathLike, max_samples: int) -> tuple[np.ndarray, int]:
    import av

    chunks, total, sr = [], 0, 0
    with av.open(os.fspath(path)) as c:
        if not c.streams.audio:
            raise AttachmentError(path, "no audio stream")
        stream = c.streams.audio[0]
        seconds = _av_seconds(c, stream)
        if seconds is not None and seconds > MAX_AUDIO_SECONDS:  # from the header, before decoding
            raise _audio_too_long(path, seconds=seconds)
        resampler = av.AudioResampler(format="fltp")  # planar float, same layout and rate

        def take(frames):
            nonlocal total, sr
            for f in frames:
                a = f.to_ndarray()  # (channels, samples)
                chunks.append(a.mean(axis=0) if a.shape[0] > 1 else a[0])
                total += a.shape[1]
                sr = f.sample_rate
                _check_audio_size(path, total, sr, max_samples)

        for frame in c.decode(stream):
            take(resampler.resample(frame))
        take(resampler.resample(None))
    wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return wave, sr


def _av_seconds(container, stream) -> float | None:
    """A stream's duration in seconds from the container's header (None when it does not say)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def resample(wave: np.ndarray | torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling of a 1-D waveform: float32 tensor of length ceil(len * new / orig).

    A windowed-sinc polyphase filter (Hann window, 6 zero crossings, cut-off at 0.99 × the lower
    Nyquist frequency): the algorithm and defaults of `torchaudio.functional.resample`, which
    ImageBind uses. When the reduced rate ratio is so odd that the polyphase kernel would be huge
    (e.g. 44101 → 16000 Hz) it falls back to FFT resampling (zero-padding or truncating the
    spectrum), which is also band-limited.
    """
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32) if not isinstance(wave, torch.Tensor) else wave)
    x = x.to(torch.float32).reshape(-1)
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr == new_sr or x.numel() == 0:
        return x.clone()
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    n_out = math.ceil(new * x.numel() / orig)
    zeros = 6  # lowpass_filter_width
    base = min(orig, new) * 0.99  # rolloff
    width = math.ceil(zeros * orig / base)
    if new * (2 * width + orig) > 1 << 22:  # FFT fallback for odd ratios
        spec = torch.fft.rfft(x.double())
        out = torch.zeros(n_out // 2 + 1, dtype=spec.dtype)
        keep = min(spec.numel(), out.numel())
        out[:keep] = spec[:keep]
        return (torch.fft.irfft(out, n=n_out) * (n_out / x.numel())).float()
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx) * base
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    padded = torch.nn.functional.pad(x[None, None], (width, width + orig))
    out = torch.nn.functional.conv1d(padded, kernel.float(), stride=orig)  # (1, new, blocks)
    return out[0].transpose(0, 1).reshape(-1)[:n_out].contiguous()


def kaldi_fbank(
    wave: torch.Tensor,
    sample_rate: int = AUDIO_SAMPLE_RATE,
    num_mel_bins: int = AUDIO_MEL_BINS,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    window_type: Literal["hanning", "povey"] = "hanning",
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> torch.Tensor:
    """Log-mel filter bank energies (frames, num_mel_bins), as `torchaudio.compliance.kaldi.fbank`.

    Defaults are ImageBind's call (htk_compat=True, use_energy=False, window_type="hanning",
    dither=0.0, 25 ms frames every 10 ms): with use_energy=False, htk_compat changes nothing, and
    there is no dithering. Steps, as Kaldi: frames of 25 ms that fit entirely in the signal
    (snip_edges), per-frame DC offset removed, pre-emphasis 0.97 (the first sample is its own
    predecessor), window (Hann, or Povey = Hann^0.85; both the symmetric kind), zero-padded to a
    power of two (512 at 16 kHz), power spectrum, triangular mel filters (mel = 1127 ln(1 + f/700),
    from `low_freq` to `high_freq`, where high_freq <= 0 means Nyquist + high_freq), natural log
    floored at float32 epsilon. A signal shorter than one frame gives (0, num_mel_bins).
    """
    wave = wave.reshape(-1).to(torch.float32)
    win = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    n_fft = 1 << (win - 1).bit_length()
    if wave.numel() < win:
        return torch.zeros(0, num_mel_bins)
    frames = wave.unfold(0, win, shift)  # (m, win), m = 1 + (n - win) // shift
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - preemphasis * previous
    window = torch.hann_window(win, periodic=False, dtype=torch.float32)
    if window_type == "povey":
        window = window.pow(0.85)
    elif window_type != "hanning":
        raise ValueError(f"window_type must be 'hanning' or 'povey', got {window_type!r}")
    power = torch.fft.rfft(frames * window, n=n_fft).abs().pow(2.0)  # (m, n_fft/2 + 1)

    # Kaldi's mel banks over the first n_fft/2 FFT bins (the Nyquist bin gets weight 0)
    def mel(f):
        return 1127.0 * torch.log(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)

    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    mel_low, mel_high = mel(low_freq), mel(high)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    b = torch.arange(num_mel_bins, dtype=torch.float64)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    fft_mel = mel(sample_rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float64))[None, :]
    up, down = (fft_mel - left) / (center - left), (right - fft_mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    banks = torch.nn.functional.pad(banks, (0, 1)).to(torch.float32)  # (bins, n_fft/2 + 1)

    energies = power @ banks.T
    return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log()


def clip_windows(duration: float, n_clips: int, clip_seconds: float = 2.0) -> list[tuple[Fraction, Fraction]]:
    """pytorchvideo's ConstantClipsPerVideoSampler: `n_clips` (start, end) windows of `clip_seconds`,
    starts evenly spaced from 0 to max(duration - clip_seconds, 0); they overlap, or all start at 0,
    when the media is short, and a window may run past the end (the clip is then shorter)."""
    if n_clips < 1:
        raise ValueError(f"n_clips must be >= 1, got {n_clips}")
    clip = Fraction(clip_seconds)
    max_start = Fraction(max(duration - float(clip_seconds), 0.0))
    step = max_start / max(n_clips - 1, 1)
    return [(step * i, step * i + clip) for i in range(n_clips)]


def audio_clips(
    wave: np.ndarray | torch.Tensor,
    sr: int,
    n_clips: int,
    clip_seconds: float = 2.0,
    num_mel_bins: int = AUDIO_MEL_BINS,
    target_frames: int = AUDIO_TARGET_FRAMES,
) -> torch.Tensor:
    """ImageBind's audio transform: (n_clips, 1, 128, 204) float32.

    Mono waveform → 16 kHz (`resample`) → `n_clips` evenly spaced windows (`clip_windows`) → per
    clip: mean removed, `kaldi_fbank`, transposed to (mel, frames), zero-padded or cropped to 204
    frames (as ImageBind, the padding is 0 in the log domain), normalised (x + 4.268) / 9.138.
    Audio shorter than one 25 ms frame is zero-padded to one frame instead of failing.
    """
    x = resample(wave, sr, AUDIO_SAMPLE_RATE)
    win = int(AUDIO_SAMPLE_RATE * 0.025)
    out = []
    for start, end in clip_windows(x.numel() / AUDIO_SAMPLE_RATE, n_clips, clip_seconds):
        seg = x[int(start * AUDIO_SAMPLE_RATE) : int(end * AUDIO_SAMPLE_RATE)]
        if seg.numel() < win:
            seg = torch.nn.functional.pad(seg, (0, win - seg.numel()))
        fb = kaldi_fbank(seg - seg.mean(), AUDIO_SAMPLE_RATE, num_mel_bins).T  # (mel, frames)
        if fb.shape[1] < target_frames:
            fb = torch.nn.functional.pad(fb, (0, target_frames - fb.shape[1]))
        out.append(fb[None, :, :target_frames])
    return (torch.stack(out) - AUDIO_MEAN) / AUDIO_STD


# --------------------------------------------------------------------------------------------
# Video


class _open_video:
    """Context manager: (container, video stream), after checking the frame size against max_pixels."""

    def __init__(self, path: _PathLike, max_pixels: int = MAX_PIXELS):
        self.path, self.max_pixels, self.container = path, max_pixels, None

    def __enter__(self):
        import av

        try:
            self.container = av.open(os.fspath(self.path))
        except Exception as e:
            raise AttachmentError(self.path, f"corrupt or unreadable video file ({e})") from None
        try:
            streams = [s for s in self.container.streams.video if not _is_picture_stream(s)]
            if not streams:
                raise AttachmentError(self.path, "no video stream")
            stream = streams[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > self.max_pixels:
                raise AttachmentError(
                    self.path, f"video frames too large ({w}x{h} pixels, limit {self.max_pixels}) — possible decompression bomb"
                )
            seconds = _av_seconds(self.container, stream)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = stream.frames or (seconds * float(rate) if seconds and rate else 0)
            if seconds is not None and seconds > MAX_VIDEO_SECONDS:
                raise AttachmentError(
                    self.path, f"video too long ({seconds:.0f} s, limit max_video_seconds = {MAX_VIDEO_SECONDS:.0f} s)"
                )
            if frames * w * h > MAX_VIDEO_DECODED_PIXELS:
                raise AttachmentError(self.path, _too_many_pixels(frames, w, h))
            stream.thread_type = "AUTO"
        except BaseException:
            self.container.close()
            raise
        return self.container, stream

    def __exit__(self, *exc):
        self.container.close()
        return False


def _too_many_pixels(frames: float, w: int, h: int) -> str:
    return (f"video too large to decode ({frames:.0f} frames of {w}x{h} pixels, limit max_video_pixels = "
            f"{MAX_VIDEO_DECODED_PIXELS:.0e} decoded pixels) — possible decompression bomb")


def _first_frame(path, container, stream):
    try:
        for frame in container.decode(stream):
            return frame.to_ndarray(format="rgb24")
    except Exception as e:
        raise AttachmentError(path, f"corrupt or unreadable video file ({e})") from None
    return None


def load_video(path: _PathLike, max_frames: int = 128, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, float]:
    """(uint8 RGB frames (T, H, W, 3), frames per second).

    At most `max_frames` frames are kept (fewer for big frames, to stay within ~1 GiB): when a
    video has more, every k-th frame is kept (k doubles as needed) and the returned fps is divided
    by k, so that frame i is still at time i / fps. A decoding error after the first frames ends
    the video there (a truncated file still gives its frames).
    """
    _check_file(path)
    _require(path, "video")
    with _open_video(path, max_pixels) as (container, stream):
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        kept: list[np.ndarray] = []
        step, cap, size = 1, max(2, max_frames), None
        first_time = last_time = None
        i = -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i >= MAX_VIDEO_FRAMES:
                    raise AttachmentError(path, f"video too long (more than {MAX_VIDEO_FRAMES} frames)")
                if (i + 1) * frame.width * frame.height > MAX_VIDEO_DECODED_PIXELS:  # a header may lie
                    raise AttachmentError(path, _too_many_pixels(i + 1, frame.width, frame.height))
                if frame.time is not None:
                    first_time = frame.time if first_time is None else first_time
                    last_time = frame.time
                if i % step:
                    continue
                if size is None:
                    size = (frame.width, frame.height)
                    cap = max(2, min(cap, VIDEO_MEMORY_BUDGET // (frame.width * frame.height * 3)))
                kept.append(frame.to_ndarray(format="rgb24", width=size[0], height=size[1]))
                if len(kept) > cap:
                    kept, step = kept[::2], step * 2
        except AttachmentError:
            raise
        except Exception as e:
            if not kept:
                raise AttachmentError(path, f"corrupt or unreadable video file ({e})") from None
    if not kept:
        raise AttachmentError(path, "corrupt or unreadable video file (no frames)")
    if fps <= 0:
        n = i + 1
        span = (last_time - first_time) if first_time is not None and last_time is not None else 0
        fps = (n - 1) / span if n > 1 and span > 0 else 25.0
    return np.stack(kept), fps / step


def _bilinear_coords(start: int, size: int, in_size: int, out_size: int):
    """Source indices and weights of output pixels start..start+size-1 when resizing in_size → out_size
    with torch's bilinear interpolation (align_corners=False, no antialias)."""
    dst = torch.arange(start, start + size, dtype=torch.float64)
    src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0.numpy(), i1.numpy(), (src - i0).clamp(0, 1).float()


def _scale_and_crop(frames: np.ndarray, spatial_idx: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """pytorchvideo ShortSideScale(size) (bilinear) then ImageBind's uniform_crop(size, spatial_idx)
    of uint8 frames (F, H, W, 3) → float (3, F, size, size) in [0, 1]. Only the cropped window is
    interpolated (gathering its source pixels), which is exact and needs no full-size intermediate."""
    _, h, w, _ = frames.shape
    if w < h:
        new_h, new_w = int(math.floor(h / w * size)), size
    else:
        new_h, new_w = size, int(math.floor(w / h * size))
    y_off, x_off = int(math.ceil((new_h - size) / 2)), int(math.ceil((new_w - size) / 2))
    if new_h > new_w:
        y_off = {0: 0, 1: y_off, 2: new_h - size}[spatial_idx]
    else:
        x_off = {0: 0, 1: x_off, 2: new_w - size}[spatial_idx]
    y0, y1, ly = _bilinear_coords(y_off, size, h, new_h)
    x0, x1, lx = _bilinear_coords(x_off, size, w, new_w)
    rows, cols = torch.from_numpy(np.concatenate([y0, y1])), torch.from_numpy(np.concatenate([x0, x1]))
    g = torch.from_numpy(frames)  # gather the needed source pixels, the smaller intermediate first
    if h < w:
        g = g.index_select(2, cols).index_select(1, rows)
    else:
        g = g.index_select(1, rows).index_select(2, cols)
    g = g.float()  # (F, 2s, 2s, 3)
    tl, tr, bl, br = g[:, :size, :size], g[:, :size, size:], g[:, size:, :size], g[:, size:, size:]
    ly, lx = ly.view(1, -1, 1, 1), lx.view(1, 1, -1, 1)
    out = (1 - ly) * ((1 - lx) * tl + lx * tr) + ly * ((1 - lx) * bl + lx * br)
    return out.permute(3, 0, 1, 2).div_(255.0)


def video_clips(
    frames: np.ndarray,
    fps: float,
    n_clips: int,
    clip_seconds: float = 2.0,
    frames_per_clip: int = 2,
    spatial_crops: Literal[1, 3] = 1,
) -> torch.Tensor:
    """ImageBind's video transform: (n_clips × spatial_crops, 3, frames_per_clip, 224, 224) float32.

    `n_clips` evenly spaced windows of `clip_seconds` (`clip_windows`); a window holds frames
    ceil(fps·start) .. ceil(fps·end) - 1 (pytorchvideo's decord reader), of which
    `frames_per_clip` evenly spaced ones are taken (UniformTemporalSubsample: for 2, the first and
    the last); short videos give overlapping clips and repeated frames, a 1-frame video works.
    Each frame: shorter side scaled to 224 (bilinear), CLIP mean/std, then cropped to 224 × 224.
    ImageBind takes 3 spatial crops per clip (left/centre/right, or top/centre/bottom) and
    averages all their embeddings; `spatial_crops=1` (the default) takes only the centre crop,
    a third of the work for nearly the same embedding. With 3, the crops of a clip are adjacent
    in the output (clip-major), as in ImageBind.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) array, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        frames = np.clip(frames, 0, 255).astype(np.uint8)
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if spatial_crops not in (1, 3):
        raise ValueError(f"spatial_crops must be 1 or 3, got {spatial_crops}")
    n = len(frames)
    crops = (1,) if spatial_crops == 1 else (0, 1, 2)
    out = []
    for start, end in clip_windows(n / fps, n_clips, clip_seconds):
        a = math.ceil(fps * start)
        b = min(math.ceil(fps * end), n)
        if b <= a:  # nothing in the window (rounding at the very end): its nearest frame
            a, b = min(a, n - 1), min(a, n - 1) + 1
        idx = (torch.linspace(0, b - a - 1, frames_per_clip).clamp(0, b - a - 1).long() + a).numpy()
        clip = frames[idx]
        for c in crops:
            out.append(_normalise(_scale_and_crop(clip, c)))
    return torch.stack(out)
