"""The per-request resource budget and the checks of untrusted values, each enforced before the
expensive step and named in its error (one line, a ValueError).

    attachments        nextgpt.media: bytes, image pixels, audio seconds and decoded samples, video
                       seconds and decoded frames × pixels — from the header, before decoding
    prompt tokens      `check_message` (the newest message against the context budget, before it
                       is saved) and `NextGPT.build_inputs` (the whole prompt, before the prefill)
    seeds              `parse_seed`: a whole number in [0, 2^63); the decoders use seed + i
    text               `check_text`: a message must be valid Unicode (an argv with invalid UTF-8
                       arrives with lone surrogates, which no database or tokenizer takes)
"""

from __future__ import annotations

SEED_MAX = 2**63 - 1  # seed + i (one per decoder call) stays inside torch's 64-bit seed range
MAX_ATTACHMENTS = 8  # media items in one message (each is an ImageBind pass and a prompt slot)
DEFAULT_CONTEXT_TOKENS = 2048  # assistant.session.Chat's default token budget
MEDIA_SLOT_TOKENS = 3  # <Img> [embedding] </Img>


class BudgetExceeded(ValueError):
    """A request over one of the limits; the message names the limit."""


def parse_seed(value) -> int:
    """A seed from text or a number: a whole number from 0 to SEED_MAX, else ValueError."""
    try:
        seed = int(str(value).strip())
    except ValueError:
        raise ValueError(f"seed must be a whole number, not {str(value)[:40]!r}") from None
    if not 0 <= seed <= SEED_MAX:
        shown = str(seed) if len(str(seed)) <= 30 else str(seed)[:27] + "..."
        raise ValueError(f"seed must be between 0 and {SEED_MAX} (2^63 - 1), not {shown}")
    return seed


def check_text(text: str, what: str = "the message") -> str:
    """`text` if it is valid Unicode; ValueError naming the first bad position otherwise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"code point U+{ord(bad):04X}"
        raise ValueError(f"{what} is not valid UTF-8 text ({byte} at character {e.start})") from None
    return text


def message_budget(context_tokens: int | None, max_new_tokens: int) -> int:
    """Tokens the newest message may take: the context less room for the reply."""
    return (context_tokens or DEFAULT_CONTEXT_TOKENS) - max_new_tokens


def check_message(tokenizer, text: str, n_media: int = 0, *, max_new_tokens: int, context_tokens: int | None = None) -> int:
    """The newest message's token count, or BudgetExceeded if it cannot fit the context (the newest
    message is never truncated, so it must fit: a 100 KB prompt used to run for minutes)."""
    check_text(text)
    if n_media > MAX_ATTACHMENTS:
        raise BudgetExceeded(f"too many attachments ({n_media}, limit max_attachments = {MAX_ATTACHMENTS})")
    limit = message_budget(context_tokens, max_new_tokens)
    n = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) + MEDIA_SLOT_TOKENS * n_media
    if n > limit:
        raise BudgetExceeded(
            f"message too long ({n} tokens, limit max_prompt_tokens = {limit}: the {context_tokens or DEFAULT_CONTEXT_TOKENS}-token "
            f"context less {max_new_tokens} for the reply)"
        )
    return n


def check_chat_message(chat, text: str, settings=None) -> int:
    """`check_message` for the next `assistant.session.Chat.send(text)` (its staged attachments,
    the turn's `settings` (default: the chat's) and its context budget); `Chat.generate` calls it
    before it saves the message."""
    assistant = chat.assistant
    max_new = (settings or chat.turn_settings()).resolved(assistant.profile).max_new_tokens
    return check_message(assistant.model.tokenizer, text, len(chat.staged), max_new_tokens=max_new,
                         context_tokens=chat.context_tokens)
