"""The Discord bot end to end: real discord.py against an in-process fake of Discord (tests/fake_discord.py),
real queue, real memory and the tiny model. No connection to Discord's servers is made.

One bot serves the whole module (like one process serving a server); tests that change its
access configuration or queue limits put them back.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import time
import zlib
from types import SimpleNamespace

import pytest

try:
    from tests.fake_discord import ALL_PERMISSIONS, EPHEMERAL, FakeDiscord
except ImportError:  # pytest's rootdir-relative imports
    from fake_discord import ALL_PERMISSIONS, EPHEMERAL, FakeDiscord

STATUS = ("⏳ Queued", "⚙️ Generating", "⚙️ Thinking", "✍️ Writing")


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_assistant):
    from bots.discord.bot import NextGPTBot
    from bots.discord.config import DiscordConfig
    from bots.discord.engine import Engine
    from memory import Memory

    logs = Capture()
    root = logging.getLogger()
    root.addHandler(logs)
    levels = {name: logging.getLogger(name).level for name in ("discord", "bots")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)

    fake = FakeDiscord().start()
    guild = fake.add_guild("Test Server")
    general = fake.add_channel(guild, "general")
    random = fake.add_channel(guild, "random")
    artists = fake.add_role(guild, "artists")
    other_role = fake.add_role(guild, "moderators")
    users = {name: fake.add_user(name, guild, roles=[artists]) for name in ("alice", "bob", "carol", "dave")}
    admin = fake.add_user("admin", guild, roles=[artists], permissions=ALL_PERMISSIONS)
    data = tmp_path_factory.mktemp("discord-data")
    config = DiscordConfig(progress_interval_s=0.1, default_max_new_tokens=4, warmup=False,
                           per_user_queue_cap=3, rate_limit_per_minute=100)
    with fake.patched():
        memory = Memory.open(data_dir=data)
        bot = NextGPTBot(engine=Engine(tiny_assistant, memory), config=config, data_dir=data)
        running = fake.spawn(bot.start(fake.token))
        fake.wait(lambda: bot.is_ready() or running.done(), 60, "the bot to connect")
        assert not running.done(), running.exception()
        yield SimpleNamespace(fake=fake, bot=bot, memory=memory, guild=guild, general=general, random=random,
                              artists=artists, other_role=other_role, admin=admin, logs=logs, config=config, **users)
        fake.call(bot.close)
        running.result(30)
        memory.close()
    fake.stop()
    root.removeHandler(logs)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


# what Discord answers when a bot breaks its rules (tests/fake_discord.py): never expected from the bot
BROKEN_RULES = {50035: "invalid form body (a limit)", 40005: "request entity too large", 50006: "empty message",
                10062: "acknowledged after 3 s", 40060: "acknowledged twice"}


@pytest.fixture(autouse=True)
def keeps_discords_rules(env):
    """Every test of the bot: Discord (the fake) refused none of its requests for breaking a rule."""
    before = len(env.fake.rejected)
    yield
    broken = [(what, status, BROKEN_RULES[code]) for what, status, code in env.fake.rejected[before:] if code in BROKEN_RULES]
    assert not broken, broken


@contextlib.contextmanager
def guild_settings(env, **values):
    """Server defaults (as /settings sets them) for the duration."""
    for key, value in values.items():
        env.bot.store.set_guild_setting(env.guild, key, value)
    try:
        yield
    finally:
        for key in values:
            env.bot.store.set_guild_setting(env.guild, key, None)


@contextlib.contextmanager
def configured(env, **changes):
    env.bot.config = env.config.model_copy(update=changes)
    try:
        yield
    finally:
        env.bot.config = env.config


# ------------------------------------------------------------------------------------------------ helpers
def settled(msg) -> bool:
    return bool(msg) and not msg["flags"] & 128 and bool(msg["content"]) and not any(s in msg["content"] for s in STATUS)


def final_of(env, itx, timeout=120):
    env.fake.wait(lambda: settled(env.fake.original(itx)), timeout, f"the reply to interaction {itx.id}")
    return env.fake.original(itx)


def ephemeral_of(env, itx, timeout=30) -> str:
    """The text of the ephemeral answer an interaction got (as a response or a follow-up)."""

    def find():
        msgs = [env.fake.original(itx)] + [env.fake.messages.get(m) for m in itx.followups]
        for m in msgs:
            if m and m["flags"] & EPHEMERAL and m["content"]:
                return m["content"]
        return None

    return env.fake.wait(find, timeout, "an ephemeral reply")


def bot_replies(env, channel_id, after_id=0):
    """The bot's public messages in a channel (ephemeral answers are not part of the channel)."""
    return [m for m in env.fake.channel_messages(channel_id) if m["author"]["id"] == str(env.fake.app_id)
            and int(m["id"]) > int(after_id) and not m["flags"] & EPHEMERAL]


