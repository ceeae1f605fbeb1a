"""Property-based tests (Hypothesis) over the untrusted edges (issue 17): prompt text, /set values and
CLI numbers, attachment bytes, config YAML. The invariant everywhere: a one-line error (a ValueError
subclass naming the problem) or a normal result; the session still works on the next turn; never
another exception. Small example counts and no deadline keep the whole file well under a minute."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nextgpt.tokens import NEW_TOKENS

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SLOW = settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

MARKERS = NEW_TOKENS + ["### Human:", "### Assistant:", "###", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "\x00", "\x1b[2J", "\r"]
hostile_text = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(MARKERS)), max_size=8).map("".join)


def one_line(err: BaseException) -> bool:
    return "\n" not in str(err).strip() and str(err).strip() != ""


# ------------------------------------------------------------------------------------------ prompt text


@FAST
@given(user=hostile_text, reply=hostile_text, n_media=st.integers(0, 2))
def test_no_text_becomes_a_token_or_a_slot(tiny_model, media_files, user, reply, n_media):
    from nextgpt.model import MediaInput, Message

    media = [MediaInput("image", path=media_files["red.png"])] * n_media
    _, keys = tiny_model.build_inputs([Message("user", user, media), Message("assistant", reply), Message("user", user)])
    added = set(tiny_model.tokenizer.get_added_vocab().values())
    ids = [k for k in keys if isinstance(k, int)]
    signals = tiny_model.all_signal_ids
    text_specials = [i for i in ids[1:] if i in added and i not in signals and i not in (tiny_model.media_start_id, tiny_model.media_end_id)]
    assert text_specials == []  # no <s>, </s>, <|im_start|> … from text
    assert sum(isinstance(k, tuple) for k in keys) == n_media == ids.count(tiny_model.media_start_id)
    user_signals = [i for i in ids if i in signals]  # only the assistant trace's own, which the user cannot write
    assert len(user_signals) <= reply.count("[") * 1


@SLOW
@given(text=hostile_text)
def test_any_prompt_gets_a_reply_or_one_line_and_the_session_goes_on(tiny_assistant, text):
    from assistant.session import Chat
    from memory import Memory
    from nextgpt.limits import check_chat_message

    with tempfile.TemporaryDirectory() as d, Memory.open(data_dir=Path(d)) as memory:
        chat = Chat.start(tiny_assistant, memory)
        chat.settings.max_new_tokens = 4
        try:
            check_chat_message(chat, text)
            chat.send(text)
        except ValueError as e:
            assert one_line(e)
        assert chat.send("and now?").finish_reason in ("eos", "length", "stop", "repetition")


# ------------------------------------------------------------------------------------------ /set values, CLI numbers

SETTING_KEYS = ["seed", "steps", "guidance", "temperature", "top_p", "max_new_tokens", "max_tokens", "bogus", ""]
numberish = st.one_of(st.integers().map(str), st.floats(allow_nan=True, allow_infinity=True).map(str), st.text(max_size=12),
                      st.sampled_from(["default", "1e400", "-0", "nan", "inf", "9" * 40, "0x10", " 3 ", "1_000"]))


@FAST
@given(key=st.sampled_from(SETTING_KEYS), value=numberish)
def test_set_values_are_applied_or_refused_in_one_line(key, value):
    import math

    from assistant.session import ChatSettings
    from nextgpt.limits import SEED_MAX, parse_seed

    s = ChatSettings()
    try:
        if key == "seed" and value.lower() not in ("default", "none", "auto"):
            value = str(parse_seed(value))  # as /seed, /set seed and Discord's /settings do
        s.set(key, value)
    except ValueError as e:
        assert one_line(e)
        return
    for name in ("steps", "guidance", "temperature", "top_p", "max_new_tokens"):
        v = getattr(s, name)
        assert v is None or math.isfinite(v)
    assert s.seed is None or 0 <= s.seed <= SEED_MAX


@FAST
@given(value=numberish)
def test_cli_seed_is_a_valid_seed_or_a_usage_error(value):
    from bots.cli import build_parser
    from nextgpt.limits import SEED_MAX

    assume(not value.startswith("-"))  # argparse reads those as options
    try:
        args = build_parser().parse_args(["ask", "--seed", value, "hi"])
    except SystemExit as e:
        assert e.code == 2
        return
    assert 0 <= args.seed <= SEED_MAX


# ------------------------------------------------------------------------------------------ attachment bytes


def _valid_files(media_files) -> dict[str, bytes]:
    import soundfile as sf

    out = {name: media_files[name].read_bytes() for name in ("red.png", "beep.wav", "move.mp4")}
    buf = io.BytesIO()
    sf.write(buf, np.sin(np.arange(8000) / 5).astype(np.float32), 8000, format="FLAC")
    out["beep.flac"] = buf.getvalue()
    return out


@st.composite
def mutated(draw, files):
    name = draw(st.sampled_from(sorted(files)))
    data = bytearray(files[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "zero_run", "huge_field"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[max(8, at):]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "zero_run":
            data[at:at + 64] = bytes(len(data[at:at + 64]))
        else:  # a size, length or count field set to its maximum
            data[at:at + 4] = b"\xff\xff\xff\x7f"
    return name, bytes(data)


@pytest.fixture(scope="module")
def valid_files(media_files):
    return _valid_files(media_files)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_mutated_attachments_load_or_fail_in_one_line(valid_files, data):
    from nextgpt.media import AttachmentError, load_audio, load_image, load_video, validate_attachment

    name, blob = data.draw(mutated(valid_files))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(blob)
        try:
            modality = validate_attachment(path)
            {"image": load_image, "audio": load_audio, "video": load_video}[modality](path)
        except AttachmentError as e:
            assert one_line(e) and str(path) in str(e)


# ------------------------------------------------------------------------------------------ config YAML

TINY = {
    "default_profile": "tiny",
    "profiles": {"tiny": yaml.safe_load((Path(__file__).resolve().parent.parent / "config.yaml").read_text())["profiles"]["tiny"]},
}
yaml_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                          max_leaves=6)


@FAST
@given(path=st.lists(st.sampled_from(["profiles", "tiny", "llm", "generation", "decoders", "image", "seed", "steps",
                                      "default_profile", "source", "threads", "dtype", "defualt_profile"]), min_size=1, max_size=4),
       value=yaml_value)
def test_config_yaml_loads_or_names_the_problem(tmp_path_factory, path, value):
    import copy

    from nextgpt.config import ConfigError, load_settings

    raw = copy.deepcopy(TINY)
    node = raw
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    f = tmp_path_factory.mktemp("cfg") / "config.yaml"
    f.write_text(yaml.safe_dump(raw))
    try:
        s = load_settings(f)
        s.profile()
    except ConfigError as e:
        assert all(line.startswith(str(f)) for line in str(e).splitlines())  # every problem names the file
