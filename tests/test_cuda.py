"""The code paths a user with `device: auto` on an NVIDIA GPU runs, on CUDA, each compared with the same
work on the CPU: the core (placement, greedy and seeded replies, an image input, cached turns, the
output projectors), the decoder tools (image, video, audio) and training (the trainer on the GPU, the
checkpoint it writes loaded back; the refit's signal states; the `training.small` smoke recipe).

Every test is skipped without a CUDA GPU (CI has none: that skip is this file's own flag, hence
`feature_skips`). TF32 is switched off for the module so that CUDA and CPU float32 agree closely enough
for greedy decoding to pick the same tokens (cuDNN's convolutions use TF32 by default: ImageBind's
patch embedding would differ in the third decimal).

Each test's body is a `check_*` function that takes the device's name: on a machine without a GPU they
can be dry-run with device "cpu" (CPU against CPU), which checks the test logic, not CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
GPU = "cuda"

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.cuda,
    pytest.mark.feature_skips,
]

MIN_COSINE = 0.999


# ------------------------------------------------------------------------------------------------ helpers


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest cosine similarity between corresponding vectors (last dimension) of a and b."""
    a = a.detach().float().cpu().reshape(-1, a.shape[-1])
    b = b.detach().float().cpu().reshape(-1, b.shape[-1])
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def kind(device: str) -> str:
    return torch.device(device).type


def module_devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in list(module.parameters()) + list(module.buffers())}


def profile_on(settings, device: str, **update):
    """The tiny profile with every component (LLM, encoder, decoders) on `device`."""
    p = settings.profile("tiny").model_copy(deep=True)
    p.llm.device = device
    p.encoder.device = device
    for d in p.decoders.values():
        d.device = device
    return p.model_copy(update=update) if update else p


def load_core(settings, cache_dir, device: str, **update):
    from nextgpt.model import NextGPT

    return NextGPT.from_profile(profile_on(settings, device, **update), cache_dir)


def write_config(folder: Path, device: str) -> Path:
    """A config.yaml holding only the repository's tiny profile, its components on `device`."""
    import yaml

    from nextgpt.config import REPO_CONFIG

    tiny = yaml.safe_load(REPO_CONFIG.read_text())["profiles"]["tiny"]
    for part in (tiny["llm"], tiny["encoder"], *tiny["decoders"].values()):
        part["device"] = device
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"default_profile": "tiny", "profiles": {"tiny": tiny}}, sort_keys=False))
    return path


