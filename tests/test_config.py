"""config.yaml validation: every bad key or value is an error that names it."""

import sys

import pytest
import yaml

from nextgpt.config import REPO_CONFIG, ConfigError, load_settings


def _write(tmp_path, mutate):
    raw = yaml.safe_load(REPO_CONFIG.read_text())
    mutate(raw)
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_repo_config_has_both_profiles():
    s = load_settings(REPO_CONFIG)
    assert {"tiny", "nextgpt-7b"} <= set(s.profiles)
    big = s.profile("nextgpt-7b")
    assert (big.projectors["image"].num_queries, big.projectors["image"].out_dim) == (77, 768)
    assert (big.projectors["video"].num_queries, big.projectors["video"].out_dim) == (77, 1024)
    assert (big.projectors["audio"].num_queries, big.projectors["audio"].out_dim) == (1, 512)
    assert big.decoders["video"].source == "cerspense/zeroscope_v2_576w"
    assert big.decoders["audio"].source == "cvssp/audioldm-l-full"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["profiles"]["tiny"]["llm"].update(dtpye="float32"), "profiles.tiny.llm.dtpye: unknown key"),
        (lambda r: r["profiles"]["tiny"]["llm"].update(dtype="float8"), "profiles.tiny.llm.dtype"),
        (lambda r: r["profiles"]["tiny"]["decoders"]["image"].update(steps=0), "profiles.tiny.decoders.image.steps"),
        (lambda r: r["profiles"]["tiny"]["decoders"]["image"].update(height=30), "multiple of 8"),
        (lambda r: r["profiles"]["tiny"]["decoders"].pop("audio"), "missing modalities: audio"),
        (lambda r: r.update(default_profile="nope"), "default_profile: 'nope' is not one of the profiles"),
        (lambda r: r["profiles"]["tiny"]["encoder"].update(device="tpu"), "profiles.tiny.encoder.device"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, mutate, expected):
    with pytest.raises(ConfigError) as e:
        load_settings(_write(tmp_path, mutate))
    assert expected in str(e.value)
    assert str(tmp_path / "config.yaml") in str(e.value)


def test_unknown_profile_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile .huge.; known profiles: tiny, small, nextgpt-7b"):
        load_settings(REPO_CONFIG).profile("huge")
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.yaml")


def test_invalid_yaml(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("profiles: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(p)


def test_discord_section_is_validated_by_the_bot_schema(tmp_path):
    from bots.discord.config import DiscordConfig
    from nextgpt.config import validate_section

    p = _write(tmp_path, lambda r: r.update(discord={"allow_dms": True, "per_user_queue_cap": 2}))
    cfg = validate_section(load_settings(p), "discord", DiscordConfig)
    assert cfg.allow_dms is True and cfg.per_user_queue_cap == 2
    bad = _write(tmp_path, lambda r: r.update(discord={"alow_dms": True}))
    with pytest.raises(ConfigError, match="discord.alow_dms: unknown key"):
        validate_section(load_settings(bad), "discord", DiscordConfig)


def test_llm_backend_auto_picks_llama_cpp_only_where_it_can_run(monkeypatch):
    import importlib.util

    s = load_settings(REPO_CONFIG)
    small = s.profile("small").llm
    assert small.backend == "auto"  # the embedded default runs on llama.cpp where `make setup` built it
    installed = importlib.util.find_spec("llama_cpp") is not None
    assert small.model_copy(update={"device": "cpu"}).resolved_backend() == ("llama_cpp" if installed else "transformers")
    # a GPU runs the transformers path; a non-GGUF source has nothing for llama.cpp; explicit values stay
    assert small.model_copy(update={"device": "cuda"}).resolved_backend() == "transformers"
    assert s.profile("tiny").llm.model_copy(update={"backend": "auto"}).resolved_backend() == "transformers"
    for name in ("transformers", "llama_cpp"):
        assert small.model_copy(update={"backend": name}).resolved_backend() == name
    assert s.profile("tiny").llm.backend == s.profile("nextgpt-7b").llm.backend == "transformers"
    # without llama-cpp-python, auto falls back to transformers
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert small.model_copy(update={"device": "cpu"}).resolved_backend() == "transformers"
    assert "not installed" in small.model_copy(update={"device": "cpu"}).backend_choice()[1]  # doctor's reason


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS auto asks torch about MPS")
@pytest.mark.parametrize("gpu_library", [None, "libtorch_cuda.so", "libtorch_hip.so"])
def test_llm_backend_auto_asks_torch_only_when_its_build_can_see_a_gpu(tmp_path, gpu_library):
    """`auto` on a CPU-only torch build decides without importing torch (2-3 s of a chat start): in a fresh
    process whose `torch` is a package that fails when imported, auto picks llama.cpp (where installed) from
    the build's libraries alone; a build with a CUDA or ROCm library is imported and asked."""
    import importlib.util
    import subprocess

    fake = tmp_path / "site" / "torch"
    (fake / "lib").mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    (fake / "lib" / "libtorch_cpu.so").write_text("")
    if gpu_library:
        (fake / "lib" / gpu_library).write_text("")
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
        "from nextgpt.config import REPO_CONFIG, load_settings\n"
        "llm = load_settings(REPO_CONFIG).profile('small').llm\n"
        "try:\n"
        "    print(llm.resolved_backend())\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    installed = importlib.util.find_spec("llama_cpp") is not None
    if gpu_library:
        expected = "torch was imported" if installed else "transformers"  # asked (or no llama.cpp to choose)
    else:
        expected = "llama_cpp" if installed else "transformers"
    assert out.stdout.strip() == expected


def test_llm_backend_is_validated(tmp_path):
    p = _write(tmp_path, lambda r: r["profiles"]["tiny"]["llm"].update(backend="llamacpp"))
    with pytest.raises(ConfigError, match="profiles.tiny.llm.backend"):
        load_settings(p)


def test_generation_sampling_is_what_generate_takes():
    """`GenerationConfig.sampling()`: the profile's settings as keywords `NextGPT.generate` accepts."""
    import inspect

    from nextgpt.model import NextGPT

    gen = load_settings(REPO_CONFIG).profile("small").generation
    kw = gen.sampling()
    assert set(kw) <= set(inspect.signature(NextGPT.generate).parameters)
    assert (kw["max_new_tokens"], kw["isolate_groups"], kw["top_k"]) == (gen.max_new_tokens, gen.isolate_groups, gen.top_k)
    assert gen.sampling(7)["max_new_tokens"] == 7
