"""The fake Discord (tests/fake_discord.py) keeps Discord's documented contract: what Discord
refuses, it refuses, with Discord's status and error JSON. Checked with raw HTTP requests and with
discord.py's own HTTP client (its 429 retry path). No model, no bot: fast."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest

try:
    from tests.fake_discord import FakeDiscord
except ImportError:  # pytest's rootdir-relative imports
    from fake_discord import FakeDiscord


@pytest.fixture
def fake():
    fake = FakeDiscord().start()
    guild = fake.add_guild()
    fake.general = fake.add_channel(guild, "general")
    fake.alice = fake.add_user("alice", guild)
    with fake.patched():
        yield fake
    fake.stop()


def request(fake, method: str, path: str, payload: dict | None = None, files: dict[str, bytes] | None = None,
            bot: bool = True) -> tuple[int, dict]:
    """One raw request to the fake's REST API: (status, JSON body or {})."""

    async def go():
        headers = {"Authorization": f"Bot {fake.token}"} if bot else {}
        if files:
            form = aiohttp.FormData(quote_fields=False)
            form.add_field("payload_json", json.dumps(payload or {}), content_type="application/json")
            for i, (name, data) in enumerate(files.items()):
                form.add_field(f"files[{i}]", data, filename=name, content_type="application/octet-stream")
            kwargs = {"data": form}
        else:
            kwargs = {"json": payload} if payload is not None else {}
        async with aiohttp.ClientSession() as s:
            async with s.request(method, f"{fake.base}/api/v10{path}", headers=headers, **kwargs) as r:
                text = await r.text()
                return r.status, (json.loads(text) if text else {})

    return fake.call(go)


def interaction(fake, *, age: float = 0.0):
    """A slash-command interaction created `age` seconds ago."""
    return fake.call(lambda: fake._interaction(fake.alice, fake.general, 2, {"id": "1", "name": "x", "type": 1},
                                               created=time.time() - age))


def test_message_limits_are_discords(fake):
    path = f"/channels/{fake.general}/messages"
    assert request(fake, "POST", path, {"content": "x" * 2000})[0] == 200
    status, body = request(fake, "POST", path, {"content": "x" * 2001})
    assert (status, body["code"], body["message"]) == (400, 50035, "Invalid Form Body")
    assert body["errors"]["content"]["_errors"][0]["code"] == "BASE_TYPE_MAX_LENGTH"
    status, body = request(fake, "POST", path, {"embeds": [{"description": "d" * 4097}]})
    assert status == 400 and "description" in body["errors"]["embeds"]["0"]
    assert request(fake, "POST", path, {"embeds": [{"description": "d" * 4096}]})[0] == 200
    assert request(fake, "POST", path, {"embeds": [{"title": "t"}] * 11})[0] == 400
    ten = {f"f{i}.txt": b"x" for i in range(10)}
    assert request(fake, "POST", path, {"content": "ten files"}, ten)[0] == 200
    status, body = request(fake, "POST", path, {"content": "eleven"}, {**ten, "f10.txt": b"x"})
    assert status == 400 and body["code"] == 50035 and "attachments" in body["errors"]
    status, body = request(fake, "POST", path, {})
    assert (status, body["code"]) == (400, 50006)
    row = {"type": 1, "components": [{"type": 2, "style": 2, "custom_id": f"b{i}", "label": "b"} for i in range(6)]}
    assert request(fake, "POST", path, {"content": "buttons", "components": [row]})[0] == 400
    # the edit of a message keeps the same rules
    mid = request(fake, "POST", path, {"content": "short"})[1]["id"]
    assert request(fake, "PATCH", f"{path}/{mid}", {"content": "y" * 2001})[0] == 400
    assert request(fake, "PATCH", f"{path}/{mid}", {"content": "y" * 2000})[0] == 200
    assert request(fake, "POST", path, {"content": "no token"}, bot=False)[0] == 401


