"""LangChain's own standard test suites (langchain-tests) for NextGPTChatModel on the tiny profile.

The suites are run as they are: a test is skipped only where the suite's own flags say a feature is
absent (tool calling, structured output, JSON mode, PDF, web image urls, model override). The image
and audio input tests download a file from the web; there is no network here, so `httpx.get` returns
a local PNG / WAV instead (the tests' own code runs unchanged).
"""

import base64

import httpx
import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from assistant.langchain import NextGPTChatModel

pytestmark = [pytest.mark.slow, pytest.mark.feature_skips]  # skips: the suite's own flags (no tool calling, ...)


class _Tiny:
    """What both suites share: the session's tiny assistant, and what the model declares."""

    @pytest.fixture(autouse=True)
    def _tiny(self, tiny_assistant, one_torch_thread):
        type(self).assistant = tiny_assistant

    @property
    def chat_model_class(self):
        return NextGPTChatModel

    @property
    def chat_model_params(self) -> dict:
        # seed 1 answers "Hello" with some text (the tiny model's weights are random)
        return {"assistant": self.assistant, "seed": 1}

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_audio_inputs(self) -> bool:
        return True

    @property
    def supports_video_inputs(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one model (profile) per NextGPTChatModel


class TestNextGPTChatModelUnit(_Tiny, ChatModelUnitTests):
    @property
    def standard_chat_model_params(self) -> dict:
        # the unit suite adds api_key="test": a model that runs in this process has no key, and
        # NextGPTChatModel refuses parameters it does not know
        params = super().standard_chat_model_params
        params.pop("api_key")
        return params


class TestNextGPTChatModelIntegration(_Tiny, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _local_downloads(self, monkeypatch, media_files):
        def get(url, *args, **kwargs):
            name = "beep.wav" if url.endswith(".wav") else "red.png"
            return httpx.Response(200, content=media_files[name].read_bytes(), request=httpx.Request("GET", url))

        monkeypatch.setattr(httpx, "get", get)


def test_the_suites_image_test_really_sends_the_image(tiny_assistant, media_files):
    """The standard image test only checks that invoke does not fail: check here that the image
    reached the model (its prompt holds one media position more than without it)."""
    png = base64.b64encode(media_files["red.png"].read_bytes()).decode()
    model = NextGPTChatModel(assistant=tiny_assistant, seed=1, max_tokens=2)
    bare = model.invoke([("human", "describe")]).usage_metadata["input_tokens"]
    from langchain_core.messages import HumanMessage

    msg = HumanMessage(content=[{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}])
    with_image = model.invoke([msg]).usage_metadata["input_tokens"]
    assert with_image > bare


# ---- the decoder tools (tools.langchain) ---------------------------------------------------------
from langchain_tests.integration_tests import ToolsIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ToolsUnitTests  # noqa: E402


class _DecoderTool:
    modality = "image"

    @pytest.fixture(autouse=True)
    def _tiny(self, tiny_assistant, one_torch_thread):
        type(self).assistant = tiny_assistant

    @property
    def tool_constructor(self):
        from tools.langchain import as_langchain_tool

        return as_langchain_tool(self.assistant.tools[self.modality])

    @property
    def tool_invoke_params_example(self) -> dict:
        return {"prompt": f"a {self.modality} of a red circle", "seed": 1, "steps": 2}


class TestImageToolUnit(_DecoderTool, ToolsUnitTests):
    pass


class TestImageToolIntegration(_DecoderTool, ToolsIntegrationTests):
    pass


class TestAudioToolIntegration(_DecoderTool, ToolsIntegrationTests):
    modality = "audio"


class TestVideoToolIntegration(_DecoderTool, ToolsIntegrationTests):
    modality = "video"
