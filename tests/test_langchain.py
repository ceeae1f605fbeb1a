"""LangChain: the assistant as a chat model, decoders as tools, memory as chat history, in LCEL chains."""

import base64
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables.history import RunnableWithMessageHistory

pytestmark = pytest.mark.slow


@pytest.fixture
def model(tiny_assistant):
    from assistant.langchain import NextGPTChatModel

    return NextGPTChatModel(assistant=tiny_assistant, want=["image"], seed=4)


def test_chat_model_in_an_lcel_chain_with_media_in_and_out(model, media_files):
    prompt = ChatPromptTemplate.from_messages([("system", "be brief"), MessagesPlaceholder("inputs")])
    chain = prompt | model
    png = base64.b64encode(media_files["red.png"].read_bytes()).decode()
    out = chain.invoke({"inputs": [HumanMessage(content=[
        {"type": "text", "text": "what is this and what does it sound like?"},
        {"type": "image", "base64": png, "mime_type": "image/png"},
        {"type": "audio", "url": media_files["beep.wav"].as_uri()},
    ])]})
    blocks = out.content_blocks
    assert blocks[0]["type"] == "text"
    images = [b for b in blocks if b["type"] == "image"]
    assert images and Path(images[0]["url"].removeprefix("file://")).is_file()
    assert "[IMG0]" in out.response_metadata["token_trace"]


def test_bad_media_block_is_a_clear_error(model, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not media")
    from nextgpt.media import AttachmentError

    with pytest.raises(AttachmentError, match="notes.txt: unsupported file type"):
        model.invoke([HumanMessage(content=[{"type": "image", "url": bad.as_uri()}])])
    with pytest.raises(ValueError, match="only file:// and data: media urls"):
        model.invoke([HumanMessage(content=[{"type": "image", "url": "https://example.com/x.png"}])])


def test_memory_history_with_the_model(model, tmp_path):
    from memory import Memory
    from memory.history import MemoryChatHistory

    memory = Memory.open(data_dir=tmp_path / "data")
    session = memory.create_session("lcel", "tiny")
    chain = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{question}")]) | model
    with_history = RunnableWithMessageHistory(
        chain, lambda sid: MemoryChatHistory(memory, sid), input_messages_key="question", history_messages_key="history"
    )
    config = {"configurable": {"session_id": session.id}}
    with_history.invoke({"question": "draw a red circle"}, config=config)
    with_history.invoke({"question": "now make it blue"}, config=config)
    turns = memory.turns(session.id)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[1].media_out and turns[1].media_out[0].modality == "image"
    assert turns[1].token_trace and "[IMG0]" in turns[1].token_trace  # the trace is kept for context


def test_decoders_as_langchain_tools(tiny_assistant):
    from tools.langchain import langchain_tools

    tools = {t.name: t for t in langchain_tools(tiny_assistant.tools)}
    assert set(tools) == {"generate_image", "generate_video", "generate_audio"}
    msg = tools["generate_image"].invoke({"type": "tool_call", "id": "1", "name": "generate_image", "args": {"prompt": "a red circle", "seed": 1}})
    (artifact,) = msg.artifact
    assert artifact["mime"] == "image/png" and Path(artifact["path"]).is_file()
    assert artifact["path"] in msg.content
    again = tools["generate_image"].invoke({"prompt": "a red circle", "seed": 1})
    assert again == msg.content  # same seed, same file
    audio = tools["generate_audio"].invoke({"type": "tool_call", "id": "2", "name": "generate_audio", "args": {"prompt": "a high beep", "seed": 2}})
    assert audio.artifact[0]["mime"] == "audio/wav"


# ---- the standard parameters and streaming ------------------------------------------------------


@pytest.fixture
def plain(tiny_assistant, one_torch_thread):
    from assistant.langchain import NextGPTChatModel

    return NextGPTChatModel(assistant=tiny_assistant, seed=1, max_tokens=24)  # seed 1: 15 chunks of (random) text, no group of its own


def test_stream_yields_text_deltas_then_media_on_the_last_chunk(plain):
    chunks = list(plain.stream("draw something", want=["image"]))
    texts = [c for c in chunks if isinstance(c.content, str) and c.content]
    assert len(texts) > 1  # really streamed, token by token
    last = chunks[-1]
    assert last.chunk_position == "last" and [b["type"] for b in last.content] == ["image"]
    assert all(c.usage_metadata is None for c in chunks[:-1])
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    invoked = plain.invoke("draw something", want=["image"])
    assert full.text == invoked.text  # the same reply, streamed or not
    assert full.usage_metadata == invoked.usage_metadata
    assert invoked.usage_metadata["output_tokens"] >= 4  # the 4 image signal tokens count


def test_max_tokens_stop_and_temperature_are_honoured(plain):
    long = plain.invoke("hello", max_tokens=24)
    short = plain.invoke("hello", max_tokens=3)
    assert short.usage_metadata["output_tokens"] == 3 < long.usage_metadata["output_tokens"]
    assert short.response_metadata["finish_reason"] == "length"
    word = long.text[6:8]
    cut = plain.invoke("hello", max_tokens=24, stop=[word])
    assert cut.text == long.text[: long.text.find(word)].rstrip() and word not in cut.text
    assert cut.response_metadata["finish_reason"] == "stop"
    streamed = "".join(c.text for c in plain.stream("hello", max_tokens=24, stop=[word]))
    assert streamed.strip() == cut.text
    # temperature 0 is greedy: the seed no longer matters; at 1.0 it does
    greedy = {plain.invoke("hello", temperature=0, seed=s).text for s in (1, 2, 3)}
    sampled = {plain.invoke("hello", temperature=1.0, seed=s).text for s in (1, 2, 3)}
    assert len(greedy) == 1 and len(sampled) > 1


def test_timeout_and_unknown_parameters_are_errors(plain):
    from assistant.agent import TimedOut

    with pytest.raises(TimeoutError, match="timeout=1e-06"):
        plain.invoke("hello", timeout=1e-6)
    with pytest.raises(TimedOut):
        list(plain.stream("hello", timeout=1e-6))
    with pytest.raises(ValueError, match="unsupported parameter.*frequency_penalty"):
        plain.invoke("hello", frequency_penalty=1)
    with pytest.raises(ValueError, match="serves profile 'tiny', not 'gpt-4o'"):
        plain.invoke("hello", model="gpt-4o")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="api_key"):
        type(plain)(assistant=plain.assistant, api_key="x")
    with pytest.raises(ValidationError, match="max_retries"):
        type(plain)(assistant=plain.assistant, max_retries=-1)


