"""`nextgpt train world`, `nextgpt eval world` and `nextgpt eval`: routing, errors, and real smoke runs.

Every run here writes under tmp folders: weights/small (the committed weights) is never written
(checked by `test_committed_weights_untouched`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bots.cli import main
from training.cli import world_eval_plan, world_train_plan

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "weights" / "small"


def _snapshot() -> dict[str, tuple[int, int]]:
    if not COMMITTED.is_dir():
        return {}
    return {str(p.relative_to(COMMITTED)): (p.stat().st_size, p.stat().st_mtime_ns) for p in COMMITTED.rglob("*") if p.is_file()}


_BEFORE = _snapshot()


def nextgpt(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "bots.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ), cwd=ROOT)  # fmt: skip


def _argparse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def _threads():
    """In-process runs set torch's thread count; put it back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---- fast: parsing, routing, errors ------------------------------------------------------------------


def test_world_help_imports_no_torch():
    code = (
        "import sys\nfrom bots.cli import main\n"
        "for argv in (['--help'], ['train', 'world', '--help'], ['eval', 'world', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for needle in ("train world", "eval world", "--only PART", "--smoke", "--weights DIR"):
        assert needle in r.stdout


@pytest.mark.parametrize("command", ["train", "eval"])
def test_unknown_part_is_named(capsys, command):
    err = _argparse_error(capsys, [command, "world", "--only", "bogus"])
    assert f"nextgpt {command} world: error" in err and "unknown part 'bogus'" in err and "encoder, image, audio, video" in err
    err = _argparse_error(capsys, [command, "world", "--only", "encoder,imag"])
    assert "unknown part 'imag'" in err
    err = _argparse_error(capsys, [command, "world", "--threads", "0"])
    assert "--threads" in err and "1 or more" in err
    err = _argparse_error(capsys, [command, "world", "--frobnicate"])
    assert "unrecognized arguments: --frobnicate" in err


def test_smoke_never_targets_the_committed_weights(capsys):
    for out in ("weights/small", str(COMMITTED), str(COMMITTED) + "/"):
        assert main(["train", "world", "--smoke", "--out", out]) == 2
        err = capsys.readouterr().err
        assert "refusing to write smoke weights" in err and "--out" in err


def test_no_resume_is_for_the_encoder_only(capsys):
    assert main(["train", "world", "--no-resume"]) == 2
    assert "--no-resume applies to the encoder only" in capsys.readouterr().err
    _, _, plan = world_train_plan(["--no-resume", "--only", "encoder", "--out", "x"])
    assert plan == [("encoder", ["train", "--out", str(Path("x/imagebind")), "--no-resume"])]


def test_train_world_plan_matches_the_make_target(tmp_path):
    # `make train-world` = encoder_train train --threads 2, then training.decoders train --modality all --threads 2
    _, root, plan = world_train_plan(["--threads", "2"])
    assert root == Path("weights/small")
    assert plan == [
        ("encoder", ["train", "--out", str(Path("weights/small/imagebind")), "--threads", "2"]),
        ("decoders", ["train", "--modality", "all", "--out", "weights/small", "--threads", "2"]),
    ]
    # parts, smoke, work, seed, encoder options
    _, root, plan = world_train_plan(["--smoke", "--work", str(tmp_path), "--only", "video", "--only", "image,video", "--seed", "7"])
    assert root == tmp_path / "weights"
    assert plan == [
        ("decoders", ["train", "--modality", m, "--out", str(root), "--smoke", "--seed", "7", "--work", str(tmp_path)])
        for m in ("image", "video")
    ]
    _, _, plan = world_train_plan(["--only", "encoder", "--out", str(tmp_path), "--encoder-steps", "5", "--no-eval", "--eval-n", "9", "--quiet"])
    assert plan == [("encoder", ["train", "--out", str(tmp_path / "imagebind"), "--quiet", "--steps", "5", "--no-eval", "--eval-n", "9"])]


def test_smoke_default_output_is_under_the_cache():
    _, root, _ = world_train_plan(["--smoke"])
    cache = Path(os.environ["NEXTGPT_CACHE"]).expanduser().resolve()
    assert root.resolve().is_relative_to(cache) and not root.resolve().is_relative_to(COMMITTED)


def test_eval_world_names_missing_weights(capsys, tmp_path):
    assert main(["eval", "world", "--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no trained weights for encoder" in err and str(tmp_path / "imagebind" / "model.safetensors") in err
    for m in ("image", "audio", "video"):
        assert str(tmp_path / m / "model_index.json") in err
    assert main(["eval", "world", "--weights", str(tmp_path), "--only", "audio"]) == 2
    err = capsys.readouterr().err
    assert "audio" in err and "encoder" not in err and "image" not in err


def test_eval_world_plan_matches_the_make_target(tmp_path):
    for d in ("imagebind", "image", "audio", "video"):
        (tmp_path / d).mkdir()
    (tmp_path / "imagebind" / "model.safetensors").write_bytes(b"")
    for m in ("image", "audio", "video"):
        (tmp_path / m / "model_index.json").write_text("{}")
    _, _, plan = world_eval_plan(["--weights", str(tmp_path)])
    assert plan == [("encoder", ["eval", "--weights", str(tmp_path / "imagebind")]),
                    ("decoders", ["eval", "--weights", str(tmp_path), "--modality", "all"])]  # fmt: skip
    _, _, plan = world_eval_plan(["--weights", str(tmp_path), "--only", "audio", "--n", "3", "--seed", "5", "--threads", "2"])
    assert plan == [("decoders", ["eval", "--weights", str(tmp_path), "--modality", "audio", "--threads", "2", "--seed", "5", "--n", "3"])]


def test_train_and_eval_pass_everything_else_through(monkeypatch):
    import training.evaluate
    import training.stages

    calls = []
    monkeypatch.setattr(training.stages, "main", lambda argv: calls.append(("train", argv)) or 0)
    monkeypatch.setattr(training.evaluate, "main", lambda argv: calls.append(("eval", argv)) or 0)
    assert main(["--config", "c.yaml", "train", "--stage", "1", "--data", "d.json", "--resume"]) == 0
    assert main(["eval", "--profile", "small", "--n", "3", "--json"]) == 0
    assert main(["eval"]) == 0  # no profile: training.evaluate's default
    assert main(["--config", "c.yaml", "eval", "-p", "tiny"]) == 0
    assert calls == [
        ("train", ["--stage", "1", "--data", "d.json", "--resume", "--config", "c.yaml"]),
        ("eval", ["--profile", "small", "--n", "3", "--json"]),
        ("eval", []),
        ("eval", ["-p", "tiny", "--config", "c.yaml"]),
    ]


def test_eval_and_train_errors_come_from_their_own_parsers(capsys):
    err = _argparse_error(capsys, ["eval", "--bogus"])
    assert "nextgpt eval: error: unrecognized arguments: --bogus" in err
    err = _argparse_error(capsys, ["train", "--stage", "9"])
    assert "nextgpt train: error: argument --stage" in err


# ---- real runs ------------------------------------------------------------------------------------


def test_train_world_smoke_encoder_only(tmp_path, capsys, _threads):
    out = tmp_path / "w"
    assert main(["train", "world", "--smoke", "--only", "encoder", "--out", str(out), "--encoder-steps", "2", "--quiet", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"== encoder (ImageBind-small) → {out / 'imagebind'}" in printed and "trained 2 steps" in printed
    assert sorted(p.name for p in (out / "imagebind").iterdir()) == ["arch.json", "model.safetensors", "train.json"]
    assert sorted(p.name for p in out.iterdir()) == ["imagebind"]  # no decoder was trained


@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory):
    """`nextgpt train world --smoke` (encoder + the three decoders) into a temp folder, once."""
    base = tmp_path_factory.mktemp("cli-world")
    r = nextgpt("train", "world", "--smoke", "--out", base / "w", "--work", base / "work", "--threads", "1", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    return base / "w", r


@pytest.mark.slow
def test_train_world_smoke_writes_every_part(smoke_world):
    out, r = smoke_world
    assert "Traceback" not in r.stderr
    assert "== encoder" in r.stdout and "== decoders (image, audio, video)" in r.stdout and f"world weights: {out}" in r.stdout
    assert (out / "imagebind" / "model.safetensors").is_file() and (out / "imagebind" / "arch.json").is_file()
    for m in ("image", "audio", "video"):
        assert (out / m / "model_index.json").is_file() and (out / m / "nextgpt_world.json").is_file()


@pytest.mark.slow
def test_eval_world_on_the_smoke_weights_prints_both_tables(smoke_world):
    out, _ = smoke_world
    r = nextgpt("eval", "world", "--weights", out, "--n", "1", "--threads", "1")
    assert "Traceback" not in r.stderr
    assert "ImageBind (small) caption retrieval" in r.stdout  # the encoder's table
    assert "world decoders: analyzer accuracy" in r.stdout and "one generation" in r.stdout  # the decoders' tables
    assert r.returncode in (0, 1), r.stderr  # 1: a toy decoder misses its target (said on stderr)
    assert (r.returncode == 1) == ("below target" in r.stderr)


def test_committed_weights_untouched():
    assert _snapshot() == _BEFORE
