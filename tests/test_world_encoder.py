"""The small ImageBind trained on the shapes world (training.world.encoder_train) and its weights."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.world import encoder_train as et
from training.world.spec import AudioSpec, ImageSpec, VideoSpec

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights" / "small" / "imagebind"
WEIGHTS = WEIGHTS_DIR / "model.safetensors"
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason="no committed weights/small/imagebind")

# a toy architecture for the training tests (the real one trains the same way, only bigger)
TOY_ARCH = {**et.SMALL_ARCH, "out_embed_dim": 16, "vision_embed_dim": 16, "vision_num_blocks": 1,
            "audio_embed_dim": 16, "audio_num_blocks": 1, "text_embed_dim": 16, "text_num_blocks": 1}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fast_text_branch_equals_the_full_forward():
    model = et.build_model(TOY_ARCH, seed=1).eval()
    tokens = et.tokenize(["a small red circle on the left", "a high-pitched buzz", "a blue square moving up"])
    assert tokens.shape == (3, 77)
    with torch.no_grad():
        fast = et.text_embeddings(model, tokens)
        full = et.text_embeddings(model, tokens, fast=False)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_positives_follow_what_a_caption_says():
    specs = [ImageSpec("circle", "red", "small", "left"), ImageSpec("circle", "red", "large", "right"),
             ImageSpec("square", "red", "small", "left")]  # fmt: skip
    captions = ["a small red circle on the left", "a red circle", "a picture of a red square"]
    pos = et.compatibility("image", specs, captions).tolist()
    assert pos == [[True, True, False], [False, True, False], [False, False, True]]
    rng = np.random.default_rng(0)
    for _ in range(20):  # a sibling differs in exactly one attribute
        s = ImageSpec("triangle", "blue", "large", "center")
        t = et.sibling(s, rng)
        assert sum(a != b for a, b in zip(s.attributes().values(), t.attributes().values())) == 1


def test_training_inputs_are_the_inference_inputs(tmp_path):
    """The training batch's tensors are what MediaEncoder.preprocess makes of the written files."""
    from nextgpt.config import EncoderConfig
    from nextgpt.encoder import MediaEncoder
    from training.world.dataset import write_media

    enc = MediaEncoder(EncoderConfig(source="tiny"), tmp_path / "cache")
    cases = [("image", ImageSpec("square", "green", "small", "right"), "png", 0.0),
             ("audio", AudioSpec("low", "buzz", 1.3), "wav", 1e-3),
             ("video", VideoSpec("triangle", "orange", "down", 9), "mp4", 0.05)]  # fmt: skip
    for modality, spec, ext, tol in cases:
        path = tmp_path / f"x.{ext}"
        write_media(spec, path, 64)
        real = enc.preprocess(modality, path)  # image (3, 224, 224); clips (S, ...)
        ours = et.preprocess_sample(spec, 64) if modality == "audio" else et.vision_input(spec, 64)
        if modality == "image":
            torch.testing.assert_close(ours, real, atol=2e-3, rtol=0)  # float16 cache
        else:  # every clip of a ≤ 2 s file is the same clip
            for clip in real:
                assert float((clip - ours).abs().mean()) <= tol + 2e-3, modality