def write_pictures(folder: Path) -> dict[str, Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, colour in (("red.png", (220, 40, 40)), ("blue.png", (40, 80, 220))):
        img = Image.new("RGB", (64, 64), "white")
        img.paste(colour, (16, 16, 48, 48))
        img.save(folder / name)
        out[name] = folder / name
    return out


def write_dialogs(folder: Path) -> Path:
    """Stage-3 dialogs with image inputs (PNG only: no video or audio codec needed) and outputs of every
    modality, each with a caption (the projector target)."""
    write_pictures(folder)
    dialogs = [
        {"conversation": [
            {"from": "human", "value": "What is this?", "image_name": "red.png"},
            {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "Draw it in blue, film it moving and make it beep."},
            {"from": "gpt", "value": "Here they are.", "output_modality": ["image", "video", "audio"],
             "caption": ["a blue square", "a red square moving left", "a high beep"]},
        ]},
        {"conversation": [
            {"from": "human", "value": "Describe it.", "image_name": "blue.png"},
            {"from": "gpt", "value": "A blue square on white."},
        ]},
        {"conversation": [
            {"from": "human", "value": "Make a picture and a sound of a red square."},
            {"from": "gpt", "value": "Done.", "output_modality": ["image", "audio"], "caption": ["a red square", "a low hum"]},
        ]},
        {"conversation": [
            {"from": "human", "value": "What colour is this?", "image_name": "red.png"},
            {"from": "gpt", "value": "Red. Here is a video of it.", "output_modality": "video", "caption": "a red square moving up"},
        ]},
    ]  # fmt: skip
    path = folder / "dialogs.json"
    path.write_text(json.dumps(dialogs, indent=1))
    return path


# ------------------------------------------------------------------------------------------------ checks: the core


def check_core_placement(core, device: str) -> None:
    dev = kind(device)
    assert core.device.type == dev
    for name, module in (("llm", core.llm), ("input_proj", core.input_proj), ("output_projectors", core.output_projectors),
                         ("encoder", core.encoder.model)):  # fmt: skip
        assert module_devices(module) == {dev}, (name, module_devices(module))
    assert core.encoder.device.type == dev


def check_forward_logits(ref, core, device: str) -> None:
    """One plain forward pass: the same logits (to float32 noise) on both devices."""
    from nextgpt.model import Message

    inputs, _ = ref.build_inputs([Message("user", "hello, what can you do?")])
    with torch.inference_mode():
        a = ref(inputs_embeds=inputs, all_states=True)
        b = core(inputs_embeds=inputs.to(device), all_states=True)
    assert b.logits.device.type == kind(device) and b.all_states.device.type == kind(device)
    assert torch.allclose(b.logits.float().cpu(), a.logits.float(), atol=1e-4, rtol=1e-4), \
        float((b.logits.float().cpu() - a.logits.float()).abs().max())  # fmt: skip
    assert cosine(b.all_states, a.all_states) >= MIN_COSINE


def check_signals(ref_reply, reply, core, device: str) -> None:
    """The reply's signals live on the device and match the CPU reply's; the device's projectors give the
    CPU's outputs for the CPU reply's own states."""
    dev = kind(device)
    assert [s.modality for s in reply.signals] == [s.modality for s in ref_reply.signals]
    for a, b in zip(ref_reply.signals, reply.signals):
        assert b.position == a.position
        assert b.prompt_embeds.device.type == dev and b.states.device.type == dev
        assert b.prompt_embeds.shape == a.prompt_embeds.shape and b.prompt_embeds.dtype == a.prompt_embeds.dtype
        assert torch.isfinite(b.prompt_embeds).all()
        assert cosine(b.states, a.states) >= MIN_COSINE
        assert cosine(b.prompt_embeds, a.prompt_embeds) >= MIN_COSINE
        with torch.inference_mode():
            again = core.output_projectors[b.modality](a.states.to(device))
        assert again.device.type == dev and cosine(again, a.prompt_embeds) >= MIN_COSINE


def check_greedy_reply(ref, core, device: str) -> None:
    from nextgpt.model import Message

    messages = [Message("user", "draw a red circle, film it and make it beep")]
    for isolate in (False, True):
        kw = dict(want=["image", "video", "audio"], temperature=0, max_new_tokens=8, isolate_groups=isolate)
        a, b = ref.generate(messages, **kw), core.generate(messages, **kw)
        assert b.token_ids == a.token_ids, (isolate, a.token_ids, b.token_ids)
        assert (b.text, b.trace, b.finish_reason) == (a.text, a.trace, a.finish_reason)
        assert {s.modality for s in b.signals} == {"image", "video", "audio"}
        check_signals(a, b, core, device)


def check_seeded_sampling(ref, core, device: str) -> None:
    """temperature > 0 with a seed (every shipped profile's default): the same seed, the same reply."""
    from nextgpt.model import Message

    kw = dict(temperature=1.0, top_p=0.9, top_k=40, seed=1234, max_new_tokens=12, want=["audio"])
    a = ref.generate([Message("user", "say something and play a sound")], **kw)
    b = core.generate([Message("user", "say something and play a sound")], **kw)
    assert b.token_ids == a.token_ids, (a.token_ids, b.token_ids)
    check_signals(a, b, core, device)


def check_projectors(ref, core, device: str) -> None:
    """The output projectors on the same (random) signal states: the CPU's outputs, on the device."""
    from nextgpt.tokens import MODALITIES

    g = torch.Generator().manual_seed(0)
    hidden = ref.llm.config.get_text_config().hidden_size
    for m, spec in MODALITIES.items():
        states = torch.randn(2, spec.num_tokens, hidden, generator=g)
        with torch.inference_mode():
            a = ref.output_projectors[m](states)
            b = core.output_projectors[m](states.to(device))
        assert b.device.type == kind(device) and b.shape == a.shape, (m, b.device, b.shape, a.shape)
        assert cosine(b, a) >= MIN_COSINE, m


def check_image_input(ref, core, device: str, picture: Path) -> None:
    from nextgpt.model import MediaInput, Message

    dev = kind(device)
    va, vb = ref.encoder.encode([("image", picture)]), core.encoder.encode([("image", picture)])
    assert vb.device.type == dev and vb.shape == va.shape
    assert cosine(vb, va) >= MIN_COSINE
    messages = [Message("user", "what is this? draw it again", [MediaInput("image", picture)])]
    (ea, ka), (eb, kb) = ref.build_inputs(messages), core.build_inputs(messages)
    assert eb.device.type == dev and eb.shape == ea.shape
    assert len(kb) == len(ka) and [k for k in kb if not isinstance(k, tuple)] == [k for k in ka if not isinstance(k, tuple)]
    assert cosine(eb, ea) >= MIN_COSINE
    kw = dict(want=["image"], temperature=0, max_new_tokens=8)
    a, b = ref.generate(messages, **kw), core.generate(messages, **kw)
    assert b.token_ids == a.token_ids, (a.token_ids, b.token_ids)
    check_signals(a, b, core, device)


def check_cached_turns(core, device: str, picture: Path) -> None:
    """A conversation's key/value cache (nextgpt.kv_cache) on the device: the next turn reuses the
    prefix and replies as a fresh prefill does."""
    from nextgpt.model import MediaInput, Message, PromptCache

    cache = PromptCache()
    history = [Message("user", "hello there", [MediaInput("image", picture)])]
    first = core.generate(history, temperature=0, max_new_tokens=6, cache=cache, want=["image"])
    layers = getattr(cache.kv, "layers", [])
    assert layers and {layer.keys.device.type for layer in layers} == {kind(device)}
    history += [Message("assistant", first.trace), Message("user", "and again")]
    cached = core.generate(history, temperature=0, max_new_tokens=6, cache=cache)
    fresh = core.generate(history, temperature=0, max_new_tokens=6)
    assert cached.timings["prefill_tokens"] < fresh.timings["prefill_tokens"]
    assert cached.token_ids == fresh.token_ids


# ------------------------------------------------------------------------------------------------ checks: decoders


def check_decoder(settings, cache_dir, device: str, modality: str, out: Path, monkeypatch=None) -> None:
    """One tool per device on the same prompt_embeds and seed: files of the same kind and size, and the
    pipelines' outputs (before encoding) equal to float noise; the pipeline sits on the device."""
    import numpy as np

    import tools.video
    from tools import build_tools
    from tools.base import write_bytes_addressed

    if modality == "video" and importlib.util.find_spec("imageio_ffmpeg") is None:
        # no FFmpeg to encode H.264 here (the GPU image has no imageio-ffmpeg): the frames' raw bytes
        # stand in for the MP4; everything before the encoder (the pipeline on the device) still runs
        assert monkeypatch is not None
        monkeypatch.setattr(tools.video, "write_mp4",
                            lambda frames, fps, output_dir: write_bytes_addressed(np.ascontiguousarray(frames).tobytes(), output_dir, "mp4"))  # fmt: skip

    rows: dict[str, list] = {}

    def make(dev: str):
        tool = build_tools({modality: profile_on(settings, dev).decoders[modality]}, cache_dir, out / dev)[modality]
        generate = tool._generate

        def spy(*args, **kwargs):
            rows[dev] = generate(*args, **kwargs)
            return rows[dev]

        tool._generate = spy
        return tool

    ref, tool = make("cpu"), make(device)
    cfg = settings.profile("tiny").projectors[modality]
    embeds = torch.randn(1, cfg.num_queries, cfg.out_dim, generator=torch.Generator().manual_seed(0))
    if cfg.normalize:
        embeds = torch.nn.functional.normalize(embeds, dim=-1)
    a = ref(embeds, seed=0)
    b = tool(embeds.to(device), seed=0)  # as the core hands them over: on its device

    assert tool.device == str(torch.device(device)) or kind(tool.device) == kind(device)
    for name, component in tool.pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            assert module_devices(component) <= {kind(device)}, (name, module_devices(component))
    assert len(a) == len(b) == 1
    fields = ("modality", "mime", "width", "height", "frames", "fps", "duration", "sample_rate", "seed", "steps", "guidance")
    assert {f: getattr(b[0], f) for f in fields} == {f: getattr(a[0], f) for f in fields}
    assert b[0].path.is_file() and b[0].path.stat().st_size > 0 and b[0].path.suffix == a[0].path.suffix
    if modality == "video":
        assert b[0].preview_path is not None and b[0].preview_path.is_file()
    ra, rb = rows["cpu"], rows[device]
    assert len(ra) == len(rb) == 1
    xa, xb = np.asarray(ra[0]), np.asarray(rb[0])
    assert xb.shape == xa.shape and xb.dtype == xa.dtype
    assert np.isfinite(xb).all()
    scale = max(1.0, float(np.abs(xa).max()))
    assert float(np.abs(xb - xa).max()) <= 1e-2 * scale, float(np.abs(xb - xa).max())
    # the decoder's own text encoder (the projectors' training target) runs on the device, answers on the CPU
    ta, tb = ref.text_embeds("a red circle"), tool.text_embeds("a red circle")
    assert tb.device.type == "cpu" and tb.shape == ta.shape and cosine(tb, ta) >= MIN_COSINE


# ------------------------------------------------------------------------------------------------ checks: training


def check_trainer(settings, cache_dir, device: str, work: Path, dialogs: Path, monkeypatch) -> Path:
    """`training.stages` (stage 3: LoRA, new rows, input projection, output projectors) for two steps on a
    profile whose components are on `device`, without --cpu: the trainer must run the model, its batches
    and the frozen encoder there. The checkpoint it writes then loads on the device and on the CPU and
    both give the same greedy reply."""
    from nextgpt.encoder import MediaEncoder
    from nextgpt.model import Message
    from training.stages import main
    from training.trainer.trainer import TrainModule

    seen: dict[str, set] = {"params": set(), "batch": set(), "media": set(), "encoder": set()}
    forward, encode = TrainModule.forward, MediaEncoder.encode

    def spy_forward(self, batch):
        seen["params"] |= module_devices(self)
        seen["batch"] |= {batch["input_ids"].device.type, batch["attention_mask"].device.type}
        seen["media"].add(batch["media_vectors"].device.type)
        return forward(self, batch)

    def spy_encode(self, items, normalize=False):
        seen["encoder"] |= module_devices(self.model)
        return encode(self, items, normalize)

    monkeypatch.setattr(TrainModule, "forward", spy_forward)
    monkeypatch.setattr(MediaEncoder, "encode", spy_encode)
    config = write_config(work / "config", device)
    out = work / "stage3"
    argv = ["--stage", "3", "--config", str(config), "--profile", "tiny", "--data", str(dialogs), "--init", "none",
            "--output", str(out), "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--warmup", "1", "--max-length", "256",
            "--lora-r", "4", "--lora-alpha", "8", "--targets", str(work / "targets"), "--save-every", "1",
            "--no-progress", "--log-every", "1"]  # fmt: skip
    if kind(device) == "cpu":
        argv.append("--cpu")  # (a dry run on a machine without a GPU)
    assert main(argv) == 0
    dev = kind(device)
    assert seen == {"params": {dev}, "batch": {dev}, "media": {dev}, "encoder": {dev}}, seen
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] == m["loss"] for m in metrics), metrics
    assert {"l2_image", "l2_video", "l2_audio"} <= set(metrics[0]) | set(metrics[1])
    for name in ("nextgpt.safetensors", "meta.json", "trainer.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step-000001").is_dir()
    # the checkpoint loads (LoRA merged) on both devices and replies the same
    from safetensors.torch import load_file

    trained = load_file(str(out / "nextgpt.safetensors"))
    ref, core = load_core(settings, cache_dir, "cpu", checkpoint=str(out)), load_core(settings, cache_dir, device, checkpoint=str(out))
    check_core_placement(core, device)
    assert torch.equal(core.input_proj.weight.cpu(), trained["input_proj.weight"].to(core.input_proj.weight.dtype))
    messages = [Message("user", "Make a picture and a sound of a red square.")]
    kw = dict(want=["image", "audio"], temperature=0, max_new_tokens=6)
    a, b = ref.generate(messages, **kw), core.generate(messages, **kw)
    assert b.token_ids == a.token_ids, (a.token_ids, b.token_ids)
    check_signals(a, b, core, device)
    return out