def attachment(msg, prefix):
    found = [a for a in msg["attachments"] if a["filename"].startswith(prefix)]
    assert found, f"no {prefix}* attachment in {[a['filename'] for a in msg['attachments']]}"
    return found[0]


def session_of(env, thread_id):
    return env.fake.call(lambda: env.bot._threads.get(int(thread_id)))


def cdn_bytes(env, attachment) -> bytes:
    return env.fake.cdn[attachment["url"].split("/cdn/", 1)[1]][0]


def png_bytes(size=(16, 16), colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width=30000, height=30000) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's calling card)."""
    b = bytearray(png_bytes((8, 8)))
    b[16:20], b[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, "big")
    return bytes(b)


# ------------------------------------------------------------------------------------------------ tests
def test_starts_and_registers_its_commands(env):
    fake = env.fake
    assert fake.command_names() == ["audio", "chat", "history", "imagine", "regenerate", "reset", "settings", "video"]
    chat = fake.command("chat")
    options = {o["name"]: o for o in chat["options"]}
    assert options["prompt"]["type"] == 3 and options["prompt"]["required"]
    assert options["attachment"]["type"] == 11 and not options["attachment"].get("required")
    assert chat["contexts"] == [0]  # guilds only: DMs are off by default
    settings = fake.command("settings")
    assert settings["default_member_permissions"] == str(1 << 5)  # Manage Server
    assert fake.identify["intents"] & (1 << 15)  # message content, for messages in chat threads
    auth = [r.headers.get("Authorization") for r in fake.requests if r.path == "/users/@me"]
    assert auth == [f"Bot {fake.token}"]
    assert not fake.unknown


def test_chat_defers_shows_progress_and_ends_with_files_and_buttons(env):
    fake = env.fake
    itx = fake.slash(env.alice, env.general, "imagine", prompt="a red square", seed=5, steps=30)
    msg = final_of(env, itx)
    assert itx.callback_type == 5 and itx.acked_at - itx.created < 3  # deferred within Discord's 3 s
    versions = [v["content"] for v in fake.versions(msg["id"])]
    assert any("⏳ Queued" in v for v in versions)
    assert any("⚙️ Generating 🖼️ image: step" in v for v in versions)  # progress while the decoder runs
    assert msg["content"].startswith(f"<@{env.alice}>: a red square")
    att = attachment(msg, "image-")  # (the tiny model's noise may ask for more media besides)
    assert att["filename"] == "image-5.png" and att["content_type"] == "image/png"
    from PIL import Image

    assert Image.open(io.BytesIO(cdn_bytes(env, att))).size == (32, 32)
    ids = [c["custom_id"] for row in msg["components"] for c in row["components"]]
    assert [i.split(":")[1] for i in ids] == ["reseed", "regen", "info"]
    # the reply is the starter of a thread that holds the session
    thread = fake.channels[int(msg["id"])]
    assert thread["type"] == 11 and thread["parent_id"] == str(env.general) and thread["name"] == "a red square"
    turns = env.memory.turns(session_of(env, thread["id"]))
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[1].media_out[0].meta["seed"] == 5
    # mass mentions are off on everything the bot sent
    sent = [r for r in fake.requests if isinstance(r.json, dict) and ("content" in r.json or "data" in r.json)]
    for r in sent:
        payload = r.json.get("data", r.json) if r.path.endswith("/callback") else r.json
        if "content" in payload or "allowed_mentions" in payload:
            assert payload.get("allowed_mentions", {}).get("parse") == [], (r.method, r.path, payload)


