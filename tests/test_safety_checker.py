"""Stable Diffusion's safety checker stays on where the pipeline ships one: a flagged image is
withheld (never written) and the reply says so; a profile (`safety_checker: false`) or a Discord
server (/settings safety_checker off) can turn it off; pipelines without one (tiny, small) need none.

The checker here is a real `StableDiffusionSafetyChecker` at toy size (built from a CLIPConfig):
its concept thresholds decide — below −1 every image scores above them (flagged), above 1 none does.
"""

import json

import pytest
import torch

from nextgpt.config import DecoderConfig
from tools.base import ContentWithheld
from tools.image import ImageTool


def _pipeline_with_checker(path, threshold):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from tools import tiny

    pipe = tiny.build_tiny("image")
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=100), vision_config=dict(small, image_size=32, patch_size=8),
                        projection_dim=8)  # fmt: skip
    checker = StableDiffusionSafetyChecker(config).eval()
    checker.concept_embeds_weights.data.fill_(threshold)  # score = cosine − threshold; > 0 flags
    checker.special_care_embeds_weights.data.fill_(threshold)
    pipe.register_modules(safety_checker=checker, feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                                       crop_size={"height": 32, "width": 32}))  # fmt: skip
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-with-checker")
    return {"flags": _pipeline_with_checker(root / "flags", -2.0), "passes": _pipeline_with_checker(root / "passes", 2.0)}


def _tool(source, tmp_path, **cfg):
    return ImageTool(DecoderConfig(source=str(source), device="cpu", steps=2, height=32, width=32, **cfg),
                     tmp_path / "cache", tmp_path / "out")  # fmt: skip


def _pngs(tmp_path):
    return sorted((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else []


EMBEDS = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))


def test_a_flagged_image_is_withheld_and_never_written(sd, tmp_path):
    tool = _tool(sd["flags"], tmp_path)
    assert tool.cfg.safety_checker  # on by default
    with pytest.raises(ContentWithheld, match="the image was withheld: the decoder's safety checker flagged it"):
        tool(EMBEDS, seed=1)
    assert _pngs(tmp_path) == []
    assert tool.safety_checker is not None and tool.pipeline.safety_checker is None  # the tool runs it, per call
    [out] = tool(EMBEDS, seed=1, safety_checker=False)  # one call may skip it (a server that turned it off)
    assert _pngs(tmp_path) == [out.path]
    with pytest.raises(ContentWithheld, match=r"batch rows 0, 1"):  # several rows: none of the call is written
        tool(EMBEDS.repeat(2, 1, 1), seed=[1, 2])
    assert _pngs(tmp_path) == [out.path]


def test_an_image_the_checker_passes_is_written_unchanged(sd, tmp_path):
    tool = _tool(sd["passes"], tmp_path)
    [checked] = tool(EMBEDS, seed=1)
    [unchecked] = tool(EMBEDS, seed=1, safety_checker=False)
    assert checked.path.is_file() and checked.sha256 == unchecked.sha256  # the checker only judges


def test_a_profile_can_leave_it_out(sd, tmp_path):
    tool = _tool(sd["flags"], tmp_path, safety_checker=False)
    [out] = tool(EMBEDS, seed=1)
    assert out.path.is_file() and tool.safety_checker is None  # not even loaded
    [again] = tool(EMBEDS, seed=1, safety_checker=True)  # a server cannot turn on what the profile did not load
    assert again.path == out.path


def test_pipelines_without_a_checker_need_none(tmp_path, cache_dir, settings):
    from pathlib import Path

    for name in ("tiny", "small"):
        cfg = settings.profile(name).decoders["image"].model_copy(update={"steps": 2, "device": "cpu"})
        if name == "small" and not Path(cfg.source).is_dir():
            pytest.skip("weights/small is not here")
        tool = ImageTool(cfg, cache_dir, tmp_path / name)
        assert cfg.safety_checker  # the default: on, and nothing to run
        q = settings.profile(name).projectors["image"]
        [out] = tool(torch.randn(1, q.num_queries, q.out_dim), seed=0)
        assert out.path.is_file() and tool.safety_checker is None


# ------------------------------------------------------------------------------------------ the reply


@pytest.fixture(scope="module")
def checked_settings(sd, settings, tmp_path_factory):
    """The tiny profile with an image decoder that ships a checker flagging everything."""
    s = settings.model_copy(deep=True)
    s.profiles["tiny"].decoders["image"].source = str(sd["flags"])
    s.profiles["tiny"].decoders["image"].height = s.profiles["tiny"].decoders["image"].width = 32
    return s


def test_the_reply_says_an_image_was_withheld(checked_settings, tiny_model, tmp_path):
    from assistant.agent import Assistant
    from nextgpt.model import Message

    assistant = Assistant(checked_settings, "tiny", output_dir=tmp_path)
    assistant._model = tiny_model  # the same tiny LLM, already loaded
    reply = assistant.respond([Message("user", "draw")], want=["image"], seed=0, max_new_tokens=2)
    assert reply.media == [] and [(f.modality, f.withheld) for f in reply.failures] == [("image", True)]
    assert "the image was withheld" in reply.failures[0].error and isinstance(reply.text, str)
    # a setting like any other (a Discord server's /settings safety_checker off)
    reply = assistant.respond([Message("user", "draw")], want=["image"], seed=0, max_new_tokens=2, safety_checker=False)
    assert [m.modality for m in reply.media] == ["image"] and reply.failures == []


def test_ask_reports_it(checked_settings, tmp_path, capsys):
    import yaml

    from bots.cli import main

    raw = yaml.safe_load(checked_settings.source.read_text())
    raw["profiles"]["tiny"]["decoders"]["image"]["source"] = checked_settings.profiles["tiny"].decoders["image"].source
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(config), "ask", "-p", "tiny", "--want", "image", "--json", "--no-log", "--out",
                 str(tmp_path / "out"), "draw"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["media"] == [] and len(result["errors"]) == 1 and "the image was withheld" in result["errors"][0]


def test_a_discord_server_can_turn_it_off(checked_settings, tiny_model, tmp_path):
    from assistant.agent import Assistant
    from assistant.settings import ChatSettings, on_off
    from bots.discord.engine import Engine
    from memory import Memory

    assert "safety_checker" in ChatSettings.names()  # a Discord server's /settings keys are ChatSettings'
    assert (on_off("off"), on_off("ON"), on_off("default")) == (False, True, None)
    with pytest.raises(ValueError, match="on, off or default"):
        on_off("maybe")
    assistant = Assistant(checked_settings, "tiny", output_dir=tmp_path / "out")
    assistant._model = tiny_model
    memory = Memory.open(data_dir=tmp_path / "data")
    try:
        engine = Engine(assistant, memory)
        session = memory.create_session("t", "tiny").id
        on = engine.turn(None, session, text="draw", want=["image"], settings={"seed": 0, "max_new_tokens": 2})
        assert on.media == [] and on.failures[0].withheld
        off = engine.turn(None, session, text="draw", want=["image"],
                          settings={"seed": 0, "max_new_tokens": 2, "safety_checker": False})  # fmt: skip
        assert [m.modality for m in off.media] == ["image"] and off.failures == []
        again = engine.regenerate(None, session, settings={"safety_checker": False})
        assert [m.modality for m in again.media] == ["image"]
    finally:
        memory.close()