def test_upload_limits_are_the_guilds_and_the_interactions(fake):
    path = f"/channels/{fake.general}/messages"
    limit = 10 * 2**20  # an unboosted guild
    status, body = request(fake, "POST", path, {"content": "big"}, {"a.bin": b"\0" * (limit // 2), "b.bin": b"\0" * (limit // 2 + 1)})
    assert (status, body["code"], body["message"]) == (413, 40005, "Request entity too large")  # together over the limit
    assert request(fake, "POST", path, {"content": "fits"}, {"a.bin": b"\0" * limit})[0] == 200
    # an interaction's responses: the attachment_size_limit it was sent with
    fake.upload_limit = 1000
    itx = interaction(fake)
    assert itx.payload["attachment_size_limit"] == 1000
    assert request(fake, "POST", f"/interactions/{itx.id}/{itx.token}/callback", {"type": 5}, bot=False)[0] == 200
    original = f"/webhooks/{fake.app_id}/{itx.token}/messages/@original"
    status, body = request(fake, "PATCH", original, {"content": "x", "attachments": [{"id": 0, "filename": "a.bin"}]},
                           {"a.bin": b"\0" * 1001}, bot=False)
    assert (status, body["code"]) == (413, 40005)
    assert request(fake, "PATCH", original, {"content": "x", "attachments": [{"id": 0, "filename": "a.bin"}]},
                   {"a.bin": b"\0" * 1000}, bot=False)[0] == 200
    assert request(fake, "PATCH", original, {"content": "z" * 2001}, bot=False)[0] == 400


def test_interaction_deadlines_and_one_acknowledgement(fake):
    itx = interaction(fake)
    callback = f"/interactions/{itx.id}/{itx.token}/callback"
    assert request(fake, "POST", callback, {"type": 5}, bot=False)[0] == 200
    status, body = request(fake, "POST", callback, {"type": 4, "data": {"content": "again"}}, bot=False)
    assert (status, body["code"]) == (400, 40060)  # acknowledged once only
    late = interaction(fake, age=3.2)  # the bot answers more than 3 s after the interaction was created
    status, body = request(fake, "POST", f"/interactions/{late.id}/{late.token}/callback", {"type": 5}, bot=False)
    assert (status, body["code"]) == (404, 10062)
    original = f"/webhooks/{fake.app_id}/{itx.token}/messages/@original"
    assert request(fake, "PATCH", original, {"content": "within 15 minutes"}, bot=False)[0] == 200
    itx.created -= 15 * 60  # as if 15 minutes had passed
    status, body = request(fake, "PATCH", original, {"content": "too late"}, bot=False)
    assert (status, body["code"]) == (401, 50027)
    assert request(fake, "POST", f"/webhooks/{fake.app_id}/{itx.token}", {"content": "follow-up"}, bot=False)[0] == 401


def test_429_budget_runs_discord_pys_retry(fake):
    """Over the budget Discord answers 429 + retry_after; discord.py waits that long and retries."""
    import discord

    fake.rate_limit = (2, 0.4)

    async def send_five():
        http = discord.http.HTTPClient(fake.loop)
        await http.static_login(fake.token)
        try:
            started = time.monotonic()
            for i in range(5):
                await http.send_message(fake.general, params=discord.http.handle_message_parameters(content=f"m{i}"))
            return time.monotonic() - started
        finally:
            await http.close()

    took = fake.call(send_five)
    sent = [m["content"] for m in fake.channel_messages(fake.general)]
    assert sent == [f"m{i}" for i in range(5)]  # every message arrived, once, in order
    assert len(fake.throttled) >= 2 and took >= 0.7  # 2 per 0.4 s: at least two full waits
    status, body = request(fake, "POST", f"/channels/{fake.general}/messages", {"content": "raw"})
    if status == 429:  # (the raw request may land in a fresh window)
        assert body["retry_after"] > 0 and body["global"] is False
