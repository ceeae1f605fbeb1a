"""Untrusted text in the prompt: what a user typed (and what was stored from it) must stay text.

The tokenizer turns any occurrence of an added token's string into that token, wherever it comes
from: a user typing `<Img></Img>` made a media slot (and the slot count no longer matched the media:
the session failed on every later turn), `[IMG0]` a signal token, `<|im_start|>` or (Vicuna)
`### Human:` a forged turn. `neutralise` breaks every such marker with a zero-width space between
its characters, so it is tokenised as ordinary text; the stored text is never changed, only the
prompt built from it, so a session that already holds such a turn works again.

    user / system text:  every added token of the tokenizer + the template's turn marker (`###`)
    assistant traces:    the same but the signal tokens (those in a trace are the model's own; a
                         model can spell `<Img>` or `<s>` out of ordinary tokens)
"""

from __future__ import annotations

import re
from dataclasses import replace

from nextgpt.tokens import MODALITIES

BREAK = "\u200b"  # zero-width space: invisible, and no marker contains it


def markers(tokenizer, template_markers=()) -> list[str]:
    """Every string the tokenizer would read as an added (special or new) token, plus the template's own markers."""
    added = [t for t in tokenizer.get_added_vocab() if t.strip()]
    return sorted(set(added) | {m for m in template_markers if m}, key=len, reverse=True)


def neutralise(text: str, marker_list: list[str]) -> str:
    """`text` with a zero-width space between the characters of every marker it contains. Repeated
    until none is left: a marker may re-form across the end of one just broken (`ababa` for `aba`)."""
    if not marker_list:
        return text
    pattern = re.compile("|".join(re.escape(m) for m in marker_list))
    for _ in range(len(text) + 1):  # each pass breaks at least one occurrence
        text, n = pattern.subn(lambda m: BREAK.join(m.group(0)), text)
        if not n:
            return text
    return text


SIGNAL_TOKENS = frozenset(t for spec in MODALITIES.values() for t in spec.signal_tokens)


def neutralise_messages(messages: list, user_markers: list[str]) -> list:
    """Copies of `messages` safe to render: user and system text fully neutralised, assistant traces
    all but their signal tokens."""
    assistant_markers = [m for m in user_markers if m not in SIGNAL_TOKENS]
    out = []
    for m in messages:
        safe = neutralise(m.text, assistant_markers if m.role == "assistant" else user_markers)
        out.append(m if safe == m.text else replace(m, text=safe))
    return out
