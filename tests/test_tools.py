"""Decoder tools on the tiny pipelines (random weights, CPU, offline)."""

from __future__ import annotations

import ast
import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nextgpt.config import REPO_CONFIG, load_settings
from tools import TOOLS, AudioTool, DecoderTool, ImageTool, MediaOutput, VideoTool, build_tools

SHAPES = {"image": (1, 8, 32), "video": (1, 8, 32), "audio": (1, 1, 32)}


@pytest.fixture(scope="session")
def decoders():
    return load_settings(REPO_CONFIG).profile("tiny").decoders


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    return root / "cache", root / "out"


@pytest.fixture(scope="session")
def tools(decoders, dirs):
    return build_tools(decoders, *dirs)


def embeds(name: str, batch: int = 1, seed: int = 0, shape=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = shape or (batch, *SHAPES[name][1:])
    e = torch.randn(*shape, generator=g)
    return torch.nn.functional.normalize(e, dim=-1) if name == "audio" else e


def check_named_by_content(out: MediaOutput) -> bytes:
    data = out.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == out.sha256
    assert out.path.name == f"{out.sha256}.{out.path.suffix[1:]}"
    return data


# ---- registry / laziness -------------------------------------------------------------------------


def test_build_tools_is_lazy(decoders, tmp_path):
    built = build_tools(decoders, tmp_path / "c", tmp_path / "o")
    assert set(built) == set(TOOLS) == {"image", "video", "audio"}
    assert isinstance(built["image"], ImageTool)
    assert isinstance(built["video"], VideoTool)
    assert isinstance(built["audio"], AudioTool)
    for name, tool in built.items():
        assert tool.modality == name
        assert not tool.loaded
    assert not (tmp_path / "c").exists()  # nothing built, nothing loaded


def test_build_tools_rejects_unknown(decoders, tmp_path):
    with pytest.raises(ValueError, match="no decoder tool"):
        build_tools({"smell": decoders["image"]}, tmp_path, tmp_path)


# ---- rendering -----------------------------------------------------------------------------------


def test_image_renders_png(tools, decoders):
    from PIL import Image

    tool = tools["image"]
    calls = []
    (out,) = tool(embeds("image"), seed=0, callback=lambda s, t: calls.append((s, t)))
    cfg = decoders["image"]
    assert calls == [(i, cfg.steps) for i in range(1, cfg.steps + 1)]
    check_named_by_content(out)
    assert out.modality == "image" and out.mime == "image/png" and out.path.suffix == ".png"
    with Image.open(out.path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (cfg.width, cfg.height) == (out.width, out.height)
        assert not im.info.get("parameters") and "Software" not in im.info
    assert (out.seed, out.steps, out.guidance) == (0, cfg.steps, cfg.guidance)
    assert tool.expected_embeds_shape == (None, 32)


def test_video_renders_mp4_and_gif(tools, decoders):
    import av
    from PIL import Image

    tool = tools["video"]
    calls = []
    (out,) = tool(embeds("video"), seed=0, callback=lambda s, t: calls.append((s, t)))
    cfg = decoders["video"]
    assert calls == [(i, cfg.steps) for i in range(1, cfg.steps + 1)]
    check_named_by_content(out)
    assert out.mime == "video/mp4" and out.path.suffix == ".mp4"
    assert (out.width, out.height, out.frames, out.fps) == (cfg.width, cfg.height, cfg.frames, cfg.fps)
    assert out.duration == pytest.approx(cfg.frames / cfg.fps)
    with av.open(str(out.path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert float(stream.average_rate) == pytest.approx(cfg.fps)
    assert len(frames) == cfg.frames
    assert frames[0].shape == (cfg.height, cfg.width, 3)
    # preview
    assert out.preview_path is not None and out.preview_path.suffix == ".gif"
    gif = out.preview_path.read_bytes()
    assert out.preview_path.name == hashlib.sha256(gif).hexdigest() + ".gif"
    with Image.open(out.preview_path) as im:
        assert im.format == "GIF" and im.size == (cfg.width, cfg.height)
        assert 1 <= im.n_frames <= cfg.frames  # PIL merges identical consecutive frames


@pytest.mark.parametrize("shape", [(1, 1, 32), (1, 32)])
def test_audio_renders_wav(tools, decoders, shape):
    import soundfile as sf

    tool = tools["audio"]
    calls = []
    (out,) = tool(embeds("audio", shape=shape), seed=0, callback=lambda s, t: calls.append((s, t)))
    cfg = decoders["audio"]
    assert calls == [(i, cfg.steps) for i in range(1, cfg.steps + 1)]
    check_named_by_content(out)
    assert out.mime == "audio/wav" and out.path.suffix == ".wav"
    info = sf.info(str(out.path))
    assert info.format == "WAV" and info.subtype == "PCM_16" and info.channels == 1
    assert info.samplerate == out.sample_rate == 16000
    data, rate = sf.read(str(out.path), dtype="int16")
    assert len(data) == int(cfg.seconds * rate)
    assert out.duration == pytest.approx(cfg.seconds)
    assert np.abs(data).max() > 100  # audible, not digital silence
    assert tool.expected_embeds_shape == (1, 32)


def test_audio_both_shapes_give_same_file(tools):
    e = embeds("audio", shape=(1, 1, 32))
    (a,) = tools["audio"](e, seed=5)
    (b,) = tools["audio"](e[:, 0], seed=5)
    assert a.path == b.path


# ---- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["image", "video", "audio"])
def test_same_seed_same_bytes_other_seed_other_bytes(tools, name):
    tool = tools[name]
    e = embeds(name)
    (a,) = tool(e, seed=123)
    data_a = a.path.read_bytes()
    (b,) = tool(e.clone(), seed=123)
    assert b.sha256 == a.sha256 and b.path == a.path and b.path.read_bytes() == data_a
    (c,) = tool(e, seed=124)
    assert c.sha256 != a.sha256 and c.path != a.path
    if name == "video":
        assert b.preview_path == a.preview_path and c.preview_path != a.preview_path
    assert not list(tool.output_dir.glob(".tmp-*"))  # no temp files left behind


def test_mp4_and_gif_writers_are_byte_deterministic(tmp_path):
    from tools.video import gif_bytes, write_mp4

    frames = np.random.default_rng(0).integers(0, 256, size=(6, 24, 40, 3), dtype=np.uint8)
    p1, s1 = write_mp4(frames, 8, tmp_path / "a")
    p2, s2 = write_mp4(frames, 8, tmp_path / "b")
    assert s1 == s2 and p1.read_bytes() == p2.read_bytes()
    assert b"Lavf" not in p1.read_bytes()  # bitexact: no muxer version string
    assert gif_bytes(frames, 8) == gif_bytes(frames, 8)


def test_odd_frame_size_is_padded_to_even(tmp_path):
    import av

    from tools.video import write_mp4

    frames = np.zeros((2, 9, 11, 3), dtype=np.uint8)
    path, _ = write_mp4(frames, 4, tmp_path)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.width, s.codec_context.height) == (12, 10)


def test_random_seed_is_reported(tools):
    (a,) = tools["audio"](embeds("audio"))
    (b,) = tools["audio"](embeds("audio"))
    assert isinstance(a.seed, int) and a.seed != b.seed and a.sha256 != b.sha256
    (c,) = tools["audio"](embeds("audio"), seed=a.seed)
    assert c.sha256 == a.sha256


# ---- batches, sizes, guidance --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["image", "video", "audio"])
def test_batch_of_two_gives_two_outputs(tools, name):
    outs = tools[name](embeds(name, batch=2), seed=7)
    assert len(outs) == 2
    assert outs[0].sha256 != outs[1].sha256
    for o in outs:
        check_named_by_content(o)


def test_size_overrides(tools):
    from PIL import Image

    (img,) = tools["image"](embeds("image"), seed=0, height=16, width=24)
    with Image.open(img.path) as im:
        assert im.size == (24, 16)
    (vid,) = tools["video"](embeds("video"), seed=0, num_frames=3, fps=4, height=16, width=16)
    assert (vid.frames, vid.fps, vid.duration, vid.width) == (3, 4, 0.75, 16)
    (aud,) = tools["audio"](embeds("audio"), seed=0, seconds=0.3)
    assert aud.duration == pytest.approx(0.3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        tools["image"](embeds("image"), seed=0, frames=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        tools["image"](embeds("image"), seed=0, height=20)


def test_no_guidance_and_steps_override(tools):
    calls = []
    (a,) = tools["image"](embeds("image"), seed=0, guidance=1.0, steps=3, callback=lambda s, t: calls.append((s, t)))
    (b,) = tools["image"](embeds("image"), seed=0, guidance=7.5, steps=3)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert (a.guidance, a.steps) == (1.0, 3)
    assert a.sha256 != b.sha256


def test_onednn_off_runs_native_convolutions_for_the_call_alone(decoders, dirs, tools):
    """`onednn: false` (the small decoders): the denoising runs without oneDNN, the same picture comes
    out, and the process-wide setting is back as it was after the call, error or not."""
    assert torch.backends.mkldnn.enabled
    tool = ImageTool(decoders["image"].model_copy(update={"onednn": False}), *dirs)
    seen = []
    (a,) = tool(embeds("image"), seed=0, steps=3, callback=lambda s, t: seen.append(torch.backends.mkldnn.enabled))
    assert seen == [False, False, False] and torch.backends.mkldnn.enabled
    seen.clear()
    (b,) = tools["image"](embeds("image"), seed=0, steps=3, callback=lambda s, t: seen.append(torch.backends.mkldnn.enabled))
    assert seen == [True, True, True]
    pixels = [np.asarray(Image.open(o.path), dtype=np.int16) for o in (a, b)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 2  # other kernels, the same picture (float rounding apart)

    def stop(step, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tool(embeds("image"), seed=0, steps=3, callback=stop)
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("name", ["image", "video", "audio"])
def test_warm_with_trace_renders_the_same_files_from_traced_graphs(decoders, dirs, tools, name):
    """`trace: true` + `warm()`: the UNet runs as a TorchScript graph per input signature, traced at warm-up
    for the configured size, and renders byte-identical files to the eager tool (another seed, a batch of
    two, other steps too); the graph is used, not bypassed; a new shape gets its own graph."""
    from tools.base import _TracedUNet

    def files():
        return set(dirs[1].iterdir()) if dirs[1].exists() else set()

    tool = TOOLS[name](decoders[name].model_copy(update={"trace": True}), *dirs)
    before = files()
    tool.warm(SHAPES[name][1])
    traced = tool.pipeline.unet.forward
    assert isinstance(traced, _TracedUNet)
    assert len(traced.graphs) == 1 and all(g is not None for g in traced.graphs.values())
    tool.warm(SHAPES[name][1])  # a second warm-up is a no-op
    assert files() == before  # warming writes nothing

    calls = []
    graph, output = next(iter(traced.graphs.values()))

    class Counting:
        def __call__(self, *inputs):
            calls.append(1)
            return graph(*inputs)

    traced.graphs = {k: (Counting(), output) for k in traced.graphs}
    for kwargs in ({"seed": 0}, {"seed": 7, "steps": 3}):
        (a,) = tool(embeds(name), **kwargs)
        (b,) = tools[name](embeds(name), **kwargs)
        assert a.sha256 == b.sha256
    assert len(calls) >= 2 + 3
    two = tool(embeds(name, batch=2, seed=1), seed=[1, 2])
    assert [o.sha256 for o in two] == [o.sha256 for o in tools[name](embeds(name, batch=2, seed=1), seed=[1, 2])]
    assert len(traced.graphs) == 2  # the batch of two: a signature of its own


def test_traced_unet_runs_eager_where_a_graph_cannot_serve(decoders, dirs):
    """Gradients on, a non-tensor keyword, a trace that fails, more signatures than its limit: the eager
    forward answers (same numbers), and remove() puts the class's forward back."""
    from tools.base import _TracedUNet

    tool = ImageTool(decoders["image"].model_copy(update={"trace": True}), *dirs)
    unet = tool.load().unet
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor(10), torch.randn(2, 8, 32)
    with torch.inference_mode():
        want = type(unet).forward(unet, x, t, encoder_hidden_states=c).sample
    traced = _TracedUNet(unet, limit=1)
    try:
        out = unet(x, t, encoder_hidden_states=c, return_dict=True).sample  # gradients on: eager
        assert not traced.graphs and torch.equal(out.detach(), want)
        with torch.inference_mode():
            assert unet(x, 10, encoder_hidden_states=c).sample.equal(want) and not traced.graphs  # an int timestep
            assert torch.equal(unet(x, t, encoder_hidden_states=c, return_dict=False)[0], want)
            assert len(traced.graphs) == 1
            y = torch.randn(2, 4, 8, 8)  # over the limit: eager, remembered as such
            assert unet(y, t, encoder_hidden_states=c).sample.shape == y.shape
            assert list(traced.graphs.values())[1] is None
        traced.graphs.clear()
        traced.limit = 8
        real = torch.jit.trace
        torch.jit.trace = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no tracing here"))
        try:
            with torch.inference_mode():
                assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, want)
            assert list(traced.graphs.values()) == [None]
        finally:
            torch.jit.trace = real
    finally:
        traced.remove()
    assert "forward" not in unet.__dict__


def test_any_token_count_for_sequence_embeds(tools):
    # the negative embedding (77 tokens from the tokenizer) is cut / padded to the projector's Q
    for q in (1, 77, 90):
        (out,) = tools["image"](embeds("image", shape=(1, q, 32)), seed=0)
        check_named_by_content(out)


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,shape",
    [("image", (1, 8, 16)), ("image", (8, 32)), ("video", (1, 8, 64)), ("audio", (1, 2, 32)), ("audio", (1, 16))],
)
def test_wrong_embedding_shape_is_a_clear_error(tools, name, shape):
    with pytest.raises(ValueError, match=r"expects prompt_embeds of shape .*got"):
        tools[name](torch.randn(*shape), seed=0)


def test_non_finite_and_non_float_embeddings_rejected(tools):
    e = embeds("image")
    e[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tools["image"](e, seed=0)
    with pytest.raises(ValueError, match="floating-point"):
        tools["image"](torch.ones(1, 8, 32, dtype=torch.long), seed=0)


# ---- loading, caching, offload -------------------------------------------------------------------


def test_pipeline_loaded_once_and_cached(tools, dirs):
    cache, _ = dirs
    for name, tool in tools.items():
        tool(embeds(name), seed=0)
        first = tool.pipeline
        tool(embeds(name), seed=1)
        assert tool.pipeline is first and tool.load() is first
        assert tool.load_count == 1
        assert tool.negative_embeds() is tool.negative_embeds()
        assert (cache / "tiny" / name / "model_index.json").is_file()
        assert type(first).__name__ == tool.pipeline_class_name


def test_tiny_build_is_reused_from_disk(decoders, dirs, tools):
    cache, out = dirs
    tools["image"].load()  # make sure the session tool built it
    marker = cache / "tiny" / "image" / "nextgpt_tiny.json"
    before = marker.stat().st_mtime_ns
    again = ImageTool(decoders["image"], cache, out)
    again.load()
    assert marker.stat().st_mtime_ns == before  # not rebuilt
    # same weights → same bytes from a freshly loaded instance
    e = embeds("image")
    assert again(e, seed=3)[0].sha256 == tools["image"](e, seed=3)[0].sha256


def test_offload(decoders, dirs, tools):
    cache, out = dirs
    cfg = decoders["audio"].model_copy(update={"offload": True})
    tool = AudioTool(cfg, cache, out)
    assert not tool.offloaded and not tool.loaded
    tool.load()
    assert tool.offloaded and tool.pipeline.device.type == "cpu"  # waits on the CPU until called
    assert tool.negative_embeds().shape == (1, 32) and tool.offloaded
    e = embeds("audio")
    (a,) = tool(e, seed=9)
    assert tool.offloaded and tool.pipeline.device.type == "cpu"
    (b,) = tool(e, seed=9)  # moved back to its device and run again
    assert tool.offloaded and a.sha256 == b.sha256 == tools["audio"](e, seed=9)[0].sha256
    assert tool.load_count == 1
    assert not tools["audio"].offloaded  # offload: false keeps the pipeline on its device
    tools["audio"].to_cpu()
    assert tools["audio"].offloaded
    tools["audio"](e, seed=9)
    assert tools["audio"].offloaded is False


def test_device_and_dtype_resolution(caplog):
    from nextgpt.devices import resolve, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with caplog.at_level("WARNING"):
        assert resolve("cpu", "float16") == (torch.device("cpu"), torch.float32)
    assert "float16" in caplog.text
    assert resolve("cpu", "float32") == (torch.device("cpu"), torch.float32)


def test_unknown_tiny_name():
    from tools.tiny import build_tiny

    with pytest.raises(ValueError, match="no tiny pipeline"):
        build_tiny("smell")


# ---- architecture --------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_tools_import_only_config_from_the_project():
    root = Path(__file__).resolve().parent.parent
    for path in (root / "tools").glob("*.py"):
        assert not _imports(path) & {"assistant", "bots", "memory"}, path
        src = path.read_text()
        assert "nextgpt." not in src.replace("nextgpt.config", "").replace("nextgpt.devices", ""), path
    for path in (root / "nextgpt").rglob("*.py"):
        assert "tools" not in _imports(path), path


def test_decoder_tool_is_abstract_base():
    assert issubclass(ImageTool, DecoderTool)
    assert {c.modality for c in TOOLS.values()} == set(TOOLS)


def test_tools_loading_at_once_in_threads_all_load(dirs):
    """A chat's loader thread warms the tools while a reply may load one: three tools loading at once in a
    fresh process (diffusers not yet imported) all load. Without the loading lock, diffusers' lazy modules
    failed one or two of them each time ("module 'diffusers' has no attribute 'TextToVideoSDPipeline'")."""
    import subprocess
    import sys

    script = f"""
import threading
from nextgpt.config import REPO_CONFIG, load_settings
from tools import build_tools
tools = build_tools(load_settings(REPO_CONFIG).profile("tiny").decoders, {str(dirs[0])!r}, {str(dirs[1])!r})
start, errors = threading.Barrier(len(tools)), []
def load(tool):
    start.wait()
    try:
        tool.load()
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=load, args=(t,)) for t in tools.values()]
[t.start() for t in threads]
[t.join() for t in threads]
print("errors", errors, "loaded", sorted(m for m, t in tools.items() if t.loaded))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert "errors [] loaded ['audio', 'image', 'video']" in out.stdout, out.stdout + out.stderr[-2000:]


def test_warm_without_trace_loads_nothing(decoders, dirs):
    """Only `trace` tools load at warm-up; the others (a 7B profile's GPU decoders) load on first use, as before."""
    tool = ImageTool(decoders["image"], *dirs)
    assert not decoders["image"].trace
    tool.warm(8)
    assert not tool.loaded
