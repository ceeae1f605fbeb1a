"""`nextgpt convert` end to end: a synthetic checkpoint with the official layout at tiny size is
converted and then loaded by a profile through NextGPT.from_profile; a wrong one is rejected."""

import copy

import pytest
import torch

from bots.cli import main
from nextgpt.checkpoint import official_layout
from nextgpt.doctor import encoder_dim


@pytest.fixture(scope="module")
def official(tmp_path_factory, settings, tiny_model):
    profile = settings.profile("tiny")
    config = copy.deepcopy(tiny_model.llm.config)
    config.vocab_size = len(tiny_model.tokenizer)
    layout = official_layout(config, encoder_dim(profile), profile.projectors, lora_rank=4)
    torch.manual_seed(0)
    state = {k: (torch.randn(shape) * 0.02).half() for k, shape in layout.items()}
    d = tmp_path_factory.mktemp("official")
    torch.save(state, d / "pytorch_model.pt")
    return d / "pytorch_model.pt", state


@pytest.mark.slow
def test_convert_then_load_through_the_profile(official, settings, cache_dir, tmp_path, capsys):
    src, state = official
    dst = tmp_path / "converted"
    assert main(["convert", "--profile", "tiny", str(src), str(dst)]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    from nextgpt.model import Message, NextGPT

    profile = settings.profile("tiny").model_copy(deep=True)
    profile.checkpoint = str(dst)
    model = NextGPT.from_profile(profile, cache_dir)
    assert torch.equal(model.input_proj.weight, state["llama_proj.weight"].float())
    fc = model.output_projectors["video"].fc.weight
    assert torch.equal(fc, state["gen_text_hidden_fcs_video.0.fc.weight"].float())
    rows = model.llm.get_input_embeddings().weight
    assert torch.equal(rows, state["llama_model.base_model.model.model.embed_tokens.weight"].float())
    reply = model.generate([Message("user", "hi")], want=["image"], seed=0, max_new_tokens=4)
    assert reply.signals[0].prompt_embeds.shape[-1] == profile.projectors["image"].out_dim


def test_convert_rejects_a_mismatched_checkpoint(official, tmp_path, capsys):
    src, state = official
    bad = dict(state)
    bad.pop("llama_proj.bias")
    bad["gen_text_hidden_fcs.0.fc.weight"] = torch.zeros(3, 3).half()
    bad["something.unexpected"] = torch.zeros(1).half()
    path = tmp_path / "pytorch_model.pt"
    torch.save(bad, path)
    assert main(["convert", "--profile", "tiny", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "llama_proj.bias" in err and "something.unexpected" in err and "gen_text_hidden_fcs.0.fc.weight" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main(["convert", "--profile", "tiny", str(tmp_path / "absent.pt"), str(tmp_path / "out")]) == 2


def test_convert_check_only_reads_and_reports(official, tmp_path, capsys):
    import re

    src, _ = official
    before = sorted(p.name for p in src.parent.iterdir())
    assert main(["convert", "--check", str(src)]) == 0
    out = capsys.readouterr().out
    assert "rank 4" in out and "float16" in out and "embedding and lm_head" in out
    assert re.search(r"image projector +64 → 32, transformer 1\+1 layers \(ff 64\), 8 queries × 32", out)
    assert re.search(r"^ +tiny +fits$", out, re.M)  # its LLM is built here, so checked too
    assert re.search(r"^ +nextgpt-7b +does not fit: .*gen_text_hidden_fcs\.0\.", out, re.M)
    assert sorted(p.name for p in src.parent.iterdir()) == before  # nothing written
    assert main(["convert", "--check", str(src), str(tmp_path / "out")]) == 2  # --check never writes
    assert not (tmp_path / "out").exists()


def test_convert_defaults_to_nextgpt_7b_and_fails_in_one_line(official, tmp_path, capsys):
    from bots.cli import build_parser

    convert = build_parser()._subparsers._group_actions[0].choices["convert"]
    assert "default: nextgpt-7b" in " ".join(convert.format_help().split())
    src, _ = official
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2  # no --profile: nextgpt-7b, whose Vicuna is not here
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "nextgpt-7b" in err and "vicuna_ckpt/7b_v0 does not exist" in err
    assert not (tmp_path / "out").exists()


def test_convert_names_the_profile_a_file_fits(official, tmp_path, capsys):
    import yaml

    from nextgpt.config import REPO_CONFIG

    raw = yaml.safe_load(REPO_CONFIG.read_text())
    tiny = raw["profiles"]["tiny"]
    wide = copy.deepcopy(tiny)
    wide["projectors"]["image"]["num_queries"] = 9
    raw.update(default_profile="tiny", profiles={"tiny": tiny, "tiny-wide": wide})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    src, _ = official
    assert main(["--config", str(config), "convert", "--profile", "tiny-wide", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gen_text_hidden_fcs.0.query_embs: expected (1, 9, 32), got (1, 8, 32)" in err
    assert "the file fits profile 'tiny': pass --profile tiny" in err
    assert not (tmp_path / "out").exists()
