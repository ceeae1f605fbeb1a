"""The synthetic "shapes world" (contract: shared/reference/shapes-world.md).

Coloured shapes on white (images), beeps and buzzes (audio), moving shapes (video), their
captions, pair-data files in the official NExT-GPT format, and an analyzer that reads the
attributes back from media and text for evaluation. numpy / PIL / soundfile / PyAV only.

`training.world.analyze` is the analyzer module (its dispatcher is `analyze.analyze(modality, media)`).
"""

from training.world.analyze import analyze_audio, analyze_image, analyze_video, parse_caption, score
from training.world.captions import canonical_caption, caption_audio, caption_image, caption_video
from training.world.dataset import read_pairs, write_all, write_pairs
from training.world.render import draw_image, draw_video, synth_audio
from training.world.spec import (
    ATTRIBUTE_KEYS,
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
    sample_audio_spec,
    sample_image_spec,
    sample_spec,
    sample_video_spec,
)

__all__ = [
    "ATTRIBUTE_KEYS",
    "COLOURS",
    "DIRECTIONS",
    "PITCHES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TIMBRES",
    "AudioSpec",
    "ImageSpec",
    "VideoSpec",
    "analyze_audio",
    "analyze_image",
    "analyze_video",
    "canonical_caption",
    "caption_audio",
    "caption_image",
    "caption_video",
    "draw_image",
    "draw_video",
    "parse_caption",
    "read_pairs",
    "sample_audio_spec",
    "sample_image_spec",
    "sample_spec",
    "sample_video_spec",
    "score",
    "synth_audio",
    "write_all",
    "write_pairs",
]