def test_messages_in_the_thread_continue_the_session(env):
    fake = env.fake
    itx = fake.slash(env.bob, env.general, "chat", prompt="hello there")
    msg = final_of(env, itx)
    thread_id = int(msg["id"])
    question = fake.say(env.bob, thread_id, "and another thing")  # no mention needed in the bot's thread
    reply = fake.wait(lambda: [m for m in bot_replies(env, thread_id, question["id"]) if settled(m)], 120, "the thread reply")[0]
    assert reply["message_reference"]["message_id"] == question["id"]
    turns = env.memory.turns(session_of(env, thread_id))
    assert [(t.role, t.text) for t in turns][::2] == [("user", "hello there"), ("user", "and another thing")]
    assert len(turns) == 4
    # elsewhere, a message that does not mention the bot is not for it
    ignored = fake.say(env.bob, env.general, "just chatting")
    # ... and one that mentions it opens a new chat thread from that message
    opener = fake.say(env.carol, env.general, "what is this?", mention_bot=True)
    fake.wait(lambda: int(opener["id"]) in fake.channels and [m for m in bot_replies(env, opener["id"]) if settled(m)],
              120, "a thread opened from a mention")
    assert fake.channels[int(opener["id"])]["parent_id"] == str(env.general)
    assert [t.text for t in env.memory.turns(session_of(env, opener["id"]))][:1] == ["what is this?"]
    assert not bot_replies(env, env.general, ignored["id"]) or all(
        m.get("message_reference", {}).get("message_id") != ignored["id"] for m in bot_replies(env, env.general))


def test_attachments_in_are_checked_and_stored(env):
    fake = env.fake
    threads_before = len(fake.threads())
    # a file that claims to be a PNG but is text: rejected by content, ephemerally, saying why
    fake_png = fake.upload("cat.png", b"this is not an image at all\n" * 4, "image/png")
    itx = fake.slash(env.alice, env.general, "chat", prompt="what's this?", attachment=fake_png)
    text = ephemeral_of(env, itx)
    assert "cat.png" in text and "unsupported file type" in text
    # too big (Discord tells us the size up front: refused before any download)
    huge = fake.upload("movie.mp4", b"\x00" * 64, "video/mp4", size=30 * 2**20)
    text = ephemeral_of(env, fake.slash(env.alice, env.general, "chat", prompt="x", attachment=huge))
    assert "movie.mp4" in text and "30.0 MiB" in text and "25.0 MiB" in text
    # a decompression bomb (header claims 30000×30000)
    bomb = fake.upload("bomb.png", bomb_png(), "image/png")
    text = ephemeral_of(env, fake.slash(env.alice, env.general, "chat", prompt="x", attachment=bomb))
    assert "bomb.png" in text and "30000x30000" in text and "decompression bomb" in text
    # not a media type at all
    doc = fake.upload("notes.txt", b"hello", "text/plain")
    assert "I take images, audio and video" in ephemeral_of(env, fake.slash(env.alice, env.general, "chat", prompt="x", attachment=doc))
    assert len(fake.threads()) == threads_before and env.bot.queue.waiting_count() == 0
    # a real image goes into the blob store with the user's turn
    data = png_bytes((24, 24))
    good = fake.upload("red.png", data, "image/png", width=24, height=24)
    msg = final_of(env, fake.slash(env.alice, env.general, "chat", prompt="describe it", attachment=good))
    [user_turn, _] = env.memory.turns(session_of(env, msg["id"]))
    [media] = user_turn.media_in
    assert media.modality == "image" and media.sha256 == hashlib.sha256(data).hexdigest()
    assert media.path.read_bytes() == data and env.memory.blobs.has(media.sha256)
    assert "📎 `red.png`" in msg["content"]
    # in a thread, a bad attachment gets a reply saying why (messages cannot be answered ephemerally)
    bad = fake.say(env.alice, int(msg["id"]), "and this?", attachments=[fake.upload("x.png", b"nope" * 10, "image/png")])
    notice = fake.wait(lambda: [m for m in bot_replies(env, msg["id"], bad["id"])], 30, "a notice")[0]
    assert "x.png" in notice["content"] and "unsupported file type" in notice["content"]
    assert len(env.memory.turns(session_of(env, msg["id"]))) == 2


