"""The tokenizer of the llama.cpp backend, built on the `tokenizers` library without transformers.

transformers' `TokenizersBackend` is a thin layer over `tokenizers.Tokenizer` (the same Rust object
does the work), but importing transformers costs ~0.7-1.3 s of every `nextgpt chat` start (its
`__init__`'s import index and `dependency_versions_check`), paid for nothing else on the llama.cpp
path. `Tokenizer` reads the same files (`tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`) and offers the part of transformers' tokenizer API that `NextGPT` uses, with
the same results: ids, decoding, added tokens and the chat template (rendered by jinja2 in the
sandboxed environment transformers uses). tests/test_llm.py compares the two on generated text and
conversations.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def _content(token) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken's dict."""
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    def __init__(self, folder: Path):
        folder = Path(folder)
        self.backend = Backend.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        for name in SPECIAL:
            setattr(self, name, _content(config.get(name)))
        template = folder / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else config.get("chat_template")

    # ------------------------------------------------------------------ ids
    def __call__(self, text: str, add_special_tokens: bool = True, **_) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.backend.get_added_tokens_decoder().items())}

    def add_tokens(self, tokens: list[str]) -> int:
        """Plain (not special) added tokens, as transformers' `add_tokens` makes them."""
        return self.backend.add_tokens([AddedToken(t, special=False, normalized=True) for t in tokens])

    def _id(self, name: str) -> int | None:
        token = getattr(self, name)
        return None if token is None else self.backend.token_to_id(token)

    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, conversation: list[dict], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        """The conversation rendered by the tokenizer's chat template (text only: `tokenize=False`)."""
        if tokenize:
            raise NotImplementedError("Tokenizer.apply_chat_template renders text only (tokenize=False)")
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        specials = {name: getattr(self, name) for name in SPECIAL if getattr(self, name) is not None}
        messages = [dict(m) for m in conversation]
        return _compile(self.chat_template).render(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **specials)


@lru_cache(maxsize=8)
def _compile(template: str):
    """The template compiled once, in jinja2's sandbox as transformers sets it up for chat templates
    (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps
    non-ASCII text)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