def check_refit_states(settings, cache_dir, device: str, dialogs: Path) -> None:
    """`training.small.signal_states` (the projector refit's expensive part) with the model on `device`, as
    the refit loads it (its profile's device: `auto` is the GPU): the CPU's states and targets."""
    from training.small import signal_states
    from training.trainer import load_stage_data
    from training.trainer.encode import Collator, DialogEncoder, MediaCache

    records = [d for d in load_stage_data(3, [dialogs]) if d.outputs]
    assert records

    def states(model) -> dict:
        enc = DialogEncoder(model.tokenizer, model.template, model.system_prompt, 256)
        examples = [e for e in (enc.encode(r) for r in records) if e is not None and e.signals]
        shapes = {m: (p.query_embs.shape[1], p.model.out_features) for m, p in model.output_projectors.items()}

        def target(modality: str, caption: str) -> torch.Tensor:  # a fixed stand-in for the decoder's text embedding
            g = torch.Generator().manual_seed(len(caption))
            return torch.randn(shapes[modality][1], generator=g)

        collate = Collator(model.tokenizer.pad_token_id or 0, model.input_proj.in_features, shapes,
                           MediaCache(model.encoder.encode), target)  # fmt: skip
        return signal_states(model, collate, examples, 2)

    a = states(load_core(settings, cache_dir, "cpu"))
    b = states(load_core(settings, cache_dir, device))
    assert a and sorted(b) == sorted(a)
    for k in a:
        assert b[k].shape == a[k].shape, k
        assert cosine(b[k], a[k]) >= MIN_COSINE, k