def test_oversize_output_is_shrunk_to_the_upload_limit(env):
    fake = env.fake
    fake.upload_limit = 1500  # Discord's attachment_size_limit for these interactions
    try:
        msg = final_of(env, fake.slash(env.carol, env.general, "imagine", prompt="noise", seed=3))
        att = attachment(msg, "image-")
        assert att["filename"] == "image-3.jpg" and all(a["size"] <= 1500 for a in msg["attachments"])
        assert "upload limit of 1.5 KiB" in msg["content"]
        fake.upload_limit = 300  # nothing can be that small: said, with the size
        msg = final_of(env, fake.slash(env.carol, env.general, "video", prompt="clip", seed=3))
        assert not [a for a in msg["attachments"] if a["filename"].startswith("video-")]
        assert "could not be made to fit this server's upload limit of 300 bytes" in msg["content"]
        assert "KiB" in msg["content"].split("the video is ", 1)[1]
    finally:
        fake.upload_limit = 10 * 2**20


def test_three_users_jobs_interleave_fairly(env):
    fake, queue = env.fake, env.bot.queue
    a, b, c = (fake.call(lambda n=n: fake.add_user(n, env.guild)) for n in ("ann", "ben", "cat"))  # never served yet
    queue.pause()
    try:
        order = [("a1", a), ("a2", a), ("b1", b), ("b2", b), ("c1", c)]
        itxs = {}
        for name, user in order:
            itxs[name] = fake.slash(user, env.general, "chat", prompt=name)
            fake.wait(lambda n=name: fake.original(itxs[n]) and "Queued" in fake.original(itxs[n])["content"], 30)
        expected = {"a1": 1, "b1": 2, "c1": 3, "a2": 4, "b2": 5}
        # every reply shows its (updated) queue position
        fake.wait(lambda: all(f"position **{p}**" in (fake.original(itxs[n]) or {}).get("content", "")
                              for n, p in expected.items()), 30, "the queue positions")
    finally:
        queue.resume()
    finals = {name: final_of(env, itx) for name, itx in itxs.items()}
    done = {name: env.memory.turns(session_of(env, m["id"]))[-1].id for name, m in finals.items()}
    assert sorted(done, key=done.get) == ["a1", "b1", "c1", "a2", "b2"]


def test_per_user_cap_and_the_cancel_button(env):
    fake, queue = env.fake, env.bot.queue
    queue.pause()
    queue.per_user_cap = 2
    try:
        first = fake.slash(env.dave, env.general, "chat", prompt="one")
        second = fake.slash(env.dave, env.general, "chat", prompt="two")
        for itx in (first, second):
            fake.wait(lambda itx=itx: fake.original(itx) and fake.original(itx)["components"], 30, "a queued reply")
        threads = len(fake.threads())
        third = fake.slash(env.dave, env.general, "chat", prompt="three")
        assert "already have 2 jobs queued or running (limit 2)" in ephemeral_of(env, third)
        assert len(fake.threads()) == threads and queue.pending(env.dave) == 2
        [cancel] = [c["custom_id"] for row in fake.original(first)["components"] for c in row["components"]]
        assert cancel.startswith("ngpt:cancel:")
        assert "Only the person who asked can cancel" in ephemeral_of(env, fake.click(env.bob, fake.original(first)["id"], cancel))
        click = fake.click(env.dave, fake.original(first)["id"], cancel)
        fake.wait(lambda: fake.original(first)["content"].endswith("✖️ Cancelled."), 30, "the cancellation")
        assert click.callback_type == 6 and queue.pending(env.dave) == 1
        assert not fake.original(first)["components"]
        [cancel2] = [c["custom_id"] for row in fake.original(second)["components"] for c in row["components"]]
        fake.click(env.dave, fake.original(second)["id"], cancel2)
        fake.wait(lambda: fake.original(second)["content"].endswith("✖️ Cancelled."), 30)
        assert queue.pending(env.dave) == 0
    finally:
        queue.per_user_cap = env.config.per_user_queue_cap
        queue.resume()


