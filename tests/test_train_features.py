"""The training input pipeline: every input file encoded once into an on-disk store keyed by the
encoder and the file's bytes (`training/trainer/features.py`), what a stage trains on unchanged by
it; a projector loss scaled to 0 is watched without a graph; `profile_steps` writes where a step's
time went."""

import json
import shutil

import pytest
import torch

from nextgpt.model import NextGPT
from training.trainer import TrainConfig, Trainer, load_stage_data
from training.trainer.features import MediaFeatures, encoder_key
from training.world.dataset import write_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("feature-data")
    write_pairs(d, "image", 4, 0, side=32)
    write_pairs(d, "audio", 2, 0)
    write_pairs(d / "other", "image", 2, 7, side=32)  # other pictures (another seed)
    return d


@pytest.fixture()
def model(settings, cache_dir):  # (a Trainer installs its wrappers on the model: one model a test)
    return NextGPT.from_profile(settings.profile("tiny"), cache_dir)


class Counting:
    """The real encoder's `encode`, counting the files it is asked for."""

    def __init__(self, encode):
        self.encode, self.files = encode, 0

    def __call__(self, items):
        self.files += len(items)
        return self.encode(items)


def _items(data):
    return [("image", p) for p in sorted((data / "images").glob("*.png"))] + [("audio", p) for p in sorted((data / "audios").glob("*.wav"))]


def test_each_file_is_encoded_once_and_read_back_as_the_encoder_gives_it(model, data, tmp_path):
    items = _items(data)
    assert len(items) == 6
    enc = Counting(model.encoder.encode)
    feats = MediaFeatures(tmp_path / "f", enc, batch_size=4)
    assert feats.fill(items + items[:2]) == 6 and enc.files == 6  # repeated files: once
    want = model.encoder.encode(items)
    got = feats(items)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    assert enc.files == 6  # reading encodes nothing

    # another process (a new store on the same folder): everything is on disk
    enc2 = Counting(model.encoder.encode)
    again = MediaFeatures(tmp_path / "f", enc2)
    assert again.missing(items) == [] and torch.equal(again(items), got) and enc2.files == 0

    # keyed by content: the same bytes elsewhere are found; a file rewritten with other content is not
    moved = tmp_path / "moved.png"
    shutil.copy(items[0][1], moved)
    assert again.missing([("image", moved)]) == []
    assert torch.equal(again([("image", moved)])[0], got[0])
    changed = tmp_path / "changed.png"
    shutil.copy(sorted((data / "other" / "images").glob("*.png"))[0], changed)
    assert again.missing([("image", changed)]) == [("image", changed)]
    v = again([("image", changed)])  # not filled beforehand: encoded at once
    assert enc2.files == 1 and torch.allclose(v, model.encoder.encode([("image", changed)]), atol=1e-6)
    with pytest.raises(ValueError, match="modality must be one of"):
        again.missing([("smell", moved)])


def test_encoder_key_follows_the_weights_and_the_clip_settings(model, settings, cache_dir):
    key = encoder_key(model.encoder)
    other = NextGPT.from_profile(settings.profile("tiny"), cache_dir).encoder
    assert encoder_key(other) == key  # the same encoder loaded again
    other.cfg = other.cfg.model_copy(update={"video_clips": other.cfg.video_clips + 1})
    assert encoder_key(other) != key
    other.cfg = model.encoder.cfg
    with torch.no_grad():
        next(iter(other.model.parameters())).view(-1)[0] += 1e-3
    assert encoder_key(other) != key


def _cli(*args):
    from training.stages import main

    return main([*map(str, args), "--no-progress", "--log-every", "100"])


