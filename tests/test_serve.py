"""`nextgpt serve`: the real server on 127.0.0.1 (a subprocess, tiny profile), driven with the official
`openai` client: streaming and not, image and audio input, image output, images API, sessions, errors."""

import base64
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NEXTGPT = str(Path(sys.executable).with_name("nextgpt"))
KEY = "sk-test-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, the server's data dir)."""
    tmp = tmp_path_factory.mktemp("serve")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["serve"] = {"max_request_mb": 1, "max_attachment_mb": 0.25}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    port = _free_port()
    env = {**os.environ, "NEXTGPT_API_KEYS": KEY, "NEXTGPT_DATA": str(tmp / "data"), "OMP_NUM_THREADS": "1"}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([NEXTGPT, "--config", str(tmp / "config.yaml"), "serve", "--profile", "tiny", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (tmp / "server.log").read_text()
            time.sleep(0.1)
        yield base, tmp / "data"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def _data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def test_models_lists_one_model_per_profile(client):
    models = {m.id: m for m in client.models.list()}
    assert {"tiny", "small"} <= set(models)
    assert models["tiny"].model_extra["loaded"] and not models["small"].model_extra["loaded"]


def test_chat_streamed_and_not_give_the_same_reply(client):
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "seed": 1, "max_tokens": 16}  # seed 1: no signal group of its own
    done = client.chat.completions.create(**ask)
    text = done.choices[0].message.content
    assert text and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 16 and done.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == text
    assert chunks[-1].usage.total_tokens == done.usage.total_tokens
    # stop and temperature are honoured
    stop = text[4:6]
    cut = client.chat.completions.create(**ask, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)].rstrip() and cut.choices[0].finish_reason == "stop"
    greedy = {client.chat.completions.create(**{**ask, "seed": s}, temperature=0).choices[0].message.content for s in (1, 2)}
    assert len(greedy) == 1


def test_image_out_as_a_url_in_the_content_and_in_message_media(client, server):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "draw a red circle"}],
                                            modalities=["text", "image"], seed=3, max_tokens=8, stream=True)  # fmt: skip
    content, media = "", []
    for c in stream:
        delta = c.choices[0].delta
        content += delta.content or ""
        media += (delta.model_extra or {}).get("media") or []
    image = next(m for m in media if m["modality"] == "image")  # (the random tiny model may add others)
    assert image["mime_type"] == "image/png"
    assert f"\n\n![image]({server}/v1/files/{image['sha256']})" in content
    png = httpx.get(image["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert hashlib.sha256(png.content).hexdigest() == image["sha256"] and png.content.startswith(b"\x89PNG")


def test_image_and_audio_in(client, media_files):
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "what is this?"}], max_tokens=2)
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": _data_url(media_files["red.png"], "image/png")}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(media_files["beep.wav"].read_bytes()).decode(), "format": "wav"}},
    ]
    done = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=2)
    assert done.usage.prompt_tokens > plain.usage.prompt_tokens + 2  # two media slots: <Img> item </Img>
    file_url = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": media_files["blue.png"].as_uri()}}]}])  # fmt: skip
    assert file_url.usage.prompt_tokens > 0  # file: URLs work on loopback


def test_images_api_url_and_b64(client):
    b64 = client.images.generate(model="tiny", prompt="a red circle", response_format="b64_json", n=2, extra_body={"seed": 4})
    pngs = [base64.b64decode(d.b64_json) for d in b64.data]
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs) and pngs[0] != pngs[1]
    url = client.images.generate(model="tiny", prompt="a red circle", extra_body={"seed": 4})
    assert httpx.get(url.data[0].url).content == pngs[0]  # same seed, same file


def test_a_session_header_continues_a_memory_session(client):
    first = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, extra_headers={"X-NextGPT-Session": "new"})
    session = first.headers["X-NextGPT-Session"]
    assert first.parse().choices[0].message.model_extra["session"] == session
    second = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "and again"}], max_tokens=4,
                                            extra_headers={"X-NextGPT-Session": session})  # fmt: skip
    assert second.usage.prompt_tokens > first.parse().usage.prompt_tokens  # the history came from memory
    with pytest.raises(openai.NotFoundError, match="no session"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"X-NextGPT-Session": "ffffffff"})  # fmt: skip


def test_errors_are_openai_shaped(client, server, media_files, tmp_path):
    hello = [{"role": "user", "content": "hello"}]
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.chat.completions.create(model="tiny", messages=hello)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": "x"}}]}])
    assert "messages[0].content[0]: unsupported content part type 'file'" in e.value.message
    assert e.value.body["param"] == "messages[0].content[0].type"
    big = tmp_path / "big.png"  # 0.4 MiB: over the 0.25 MiB attachment limit, under the 1 MiB body limit
    big.write_bytes(media_files["red.png"].read_bytes() + b"\0" * 400_000)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(big, "image/png")}}]}])  # fmt: skip
    assert e.value.status_code == 413 and "messages[0].content[0]: file too large" in e.value.message
    huge = "x" * (2 * 2**20)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": huge}])
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError, match="not valid base64|unsupported file type"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}])  # fmt: skip
    with pytest.raises(openai.NotFoundError, match="this server runs 'tiny'"):
        client.chat.completions.create(model="small", messages=hello)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and 8192"):
        client.chat.completions.create(model="tiny", messages=hello, max_tokens=0)


def test_a_closed_stream_cancels_its_generation(client, served):
    from memory import Memory

    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=2000, stream=True,
        extra_headers={"X-NextGPT-Session": "new"})  # fmt: skip
    session = raw.headers["X-NextGPT-Session"]
    stream = raw.parse()
    next(iter(stream))
    stream.close()
    t0 = time.monotonic()
    done = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert done.choices[0].message.content is not None
    assert time.monotonic() - t0 < 20  # not behind a 2000-token reply (a session's reply must leave its
    # message room in the 2048-token context: Chat refuses a larger max_tokens before saving, as the CLI does)
    memory = Memory.open(data_dir=served[1])
    try:  # the user's message was saved; the abandoned reply was not
        assert [t.role for t in memory.turns(session)] == ["user"]
    finally:
        memory.close()


def test_no_keys_only_on_loopback():
    r = subprocess.run([NEXTGPT, "serve", "--host", "0.0.0.0", "--profile", "tiny"], capture_output=True, text=True,
                       env={**os.environ, "NEXTGPT_API_KEYS": ""}, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in r.stderr