def run_small_smoke(device: str, tmp: Path) -> subprocess.CompletedProcess:
    """`python -m training.small --smoke --profile tiny` (the CI recipe, all stages + refit + publish), with
    the tiny profile's components on `device` (the recipe's stages pass --cpu; the refit loads the model
    on the profile's device)."""
    config = write_config(tmp / "config", device)
    cmd = [sys.executable, "-m", "training.small", "--smoke", "--profile", "tiny", "--config", str(config),
           "--work", str(tmp / "work"), "--out", str(tmp / "out"), "--no-progress"]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def exact_float32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cores(settings, cache_dir):
    return load_core(settings, cache_dir, "cpu"), load_core(settings, cache_dir, GPU)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    return write_pictures(tmp_path_factory.mktemp("pictures"))


@pytest.fixture(scope="module")
def dialogs(tmp_path_factory) -> Path:
    return write_dialogs(tmp_path_factory.mktemp("dialogs"))


# ------------------------------------------------------------------------------------------------ tests: the core


def test_core_loads_on_cuda(cores):
    check_core_placement(cores[1], GPU)


def test_forward_logits_match_cpu(cores):
    check_forward_logits(*cores, GPU)


def test_greedy_reply_with_every_output_matches_cpu(cores):
    check_greedy_reply(*cores, GPU)


