"""MemoryChatHistory (a LangChain BaseChatMessageHistory over one memory session), on SQLite and on
a real PostgreSQL server (tests/pg.py)."""

import base64
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from memory import Memory, SessionNotFound
from memory.history import MemoryChatHistory

try:  # `tests` may or may not be a package
    from tests.pg import postgres_server  # noqa: F401  (a fixture)
except ImportError:
    from pg import postgres_server  # noqa: F401

PNG = b"\x89PNG\r\n\x1a\n" + b"P" * 64
WAV = b"RIFF\x00\x00\x00\x00WAVEfmt " + b"\x01" * 64


@pytest.fixture(params=["sqlite", "postgresql"])
def memory(request, tmp_path):
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_server").new_database()
    m = Memory.open(url, data_dir=tmp_path / "data")
    yield m
    m.close()


@pytest.fixture
def history(memory):
    return MemoryChatHistory(memory, memory.create_session("lc", "tiny").id)


def test_messages_round_trip_in_order_with_media_and_metadata(history, memory, tmp_path):
    wav = tmp_path / "beep.wav"
    wav.write_bytes(WAV)
    history.add_messages([
        SystemMessage("be brief"),
        HumanMessage(content=[
            {"type": "text", "text": "what are these?"},
            {"type": "image", "base64": base64.b64encode(PNG).decode(), "mime_type": "image/png"},
            {"type": "audio", "url": wav.as_uri(), "mime_type": "audio/wav"},
        ]),
        AIMessage("a square and a beep", response_metadata={"token_trace": "a square and a beep [IMG0]", "settings": {"seed": 3}}),
    ])
    wav.unlink()  # memory holds its own copy
    again = MemoryChatHistory(memory, history.session_id[:4]).messages  # a prefix works; a fresh reader sees it all
    assert [type(m) for m in again] == [SystemMessage, HumanMessage, AIMessage]
    human = again[1].content_blocks
    assert [b["type"] for b in human] == ["text", "image", "audio"]
    assert human[0]["text"] == "what are these?"
    assert Path(human[1]["url"].removeprefix("file://")).read_bytes() == PNG
    assert Path(human[2]["url"].removeprefix("file://")).read_bytes() == WAV
    assert again[2].text == "a square and a beep"
    assert again[2].response_metadata["token_trace"].endswith("[IMG0]")
    assert again[2].response_metadata["settings"] == {"seed": 3}


def test_stored_blocks_go_back_in_by_file_id_without_copying(history, memory):
    history.add_messages([HumanMessage(content=[{"type": "image", "base64": base64.b64encode(PNG).decode(), "mime_type": "image/png"}])])
    block = history.messages[0].content_blocks[0]
    other = MemoryChatHistory(memory, memory.create_session("copy", "tiny").id)
    other.add_messages([HumanMessage(content=[block])])
    assert other.messages[0].content_blocks[0]["file_id"] == block["file_id"]
    assert sum(1 for _ in memory.blobs) == 1


def test_bad_input_is_refused_and_nothing_is_half_written(history):
    history.add_message(HumanMessage("kept"))
    with pytest.raises(ValueError, match="local files only"):
        history.add_messages([HumanMessage(content=[{"type": "image", "url": "https://example.com/x.png"}])])
    with pytest.raises(ValueError, match="cannot store a 'reasoning' content block"):
        history.add_messages([AIMessage(content=[{"type": "reasoning", "reasoning": "hmm"}])])
    with pytest.raises(ValueError, match="not 'tool'"):
        history.add_messages([ToolMessage("42", tool_call_id="1")])
    assert [m.text for m in history.messages] == ["kept"]


def test_clear_and_unknown_sessions(history, memory):
    history.add_messages([HumanMessage("one"), AIMessage("two")])
    history.clear()
    assert history.messages == []
    assert memory.get_session(history.session_id)  # the session itself stays
    with pytest.raises(SessionNotFound):
        MemoryChatHistory(memory, "ffffffff")