def test_an_unlisted_channel_or_role_is_ignored(env):
    fake = env.fake
    with configured(env, allowed_channels=[env.general]):
        threads, requests = len(fake.threads()), len(fake.requests)
        itx = fake.slash(env.alice, env.random, "chat", prompt="hi")
        assert "not enabled in this channel" in ephemeral_of(env, itx)
        mention = fake.say(env.alice, env.random, "hello?", mention_bot=True)
        time.sleep(0.5)
        assert not bot_replies(env, env.random) and int(mention["id"]) not in fake.channels
        assert len(fake.threads()) == threads and env.bot.queue.waiting_count() == 0
        assert [r.path for r in fake.requests[requests:]] == [f"/interactions/{itx.id}/{itx.token}/callback"]
        assert "not enabled" in ephemeral_of(env, fake.slash(env.alice, env.random, "history"))
    with configured(env, allowed_roles=[env.other_role]):
        assert "roles that may use me" in ephemeral_of(env, fake.slash(env.alice, env.general, "history"))
    with configured(env, allowed_guilds=[12345]):
        assert "not enabled in this server" in ephemeral_of(env, fake.slash(env.alice, env.general, "history"))


def test_direct_messages_are_off_by_default(env):
    fake = env.fake
    dm = fake.call(lambda: fake.dm_channel(env.alice))
    said = fake.say(env.alice, dm, "hello in private")
    itx = fake.slash(env.alice, dm, "history")
    assert "direct messages" in ephemeral_of(env, itx)
    time.sleep(0.3)
    assert [m["id"] for m in fake.channel_messages(dm) if not m["flags"] & EPHEMERAL] == [said["id"]]
    with configured(env, allow_dms=True):  # when allowed, the DM itself is the session
        said = fake.say(env.alice, dm, "hello again")
        reply = fake.wait(lambda: [m for m in bot_replies(env, dm, said["id"]) if settled(m)], 120, "the DM reply")[0]
        assert reply["message_reference"]["message_id"] == said["id"]
        assert [t.text for t in env.memory.turns(session_of(env, dm))][:1] == ["hello again"]


def test_reset_starts_a_fresh_session_in_the_same_thread(env):
    fake = env.fake
    msg = final_of(env, fake.slash(env.dave, env.general, "chat", prompt="remember the number 7"))
    thread_id = int(msg["id"])
    before = session_of(env, thread_id)
    assert "Only the person who started" in ephemeral_of(env, fake.slash(env.alice, thread_id, "reset"))
    assert "inside one of my chat threads" in ephemeral_of(env, fake.slash(env.dave, env.general, "reset"))
    itx = fake.slash(env.dave, thread_id, "reset")
    fake.wait(lambda: fake.original(itx) and "Fresh start" in fake.original(itx)["content"], 30)
    after = session_of(env, thread_id)
    assert after != before and len(env.memory.turns(before)) == 2
    nothing = final_of(env, fake.slash(env.dave, thread_id, "regenerate"))
    assert "⚠️ nothing to regenerate" in nothing["content"]
    said = fake.say(env.dave, thread_id, "what was the number?")
    fake.wait(lambda: [m for m in bot_replies(env, thread_id, said["id"]) if settled(m)], 120, "the reply")
    assert [t.text for t in env.memory.turns(after)][:1] == ["what was the number?"]
    assert env.bot.store.current_chat(thread_id).session_id == after


