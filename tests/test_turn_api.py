"""One turn API for every front end (issue 15): the settings' one meaning of None, the one regenerate
rule, the two steps (generate, render) a caller drives itself, and the CLI chat and the Discord bot
agreeing on what a regenerate uses."""

from __future__ import annotations

import io

import pytest

try:
    from tests import test_discord as td
except ImportError:  # pytest's rootdir-relative imports
    import test_discord as td

env = td.env  # the Discord bot against the in-process fake Discord, with the tiny model
attachment, final_of, session_of, settled, bot_replies = td.attachment, td.final_of, td.session_of, td.settled, td.bot_replies

COMPARED = ("seed", "steps", "guidance", "temperature", "top_p", "max_new_tokens", "safety_checker", "want")


def test_none_means_not_set_here_and_the_profile_decides_last(settings):
    from assistant.settings import ChatSettings, regenerate_settings

    profile = settings.profile("tiny")
    layered = ChatSettings.layered({"steps": 3, "seed": 1}, ChatSettings(seed=None, guidance=2.0), {"steps": None})
    assert (layered.seed, layered.steps, layered.guidance) == (1, 3, 2.0)  # a None never overrides
    r = ChatSettings().resolved(profile)
    gen = profile.generation
    assert (r.seed, r.temperature, r.top_p, r.max_new_tokens) == (gen.seed, gen.temperature, gen.top_p, gen.max_new_tokens)
    assert r.steps is None and r.guidance is None  # each decoder's own value
    unseeded = profile.model_copy(update={"generation": gen.model_copy(update={"seed": None})})
    assert ChatSettings().resolved(unseeded).seed is not None  # every saved turn names its seed
    # regenerate: the replaced reply's seed/steps/guidance pinned over the current settings
    replaced = {"seed": 9, "steps": 3, "guidance": 1.5, "temperature": 0.1, "max_new_tokens": 5}
    again = regenerate_settings(ChatSettings(steps=7, temperature=0.5), replaced)
    assert (again.seed, again.steps, again.guidance, again.temperature, again.max_new_tokens) == (9, 3, 1.5, 0.5, None)
    assert regenerate_settings(ChatSettings(), replaced, reseed=True).seed == 10
    s = ChatSettings()
    assert s.set("max_tokens", "12") == "max_new_tokens" and s.max_new_tokens == 12
    s.set("safety_checker", "off")
    assert s.safety_checker is False


def test_render_takes_several_drafts_in_one_decoder_call(tiny_assistant):
    from nextgpt.model import Message

    a = tiny_assistant
    drafts = [a.generate([Message("user", p)], want=["image"], settings=None) for p in ("a red square", "a blue dot")]
    drafts[1].settings.seed = drafts[0].settings.seed + 100  # two rows, two seeds
    before = a.stacked_calls
    batched = a.render(drafts)
    assert a.stacked_calls == before + 1 and [len(r.media) for r in batched] == [1, 1]
    alone = [a.render([d])[0] for d in drafts]
    assert a.stacked_calls == before + 1
    for b, s in zip(batched, alone):
        assert b.media[0].seed == s.media[0].seed and b.text == s.text and b.settings == s.settings


def _cli(tiny_assistant, memory, data_dir):
    from rich.console import Console

    from assistant.session import Chat
    from bots.chat import ChatUI

    chat = Chat(tiny_assistant, memory, memory.create_session(None, "tiny"))
    console = Console(file=io.StringIO(), width=120, force_terminal=False, color_system=None)
    return ChatUI(chat, memory, console, stream=False, data_dir=data_dir, log_path=None)


def _saved(memory, session_id) -> dict:
    last = memory.turns(session_id)[-1]
    assert last.role == "assistant"
    return {k: last.settings.get(k) for k in COMPARED}


@pytest.mark.parametrize("reseed", [False, True], ids=["regenerate", "reseed"])
def test_cli_regenerate_and_discord_button_use_the_same_settings(env, reseed, tmp_path):
    """The same request in the CLI chat and in Discord, then `/regenerate` (`/reseed`) and 🔁 (🎲):
    the replacing replies were made with the same settings, the current ones where the first reply
    pinned nothing and the first reply's seed/steps/guidance where it did."""
    fake, memory = env.fake, env.memory
    # Discord: the config's default_max_new_tokens 4; /imagine with a seed and steps
    msg = final_of(env, fake.slash(env.alice, env.general, "imagine", prompt="a green square", seed=31, steps=2))
    thread_id = msg["id"]
    ids = {c["custom_id"].split(":")[1]: c["custom_id"] for row in msg["components"] for c in row["components"]}
    # CLI: the same request, the same settings
    ui = _cli(env.bot.engine.assistant, memory, tmp_path)  # the same assistant and memory, used while the bot is idle
    for line in ("/set max_new_tokens 4", "/set steps 2", "/seed 31", "/image a green square"):
        ui.handle(line)
    first_cli, first_discord = _saved(memory, ui.chat.session.id), _saved(memory, session_of(env, thread_id))
    assert first_cli == first_discord and first_cli["seed"] == 31 and first_cli["steps"] == 2
    # then the settings change in both (a setting the regenerate does not pin, and one it does)
    ui.handle("/set steps 3")
    ui.handle("/set max_new_tokens 5")
    with td.guild_settings(env, steps=3, max_new_tokens=5):
        fake.click(env.alice, msg["id"], ids["reseed" if reseed else "regen"])
        new = fake.wait(lambda: [m for m in bot_replies(env, thread_id) if settled(m) and m["attachments"]], 120,
                        "the regenerated reply")[0]
        ui.handle("/reseed" if reseed else "/regenerate")
    assert attachment(new, "image-")
    again_cli, again_discord = _saved(memory, ui.chat.session.id), _saved(memory, session_of(env, thread_id))
    assert again_cli == again_discord
    assert again_cli["seed"] == 31 + reseed and again_cli["steps"] == 2  # pinned from the replaced reply
    assert again_cli["max_new_tokens"] == 5 and again_cli["want"] == ["image"]  # the current setting
    assert [t.role for t in memory.turns(ui.chat.session.id)] == ["user", "assistant"]  # replaced, not added


def test_media_between_words_keep_their_place(memory, media_files):
    """Mixed content is kept as ordered parts: media that stood between words come back there."""
    from langchain_core.messages import AIMessage, HumanMessage

    from memory.history import MemoryChatHistory
    from memory.records import ordered_parts

    assert ordered_parts("ab cd", ["x", "y"], [2, None]) == [("text", "ab"), ("media", "x"), ("text", "cd"), ("media", "y")]
    history = MemoryChatHistory(memory, memory.create_session("t", "tiny").id)
    red = media_files["red.png"].as_uri()
    history.add_messages([
        HumanMessage(content=[{"type": "image", "url": red}, {"type": "text", "text": "what is this?"}]),
        AIMessage(content=[{"type": "text", "text": "Here is a circle:"}, {"type": "image", "url": red},
                           {"type": "text", "text": "and a square."}, {"type": "image", "url": red}]),
        HumanMessage(content=[{"type": "text", "text": "thanks"}, {"type": "image", "url": red}]),
    ])
    user, ai, last = history.messages
    assert [b["type"] for b in user.content] == ["image", "text"]
    assert [b.get("text", b["type"]) for b in ai.content] == ["Here is a circle:", "image", "and a square.", "image"]
    assert [b.get("text", b["type"]) for b in last.content] == ["thanks", "image"]
    stored = memory.turns(history.session_id)
    assert stored[1].text == "Here is a circle:\nand a square."  # the text is still one text
    assert not (stored[2].media[0].meta or {}).get("at")  # media after all the words: stored as before