def test_stage_cli_encodes_inputs_once_before_training_and_learns_the_same(model, data, tmp_path, capsys, settings, cache_dir):
    args = ["--stage", 1, "--data", data / "image_pairs.json", "--data", data / "audio_pairs.json", "--init", "none",
            "--steps", 4, "--batch-size", 4, "--lr", 2e-2, "--warmup", 1, "--features", tmp_path / "feats"]  # fmt: skip
    assert _cli(*args, "--output", tmp_path / "a") == 0
    out = capsys.readouterr().out
    assert "encoding 6 input file(s) once, before training" in out
    assert _cli(*args, "--output", tmp_path / "b") == 0
    assert "encoding" not in capsys.readouterr().out  # the second run reads the vectors

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    # the same run with the trainer's own per-batch encoding: the same losses (the vectors are the encoder's)
    fresh = NextGPT.from_profile(settings.profile("tiny"), cache_dir)
    cfg = TrainConfig(stage=1, output_dir=tmp_path / "c", max_steps=4, batch_size=4, lr=2e-2, warmup_steps=1, progress=False)
    ref = Trainer(fresh, cfg, log=lambda _: None).fit(load_stage_data(1, [data / "image_pairs.json", data / "audio_pairs.json"]))
    assert ref.losses == pytest.approx(losses(tmp_path / "a"), rel=1e-4)


def test_a_projector_loss_scaled_to_zero_is_reported_without_a_graph(model, tmp_path):
    from training.trainer.encode import IGNORE

    cfg = TrainConfig(stage=3, output_dir=tmp_path / "s", lora_r=4, loss_scale={"image": 0.0}, progress=False)
    trainer = Trainer(model, cfg, log=lambda _: None)
    shapes = {m: (p.query_embs.shape[1], p.model.out_features) for m, p in model.output_projectors.items()}
    ids = model.tokenizer("Draw a red circle.", add_special_tokens=False)["input_ids"]
    sig = model.tokenizer.convert_tokens_to_ids([f"[IMG{i}]" for i in range(4)] + [f"[AUD{i}]" for i in range(8)])
    input_ids = torch.tensor([ids + sig])
    labels = torch.full_like(input_ids, IGNORE)
    labels[0, len(ids) - 1 :] = input_ids[0, len(ids) - 1 :]
    group = lambda m, start: {  # noqa: E731
        "batch": torch.tensor([0]), "start": torch.tensor([start]),
        "target": torch.randn(1, *shapes[m]), "has_target": torch.tensor([True]),
    }  # fmt: skip
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "media_batch": torch.zeros(0, dtype=torch.long), "media_pos": torch.zeros(0, dtype=torch.long),
             "media_vectors": torch.zeros(0, model.input_proj.in_features),
             "signals": {"image": group("image", len(ids)), "audio": group("audio", len(ids) + 4)}}  # fmt: skip
    out = trainer.module(batch)
    assert out["l2_image"] > 0 and out["l2_image"].grad_fn is None  # watched, no graph
    assert out["l2_audio"].grad_fn is not None  # scale 1: trained
    assert torch.allclose(out["loss"], out["lm"] + out["l2_audio"])


def test_profile_steps_writes_where_the_time_went(model, data, tmp_path):
    with pytest.raises(ValueError, match="profile_steps"):
        TrainConfig(stage=1, output_dir=tmp_path / "x", profile_steps=-1)
    logs = []
    cfg = TrainConfig(stage=1, output_dir=tmp_path / "p", max_steps=4, batch_size=2, lr=1e-3, warmup_steps=1, progress=False, profile_steps=2)
    Trainer(model, cfg, log=logs.append).fit(load_stage_data(1, [data / "image_pairs.json"]))
    text = (tmp_path / "p" / "profile.txt").read_text()
    assert text.startswith("2 step(s) profiled:")
    for part in ("collate", "forward", "backward", "optimizer", "aten::mm"):
        assert part in text, part
    assert any("profile of 2 step(s)" in m for m in logs)


def test_an_unusable_input_file_is_a_clear_error_before_training(data, tmp_path, capsys):
    d = tmp_path / "data"
    shutil.copytree(data, d, ignore=shutil.ignore_patterns("other"))
    bad = sorted((d / "images").glob("*.png"))[1]
    bad.write_bytes(b"not a picture")
    rc = _cli("--stage", 1, "--data", d / "image_pairs.json", "--init", "none", "--steps", 2, "--batch-size", 2,
              "--features", tmp_path / "feats", "--output", tmp_path / "run")  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "an input file cannot be encoded" in err and bad.name in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