def test_settings_need_manage_server(env):
    fake = env.fake
    itx = fake.slash(env.alice, env.general, "settings", key="steps", value="3")
    assert "Manage Server" in ephemeral_of(env, itx)
    assert env.bot.store.guild_settings(env.guild) == {}
    assert "now `3`" in ephemeral_of(env, fake.slash(env.admin, env.general, "settings", key="steps", value="3"))
    assert env.bot.store.guild_settings(env.guild) == {"steps": 3}
    assert "whole number" in ephemeral_of(env, fake.slash(env.admin, env.general, "settings", key="steps", value="lots"))
    shown = ephemeral_of(env, fake.slash(env.admin, env.general, "settings"))
    assert "`steps` = `3`" in shown and "`max_new_tokens` = `4`" in shown  # server value over the config's
    assert "profile default" in ephemeral_of(env, fake.slash(env.admin, env.general, "settings", key="steps", value="default"))
    assert env.bot.store.guild_settings(env.guild) == {}


def test_history_shows_only_the_callers_own_sessions(env):
    fake = env.fake
    itx = fake.slash(env.bob, env.general, "chat", prompt="my secret plan", private=True)
    opened = fake.wait(lambda: (m := fake.original(itx)) and "Private chat opened" in m["content"] and m, 30)
    assert opened["flags"] & EPHEMERAL
    [private] = [c for c in fake.threads() if c["type"] == 12 and c["name"] == "my secret plan"]
    assert fake.thread_members[int(private["id"])] == {fake.app_id, env.bob}
    fake.wait(lambda: [m for m in bot_replies(env, private["id"]) if settled(m)], 120, "the private reply")
    mine = ephemeral_of(env, fake.slash(env.bob, env.general, "history"))
    assert f"🔒 <#{private['id']}> — my secret plan" in mine
    theirs = ephemeral_of(env, fake.slash(env.carol, env.general, "history"))
    assert private["id"] not in theirs and "secret" not in theirs
    newcomer = fake.call(lambda: fake.add_user("erin", env.guild))
    assert "no chats here yet" in ephemeral_of(env, fake.slash(newcomer, env.general, "history"))


def test_buttons_info_reseed_and_regenerate(env):
    fake = env.fake
    msg = final_of(env, fake.slash(env.alice, env.general, "imagine", prompt="a blue circle", seed=7))
    ids = {c["custom_id"].split(":")[1]: c["custom_id"] for row in msg["components"] for c in row["components"]}
    info = ephemeral_of(env, fake.click(env.carol, msg["id"], ids["info"]))
    assert "seed `7`" in info and "steps `2`" in info and "guidance `7.5`" in info and "profile `tiny`" in info
    # someone else may not re-roll alice's chat
    assert "Only the person who started" in ephemeral_of(env, fake.click(env.bob, msg["id"], ids["reseed"]))
    # re-seed from the starter message: the new reply goes into the thread, with seed + 1
    thread_id = msg["id"]
    click = fake.click(env.alice, msg["id"], ids["reseed"])
    new = fake.wait(lambda: [m for m in bot_replies(env, thread_id) if settled(m) and m["attachments"]], 120, "the re-seeded reply")[0]
    assert click.callback_type == 6 and "🎲 re-seeded" in new["content"] and attachment(new, "image-")["filename"] == "image-8.png"
    turns = env.memory.turns(session_of(env, thread_id))
    assert len(turns) == 2 and turns[1].media_out[0].meta["seed"] == 8  # the reply was replaced, not added
    # the old reply's buttons no longer regenerate
    assert "Only the latest reply" in ephemeral_of(env, fake.click(env.alice, msg["id"], ids["regen"]))
    # /regenerate inside the thread answers there, through its own interaction
    itx = fake.slash(env.alice, int(thread_id), "regenerate")
    again = final_of(env, itx)
    assert "🔁 regenerated" in again["content"] and again["channel_id"] == thread_id
    assert attachment(again, "image-")["filename"] == "image-8.png"  # same seed as the reply it replaces


