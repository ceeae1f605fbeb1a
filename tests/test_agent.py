"""The agent end to end on the tiny profile: text in, media files out through the decoder tools."""

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from nextgpt.model import MediaInput, Message

pytestmark = pytest.mark.slow


def _by_modality(reply, modality):
    return [m for m in reply.media if m.modality == modality]


def test_text_to_image_video_audio_in_one_reply(tiny_assistant, settings):
    progress = []
    reply = tiny_assistant.respond(
        [Message("user", "show me everything")], want=["image", "video", "audio"], seed=0,
        on_progress=lambda m, step, total: progress.append((m, step, total)),
    )
    assert not reply.failures, reply.failures
    decoders = settings.profile("tiny").decoders
    image = _by_modality(reply, "image")[0]
    with Image.open(image.path) as im:
        assert im.size == (decoders["image"].width, decoders["image"].height)
    video = _by_modality(reply, "video")[0]
    with av.open(str(video.path)) as c:
        frames = [f for f in c.decode(video=0)]
    assert len(frames) == decoders["video"].frames
    assert (frames[0].width, frames[0].height) == (decoders["video"].width, decoders["video"].height)
    assert video.preview_path.is_file()
    audio = _by_modality(reply, "audio")[0]
    data, sr = sf.read(audio.path)
    assert abs(len(data) / sr - decoders["audio"].seconds) < 0.05
    assert {m for m, _, _ in progress} == {"image", "video", "audio"}
    for m in ("image", "video", "audio"):
        steps = [s for mm, s, _ in progress if mm == m]
        assert len(steps) == decoders[m].steps * len(_by_modality(reply, m))


def test_same_seed_identical_media_bytes(tiny_assistant):
    runs = [tiny_assistant.respond([Message("user", "a red circle")], want=["image", "audio"], seed=s) for s in (5, 5, 6)]
    a, b, c = ([m.path.read_bytes() for m in r.media] for r in runs)
    assert a == b
    assert a != c


def test_image_input_to_text_and_media(tiny_assistant, media_files):
    msg = Message("user", "what is this?", [MediaInput("image", media_files["red.png"]), MediaInput("audio", media_files["beep.wav"])])
    reply = tiny_assistant.respond([msg], want=["image"], seed=1)
    assert reply.trace and _by_modality(reply, "image")


def test_failing_decoder_keeps_the_text(settings, tiny_model, tmp_path):
    """A real failure: the video decoder's weights are not where the config says."""
    from assistant.agent import Assistant

    broken = settings.model_copy(deep=True)
    broken.profiles["tiny"].decoders["video"].source = str(tmp_path / "no-such-pipeline")
    a = Assistant(broken, "tiny", output_dir=tmp_path)
    a._model = tiny_model
    reply = a.respond([Message("user", "a video")], want=["video", "image"], seed=0)
    assert _by_modality(reply, "image")
    assert [(f.modality, f.tool) for f in reply.failures] == [("video", "VideoTool")]
    assert "no-such-pipeline" in reply.failures[0].error
    assert isinstance(reply.text, str)


def test_decoder_outputs_are_named_by_content(tiny_assistant):
    import hashlib

    reply = tiny_assistant.respond([Message("user", "a green triangle")], want=["image"], seed=3)
    image = _by_modality(reply, "image")[0]
    assert image.path.stem == hashlib.sha256(image.path.read_bytes()).hexdigest()
    assert np.asarray(Image.open(image.path)).shape[-1] == 3


def test_warm_readies_the_model_and_every_decoder_and_traces_at_the_projectors_width(settings, tiny_model, tiny_assistant, tmp_path):
    """`Assistant.warm()` (what chat, serve and Discord call once): the model's media parts and every decoder
    tool loaded; with `trace`, each UNet traced for the configured size at the projector's query count, so
    the first reply's renders use those graphs (no new signature) and equal an unwarmed assistant's bytes."""
    from assistant.agent import Assistant
    from tools.base import _TracedUNet

    traced = settings.model_copy(deep=True)
    for cfg in traced.profiles["tiny"].decoders.values():
        cfg.trace = True
    a = Assistant(traced, "tiny", output_dir=tmp_path)
    a._model = tiny_model
    a.warm()
    assert all(tool.loaded for tool in a.tools.values())
    unets = {m: tool.pipeline.unet.forward for m, tool in a.tools.items()}
    assert all(isinstance(f, _TracedUNet) and len(f.graphs) == 1 for f in unets.values())
    reply = a.respond([Message("user", "show me everything")], want=["image", "video", "audio"], seed=0)
    assert all(len(f.graphs) == 1 for f in unets.values())  # the warm-up's signatures served the turn
    plain = tiny_assistant.respond([Message("user", "show me everything")], want=["image", "video", "audio"], seed=0)
    assert [m.sha256 for m in reply.media] == [m.sha256 for m in plain.media] and len(reply.media) == 3