def test_a_few_steps_on_one_batch_lower_the_loss():
    model = et.build_model(TOY_ARCH, seed=0)
    opt, _ = et.make_optimizer(model, {**et.DEFAULTS, "lr": 3e-3})
    batch = et.make_batch(0, 0, 6, 4, (64,))
    losses = []
    for _ in range(6):
        loss, parts = et.batch_loss(model, batch)
        assert set(parts) == {"image", "audio", "video"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_smoke_training_writes_loadable_weights_and_lowers_the_loss(tmp_path):
    from nextgpt.config import EncoderConfig
    from nextgpt.encoder import load_imagebind

    out = tmp_path / "w"
    assert et.main(["train", "--smoke", "--out", str(out), "--quiet", "--steps", "10"]) == 0
    info = json.loads((out / "train.json").read_text())
    history = info["metrics"]["loss_history"]
    assert len(history) == 10 and all(np.isfinite(history))
    assert np.mean(history[-3:]) < np.mean(history[:3]), history
    assert not (out / "checkpoint").exists()  # removed once finished
    assert json.loads((out / "arch.json").read_text()) == et.SMALL_ARCH
    model = load_imagebind(EncoderConfig(source=str(out / "model.safetensors")), tmp_path / "cache")
    assert model.modality_heads["vision"][-1].out_features == et.SMALL_ARCH["out_embed_dim"]
    # finished: a second call with the same recipe returns at once
    again = et.train(out, steps=10, batch_size=et.SMOKE["batch_size"], seed=0, progress=False,
                     **{k: et.SMOKE[k] for k in ("audio_batch", "warmup", "checkpoint_every")})  # fmt: skip
    assert again.get("resumed_finished") is True


def test_resume_continues_the_step_count_and_the_same_run(tmp_path):
    kw = dict(steps=4, batch_size=4, audio_batch=3, seed=3, progress=False, arch=TOY_ARCH, warmup=1, checkpoint_every=2)
    straight = et.train(tmp_path / "a", **kw)
    assert straight["finished"] and len(straight["loss_history"]) == 4

    part = et.train(tmp_path / "b", stop_after=2, **kw)
    assert not part["finished"] and part["step"] == 2 and part["weights"] is None
    ckpt = tmp_path / "b" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "state.safetensors"]  # no pickle
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "b" / "model.safetensors").exists()

    rest = et.train(tmp_path / "b", **kw)
    assert rest["finished"] and rest["step"] == 4
    assert len(rest["loss_history"]) == 4  # steps 1-2 from the checkpoint, 3-4 resumed
    np.testing.assert_allclose(rest["loss_history"], straight["loss_history"], rtol=1e-4, atol=1e-4)

    et.train(tmp_path / "c", stop_after=1, **kw)
    with pytest.raises(RuntimeError, match="another recipe"):  # a checkpoint of another recipe is refused
        et.train(tmp_path / "c", **{**kw, "seed": 4})


@needs_weights
def test_committed_weights_load_through_load_imagebind(tmp_path):
    from nextgpt.config import EncoderConfig
    from nextgpt.encoder import MediaEncoder, load_imagebind
    from training.world.dataset import write_media

    arch = json.loads((WEIGHTS_DIR / "arch.json").read_text())
    assert WEIGHTS.stat().st_size <= 15_000_000
    model = load_imagebind(EncoderConfig(source=str(WEIGHTS)), tmp_path)
    assert model.nextgpt_arch == arch
    assert all(p.dtype == torch.float32 for p in model.parameters())
    enc = MediaEncoder(EncoderConfig(source=str(WEIGHTS)), tmp_path)
    assert enc.out_dim == arch["out_embed_dim"]
    write_media(ImageSpec("circle", "red", "large", "center"), tmp_path / "a.png")
    write_media(AudioSpec("high", "beep", 1.0), tmp_path / "a.wav")
    v = enc.encode([("image", tmp_path / "a.png"), ("audio", tmp_path / "a.wav")], normalize=True)
    assert v.shape == (2, arch["out_embed_dim"]) and torch.isfinite(v).all()


@needs_weights
@pytest.mark.slow
def test_committed_weights_retrieve_the_right_caption(tmp_path):
    r = et.evaluate(WEIGHTS_DIR, seed=et.EVAL_SEED + 1, n_per_modality=12, print_table=False)
    # chance is 1/108 (image), 1/72 (video), 1/6 (audio)
    assert r["image"]["top1"] >= 0.6, r
    assert r["video"]["top1"] >= 0.6, r
    assert r["audio"]["top1"] >= 0.9, r