def test_after_the_interaction_token_expires_the_reply_is_posted_in_the_thread(env):
    fake, queue = env.fake, env.bot.queue
    queue.pause()
    try:
        itx = fake.slash(env.carol, env.general, "imagine", prompt="slow one", seed=1)
        fake.wait(lambda: (m := fake.original(itx)) and int(m["id"]) in fake.channels and "Queued" in m["content"], 30)
        fake.expire(itx)  # as if the job had waited more than 15 minutes
    finally:
        queue.resume()
    thread_id = fake.original(itx)["id"]
    late = fake.wait(lambda: [m for m in bot_replies(env, thread_id) if m["attachments"]], 120, "the late reply")[0]
    assert late["content"].startswith(f"<@{env.carol}>: slow one") and attachment(late, "image-")["size"] > 0
    mentions = late["_allowed_mentions"]  # pings the requester, nobody else
    assert mentions["parse"] == [] and mentions["users"] == [env.carol] and not mentions.get("roles")
    stale = fake.original(itx)
    assert "the reply was posted in the thread" in stale["content"] and not stale["components"]


def test_the_token_never_appears_in_logs(env):
    fake, logs = env.fake, env.logs
    assert any("logging in using static token" in line for line in logs.lines)
    assert any(r.headers.get("Authorization") == f"Bot {fake.token}" for r in fake.requests)  # it was used
    logging.getLogger("somewhere.else").error("leaked token=%s in %s", fake.token, "a message")
    try:
        raise RuntimeError(f"Improper token has been passed: {fake.token}")
    except RuntimeError:
        logging.getLogger("discord.client").exception("login failed")
    text = "\n".join(logs.lines)
    assert fake.token not in text
    assert "leaked token=[REDACTED] in a message" in text and "Improper token has been passed: [REDACTED]" in text


def test_a_reply_longer_than_discord_allows_is_clipped_and_attached_whole(env, monkeypatch):
    """Discord takes 2000 characters per message and the upload limit for all its files together: a
    long reply is clipped with its full text attached when that fits the limit, and said when not."""
    import dataclasses

    fake = env.fake
    model = env.bot.engine.assistant.model
    real_generate = model.generate
    story = " ".join(f"word{i}" for i in range(500))  # ~3900 characters

    def generate(messages, **kw):  # the real model's reply, lengthened (the tiny model stops early)
        out = real_generate(messages, **kw)
        return dataclasses.replace(out, text=f"{out.text} {story}") if "long story" in messages[-1].text else out

    monkeypatch.setattr(model, "generate", generate)

    def long_reply(prompt):
        msg = final_of(env, fake.slash(env.bob, env.general, "chat", prompt=prompt))
        return msg, env.memory.turns(session_of(env, msg["id"]))[-1].text

    msg, text = long_reply("tell me a long story")
    assert text.endswith(story)  # the whole reply is saved
    assert len(msg["content"]) <= 2000 and "*(full text attached)*" in msg["content"], msg["content"][-200:]
    assert cdn_bytes(env, attachment(msg, "reply.txt")).decode("utf-8") == text
    fake.upload_limit = 2000  # the whole text does not fit this server's uploads: clipped, and said so
    try:
        msg, text = long_reply("tell me another long story")
    finally:
        fake.upload_limit = 10 * 2**20
    assert len(text.encode()) > 2000 and len(msg["content"]) <= 2000
    assert not [a for a in msg["attachments"] if a["filename"] == "reply.txt"]
    assert "*(clipped)*" in msg["content"], msg["content"][-200:]


def test_a_slow_attachment_download_still_acknowledges_within_3_s(env):
    """The download takes longer than Discord's 3 s: the bot defers first, then finishes the check."""
    fake = env.fake
    data = png_bytes((24, 24), (30, 200, 30))
    slow = fake.upload("slow.png", data, "image/png", width=24, height=24, delay=4.0)
    itx = fake.slash(env.carol, env.general, "chat", prompt="describe the slow one", attachment=slow)
    msg = final_of(env, itx)
    assert itx.callback_type == 5 and itx.acked_at - itx.created < 3
    assert "📎 `slow.png`" in msg["content"]
    [media] = env.memory.turns(session_of(env, msg["id"]))[0].media_in
    assert media.sha256 == hashlib.sha256(data).hexdigest()
    # a slow download that turns out bad: the public placeholder goes, the answer is private
    threads = len(fake.threads())
    bad = fake.upload("late.png", b"not an image, and slow\n" * 4, "image/png", delay=4.0)
    itx = fake.slash(env.carol, env.general, "chat", prompt="and this", attachment=bad)
    text = ephemeral_of(env, itx, 30)
    assert itx.acked_at - itx.created < 3 and "late.png" in text and "unsupported file type" in text
    assert fake.original(itx) is None and len(fake.threads()) == threads