def test_max_retries_tries_again_after_running_out_of_memory(tiny_assistant, settings):
    import torch

    from assistant.agent import Assistant
    from assistant.langchain import NextGPTChatModel

    class RunsOutOnce(Assistant):  # the one failure that cannot be produced for real here
        failures = 1

        def respond(self, *a, **kw):
            if self.failures:
                self.failures -= 1
                raise torch.OutOfMemoryError("CUDA out of memory (test)")
            return super().respond(*a, **kw)

    flaky = RunsOutOnce(settings, "tiny", output_dir=tiny_assistant.output_dir)
    flaky._model = tiny_assistant.model
    with pytest.raises(torch.OutOfMemoryError):
        NextGPTChatModel(assistant=flaky, seed=1, max_tokens=3).invoke("hello")
    flaky.failures = 1
    assert NextGPTChatModel(assistant=flaky, seed=1, max_tokens=3, max_retries=1).invoke("hello").text


def test_closing_a_stream_early_ends_generation(plain):
    stream = plain.stream("hello", max_tokens=200)
    next(stream)
    stream.close()  # returns once the worker has stopped, at the next token
    assert plain.assistant.lock.acquire(blocking=False)
    plain.assistant.lock.release()


def test_interleaved_parts_keep_their_order_and_unknown_blocks_are_refused(media_files, tmp_path):
    from assistant.langchain import to_messages

    red, beep = media_files["red.png"].as_uri(), media_files["beep.wav"].as_uri()
    one = to_messages(HumanMessage(content=[{"type": "text", "text": "what is"}, {"type": "image", "url": red}]), tmp_path)
    assert [(m.text, [x.modality for x in m.media]) for m in one] == [("what is", ["image"])]  # the model's own layout
    mixed = HumanMessage(content=[
        {"type": "text", "text": "compare"}, {"type": "image", "url": red},
        {"type": "text", "text": "with"}, {"type": "audio", "url": beep}, {"type": "image", "url": red},
    ])
    out = to_messages(mixed, tmp_path)
    assert [(m.text, [x.modality for x in m.media]) for m in out] == [("compare", []), ("with", ["image"]), ("", ["audio", "image"])]
    with pytest.raises(ValueError, match="unsupported content block type 'reasoning'"):
        to_messages(HumanMessage(content=[{"type": "reasoning", "reasoning": "hmm"}]), tmp_path)
    with pytest.raises(ValueError, match="unsupported content block type 'file'"):
        to_messages(HumanMessage(content=[{"type": "file", "base64": "eA==", "mime_type": "application/pdf"}]), tmp_path)