def test_seeded_sampling_matches_cpu(cores):
    check_seeded_sampling(*cores, GPU)


def test_output_projectors_match_cpu_on_the_same_states(cores):
    check_projectors(*cores, GPU)


def test_image_input_reply_matches_cpu(cores, pictures):
    check_image_input(*cores, GPU, pictures["red.png"])


def test_cached_turns_on_cuda(cores, pictures):
    check_cached_turns(cores[1], GPU, pictures["blue.png"])


# ------------------------------------------------------------------------------------------------ tests: decoders


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_decoder_tool_on_cuda_matches_cpu(settings, cache_dir, tmp_path, monkeypatch, modality):
    check_decoder(settings, cache_dir, GPU, modality, tmp_path, monkeypatch)


# ------------------------------------------------------------------------------------------------ tests: training


def test_trainer_trains_on_cuda_and_its_checkpoint_loads_there(settings, cache_dir, tmp_path, dialogs, monkeypatch):
    check_trainer(settings, cache_dir, GPU, tmp_path, dialogs, monkeypatch)


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("av", "soundfile")),
                    reason="the recipe's world data needs av (H.264 video) and soundfile")  # fmt: skip
def test_small_smoke_recipe_with_the_profile_on_cuda(tmp_path):
    r = run_small_smoke(GPU, tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    for name in ("nextgpt.safetensors", "meta.json", "README.md"):
        assert (tmp_path / "out" / name).is_file(), name


def test_refit_signal_states_on_cuda_match_cpu(settings, cache_dir, dialogs):
    check_refit_states(settings, cache_dir, GPU, dialogs)