def test_the_event_loop_is_free_while_a_job_runs(env, monkeypatch):
    """Generation runs in the worker thread: while a job holds it, another user's command is still
    acknowledged at once (the loop never waits on the job)."""
    fake = env.fake
    model = env.bot.engine.assistant.model
    real_generate = model.generate
    inside, gate = threading.Event(), threading.Event()

    def generate(messages, **kw):  # the real model, held for up to 6 s at the start of one turn
        if "hold the worker" in messages[-1].text:
            inside.set()
            gate.wait(6)
        return real_generate(messages, **kw)

    monkeypatch.setattr(model, "generate", generate)
    itx = fake.slash(env.dave, env.general, "chat", prompt="hold the worker")
    try:
        assert inside.wait(60)
        asked = time.time()
        quick = fake.slash(env.alice, env.general, "history")
        fake.wait(lambda: quick.acked_at, 30, "the /history answer")
        assert quick.acked_at - asked < 1.5 and not gate.is_set(), quick.acked_at - asked
        assert "Queued" in fake.original(itx)["content"] or "Thinking" in fake.original(itx)["content"]
    finally:
        gate.set()
    assert settled(final_of(env, itx))


def test_rate_limited_requests_are_retried_and_nothing_is_lost(env):
    """Discord answers 429 over a route's budget; discord.py waits `retry_after` and retries: every
    progress edit and the reply still arrive."""
    fake = env.fake
    throttled = len(fake.throttled)
    fake.rate_limit = (1, 0.3)
    try:
        itx = fake.slash(env.alice, env.general, "imagine", prompt="under a rate limit", seed=9)
        msg = final_of(env, itx)
    finally:
        fake.rate_limit = None
    assert len(fake.throttled) > throttled  # the budget was met: 429s were answered
    assert msg["content"].startswith(f"<@{env.alice}>: under a rate limit") and attachment(msg, "image-")["filename"] == "image-9.png"
    assert any("Queued" in v["content"] for v in fake.versions(msg["id"]))  # progress was shown on the way
    assert not [line for line in env.logs.lines if "progress edit failed" in line or "could not post" in line]


def test_limits_come_before_any_download(env):
    """Issue 17: access → limits (attachment count, the per-user cap) → download. A user at the cap
    makes the bot fetch nothing: here the file's CDN entry is gone, so a download would say so."""
    fake, queue = env.fake, env.bot.queue
    msg = final_of(env, fake.slash(env.carol, env.general, "chat", prompt="start"))
    thread = int(msg["id"])
    many = [fake.upload(f"p{i}.png", png_bytes(), "image/png", width=16, height=16) for i in range(env.config.max_attachments + 1)]
    said = fake.say(env.carol, thread, "all of these", attachments=many)
    notice = fake.wait(lambda: bot_replies(env, thread, said["id"]), 30, "the attachment-count notice")[0]
    assert f"at most {env.config.max_attachments} per message" in notice["content"]
    queue.pause()
    queue.per_user_cap = 1
    try:
        hold = fake.slash(env.carol, thread, "chat", prompt="hold my place")  # the one job carol may have
        fake.wait(lambda: queue.pending(env.carol) == 1, 30, "the queued job")
        said = fake.say(env.carol, thread, "and this", attachments=[fake.upload("gone.png", b"x", "image/png")])
        fake.cdn.pop(next(p for p in fake.cdn if p.endswith("/gone.png")))
        notice = fake.wait(lambda: bot_replies(env, thread, said["id"]), 30, "the cap notice")[0]
        assert "limit 1" in notice["content"] and "couldn't download" not in notice["content"]
    finally:
        queue.per_user_cap = env.config.per_user_queue_cap
        queue.resume()
    final_of(env, hold)
    assert [t.text for t in env.memory.turns(session_of(env, thread)) if t.role == "user"] == ["start", "hold my place"]
