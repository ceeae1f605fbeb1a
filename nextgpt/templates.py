"""Conversation templates: Vicuna v0 (what the official checkpoint was trained with) and the LLM's own
chat template. Each input media item becomes one `<Img></Img>` slot, filled with its embedding later.

`vicuna_v0` reproduces the token ids of the official TRAINING format, not just its text. The legacy
code (`prompt_wrap` in anyToImageVideoAudio.py, `build_one_instance_stage_3` in common/utils.py)
builds a prompt from pieces that it tokenizes one by one, after a single BOS:

    "### Human: " | "{q}\\n### Assistant: " | "{a}{signal tokens}\\n###" | "Human: {q}\\n### Assistant: " | ...
    with media in the turn: "### Human: <Img></Img> {q}\\n### Assistant: " (the media embedding between the two)

and its tokenizer, transformers 4.29's LlamaTokenizer, split each piece at the added tokens
(`<Img>`, `[IMG0]`, ...), stripped the whitespace on both sides of them, and sentencepiece-encoded
each remaining part on its own (so each got its own leading "▁"). `encode` does the same, so a
converted official checkpoint sees the ids it learned: `:`, `▁` before the reply, `▁Human` after
`###`, `</Img>▁{q}` with no space token, and `[IMG3]▁###` (no newline) after a signal group.
The demo's inference path (`prepare_generation_embedding`) differs: it puts another BOS before
every text part (so a second BOS follows `</Img>`) and ends the prompt `### Assistant:` without the
space; we do not copy that, the weights learned the training format.
"""

from __future__ import annotations

import re
from nextgpt.messages import Message
from nextgpt.tokens import MEDIA_END, MEDIA_START, NEW_TOKENS

VICUNA_STOP = "###"
_ADDED = re.compile("(" + "|".join(re.escape(t) for t in sorted(NEW_TOKENS, key=len, reverse=True)) + ")")


def _content(message: Message) -> str:
    """User media go before the text (the official `<Img>…</Img> {text}`); the media an assistant
    produced go after its reply, so the model sees what it made."""
    slots = "".join(f"{MEDIA_START}{MEDIA_END}" for _ in message.media)
    if not slots:
        return message.text
    return f"{message.text} {slots}" if message.role == "assistant" else f"{slots} {message.text}"


def vicuna_v0_segments(messages: list[Message], system_prompt: str | None = None) -> list[str]:
    """The official training format as the pieces it tokenized one by one (see the module doc);
    ends ready for a reply. The official data always alternate Human / Assistant, starting with
    Human, and have no system prompt; other orders get the nearest equivalent."""
    segments = [system_prompt + "\n"] if system_prompt else []
    after_reply = False  # the last piece is a reply ending "\n###": the next turn is "Human: ..."
    for i, m in enumerate(messages):
        following = messages[i + 1].role if i + 1 < len(messages) else None
        if m.role == "system":
            segments.append(m.text + "\n")
            after_reply = False
        elif m.role == "user":
            body = _content(m) + ("\n### Assistant: " if following in (None, "assistant") else "\n")
            if after_reply:
                segments.append("Human: " + body)
            elif m.media:
                segments.append("### Human: " + body)  # `### Human: <Img>` and `</Img> {q}...`: <Img> splits them anyway
            else:
                segments += ["### Human: ", body]
            after_reply = False
        elif m.role == "assistant":
            if i == 0 or messages[i - 1].role != "user":
                segments.append("Assistant: " if after_reply else "### Assistant: ")
            segments.append(_content(m) + "\n" + VICUNA_STOP)
            after_reply = True
        else:
            raise ValueError(f"unknown role {m.role!r}")
    if not messages or messages[-1].role != "user":
        segments.append("Assistant: " if after_reply else "### Assistant: ")
    return segments


def vicuna_v0(messages: list[Message], system_prompt: str | None = None) -> str:
    """The text of `vicuna_v0_segments`, joined (its tokens are `encode`'s, not this string's)."""
    return "".join(vicuna_v0_segments(messages, system_prompt))


def tokenize_segment(tokenizer, text: str) -> list[int]:
    """One piece as transformers 4.29 tokenized it for the official code: split at the 38 NExT-GPT
    tokens, whitespace on both sides of each dropped, each remaining part tokenized on its own."""
    parts = _ADDED.split(text)  # odd indices: the added tokens
    for i in range(1, len(parts), 2):
        parts[i - 1], parts[i + 1] = parts[i - 1].rstrip(), parts[i + 1].lstrip()
    ids: list[int] = []
    for i, part in enumerate(parts):
        if i % 2:
            ids.append(tokenizer.convert_tokens_to_ids(part))
        elif part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids


def tokenize_vicuna(tokenizer, segments: list[str]) -> list[int]:
    """One BOS, then each piece tokenized on its own (`tokenize_segment`)."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for segment in segments:
        ids += tokenize_segment(tokenizer, segment)
    return ids


def chat(tokenizer, messages: list[Message], system_prompt: str | None = None) -> str:
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns += [{"role": m.role, "content": _content(m)} for m in messages]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def render(template: str, tokenizer, messages: list[Message], system_prompt: str | None = None) -> str:
    """The prompt as text (for display and tests; `encode` gives the ids the model sees)."""
    if template == "vicuna_v0":
        return vicuna_v0(messages, system_prompt)
    if template == "chat":
        if not tokenizer.chat_template:
            raise ValueError("template 'chat' chosen but this tokenizer has no chat template; use vicuna_v0")
        return chat(tokenizer, messages, system_prompt)
    raise ValueError(f"unknown template {template!r}")


def encode(template: str, tokenizer, messages: list[Message], system_prompt: str | None = None) -> list[int]:
    """The prompt's token ids, ready for a reply: vicuna_v0 as the official training code built
    them; `chat` as the model's chat template writes them (it adds its own BOS where it has one)."""
    if template == "vicuna_v0":
        return tokenize_vicuna(tokenizer, vicuna_v0_segments(messages, system_prompt))
    return tokenizer(render(template, tokenizer, messages, system_prompt), add_special_tokens=False)["input_ids"]


def stop_strings(template: str, tokenizer) -> list[str]:
    """Text that ends a reply besides the EOS token."""
    if template == "vicuna_v0":
        return [VICUNA_STOP]
    return []
