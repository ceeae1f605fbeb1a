"""The NExT-GPT turn, on any LLM backend: prompt → sampled text with forced signal groups → projected
signals. `SignalLoop.generate` is the one loop; a backend supplies the LLM steps (`_prefill`, `_feed`,
`_states`, `_cut`, `_full`, `_finish`), the embeddings of a prompt (`_token_rows`, `encode_media`, `_cat`)
and the projection of a group's states (`_project`): transformers in nextgpt/model.py (`NextGPT`),
llama.cpp in nextgpt/llama_backend.py.

This module imports no torch: the loop samples on numpy (nextgpt/sampling.py), so the llama.cpp backend
streams a reply's words before torch has loaded (torch is needed for media inputs and the projectors).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from nextgpt import escape, templates
from nextgpt.limits import BudgetExceeded
from nextgpt.messages import MediaInput, Message
from nextgpt.sampling import Warpers, draw
from nextgpt.tokens import MEDIA_END, MEDIA_START, MODALITIES

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

    from nextgpt.config import Profile

# isolate_groups="restated"/"restated_all": a later output's words ("and a purple circle on the center.") become a request
# and reply of their own ("a purple circle on the center." / "Here is a purple circle on the center.")
RESTATE_LEAD = "Here is "
_LEADING_LINK = re.compile(r"^[\s,;:&+]*(?:(?:and|also|then|plus|as well as)\b[\s,]*)*", re.IGNORECASE)


def restatement(words: str, first: bool) -> tuple[str, str] | None:
    """A group's words re-read as a one-turn request (isolate_groups="restated"/"restated_all"): (what the
    user says: the words without their leading "and"/","; the reply: RESTATE_LEAD + them, or the words
    as written for a reply's `first` group, whose words already open a reply), closed with a period when
    they stop mid-sentence ("Here is a low beep" before "and a picture of …"), as a one-output reply is.
    None when no words are left. The projector refit reads its training states the same way
    (training.trainer.encode.restated_dialogs)."""
    said = _LEADING_LINK.sub("", words).strip()
    if not said:
        return None
    if not said.endswith((".", "!", "?")):
        said = said.rstrip(",;:&+ ") + "."
    return said, (said if first else RESTATE_LEAD + said)


@dataclass
class Signal:
    """One modality request emitted by the LLM, projected into its decoder's conditioning space."""

    modality: str
    prompt_embeds: torch.Tensor  # (1, Q, D)
    position: int  # index of the first signal token among the generated tokens
    states: torch.Tensor | None = None  # (1, N, hidden): the signal states the projector was given


@dataclass
class Run:
    """One reply's LLM state inside `SignalLoop.generate`: how many prompt positions came from the cache,
    and the backend's handle (the transformers key/value cache; llama.cpp keeps its own)."""

    reused: int
    kv: object = None


@dataclass
class Reply:
    text: str  # what the user reads: the signal tokens removed
    trace: str  # the raw generated text, signal tokens included (what the context keeps)
    signals: list[Signal]
    token_ids: list[int]
    finish_reason: str  # stop | eos | length | repetition
    timings: dict[str, float]


class PromptCache:
    """The LLM key/value cache of one conversation, reused across its turns (see `generate`)."""

    def __init__(self):
        self.kv: DynamicCache | None = None
        self.keys: list = []

    def reuse(self, keys: list) -> tuple[DynamicCache, int]:
        """(cache cropped to the prefix shared with `keys`, its length). At least one position is
        left to feed, since the next token's logits come from the last fed position."""
        from nextgpt.kv_cache import KVCache, crop_to  # the transformers path's (see nextgpt/kv_cache.py)

        if self.kv is None:
            return KVCache(), 0
        common = 0
        for a, b in zip(self.keys, keys):
            if a != b:
                break
            common += 1
        common = min(common, len(keys) - 1)
        if common == 0:
            return KVCache(), 0
        crop_to(self.kv, common)
        return self.kv, common

    def store(self, kv: DynamicCache, keys: list) -> None:
        self.kv, self.keys = kv, list(keys)

    def clear(self) -> None:
        self.kv, self.keys = None, []


def repeating_tail(ids: list[int], span: int = 16, max_period: int = 8, repeats: int = 4) -> int:
    """How many tokens to cut when the reply ends in a loop, else 0: the last max(span, repeats × p)
    tokens repeat one piece of p ≤ max_period tokens ("five five five …", "ababab…"); all but its
    first copy go. A legitimate repetition ("beep beep beep") is far shorter than `span`."""
    for p in range(1, max_period + 1):
        n = max(span, repeats * p)
        if len(ids) < n:
            break
        tail = ids[-n:]
        if all(tail[i] == tail[i + p] for i in range(n - p)):
            start = len(ids) - n
            while start > 0 and ids[start - 1] == ids[start - 1 + p]:  # where the loop began
                start -= 1
            return len(ids) - (start + p)
    return 0


def repeated_phrase(ids: list[int], n: int = 5, times: int = 3, ignore=frozenset()) -> int:
    """n when the reply's last n tokens (none of them in `ignore`, the signal tokens) are a phrase it has
    now said `times` times, the copies apart, else 0: a loop whose period holds other words or a signal
    group ("a green circle moving up[VID…], a green circle moving up[VID…], a picture of a green circle
    moving up …"), which `repeating_tail` cannot see. A reply that names one thing twice passes."""
    if len(ids) < n * times or any(t in ignore for t in ids[-n:]):
        return 0
    phrase, seen, i = ids[-n:], 1, len(ids) - 2 * n - 1  # copies apart: a loop of one piece is repeating_tail's
    while i >= 0:
        if ids[i : i + n] == phrase:
            seen, i = seen + 1, i - n - 1
            if seen == times:
                return n
        else:
            i -= 1
    return 0


def load_model(profile: "Profile", cache_dir: Path, *, n_threads: int | None = None) -> "SignalLoop":
    """The profile's model on its backend: llama.cpp (no torch imported until media or a signal group needs
    it) or transformers (`nextgpt.model.NextGPT`). `n_threads`: llama.cpp's threads (None: the CPUs this
    process may use)."""
    if profile.llm.resolved_backend() == "llama_cpp":
        from nextgpt.llama_backend import LlamaCppNextGPT

        return LlamaCppNextGPT.from_profile(profile, cache_dir, n_threads=n_threads)
    from nextgpt.model import NextGPT

    return NextGPT.from_profile(profile, cache_dir)


class SignalLoop:
    """What every backend's model shares: the tokenizer's special ids, `build_inputs` and `generate`."""

    def _setup(self, tokenizer, template: str, system_prompt: str | None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        tok = tokenizer.convert_tokens_to_ids
        self.media_start_id, self.media_end_id = tok(MEDIA_START), tok(MEDIA_END)
        self.signal_ids = {m: tok(spec.signal_tokens) for m, spec in MODALITIES.items()}
        self.first_signal = {ids[0]: m for m, ids in self.signal_ids.items()}
        self.all_signal_ids = {i for ids in self.signal_ids.values() for i in ids}
        self.stop_strings = templates.stop_strings(template, tokenizer)
        # strings that typed into a message would become tokens or turns (see nextgpt.escape)
        self.markers = escape.markers(tokenizer, self.stop_strings)
        self.side_prompt_cache = PromptCache()  # side reads' own (restated groups): they share the system prompt

    def warm(self) -> None:
        """Load now what a first text reply does not need (a backend that loads it lazily overrides this)."""

    # ------------------------------------------------------------------ inputs
    def build_inputs(self, messages: list[Message]) -> tuple[object, list]:
        """Prompt embeddings (1, T, hidden) — the template's tokens with media spliced into their
        slots — and one key per position (the token id, or a digest of the media embedding), which
        `PromptCache` compares to reuse the key/value cache of an unchanged prefix."""
        messages = escape.neutralise_messages(messages, self.markers)  # typed markers stay text
        keys: list = templates.encode(self.template, self.tokenizer, messages, self.system_prompt)
        media = [item for m in messages for item in m.media]
        pairs = zip(keys, keys[1:])
        slots = [i + 1 for i, pair in enumerate(pairs) if pair == (self.media_start_id, self.media_end_id)]
        if len(slots) != len(media):  # the template writes one slot per item; text can no longer add any
            raise ValueError(f"prompt has {len(slots)} media slots for {len(media)} media items")
        limit = self._max_positions()
        if limit and len(keys) + len(media) > limit:  # refused before the prefill, the expensive step
            raise BudgetExceeded(f"prompt too long ({len(keys) + len(media)} tokens, limit max_prompt_tokens = {limit}, "
                                 "the model's max_position_embeddings)")  # fmt: skip
        token_embeds = self._token_rows(keys)
        if not media:
            return token_embeds[None], list(keys)
        media_embeds = self.encode_media(media)
        keys = list(keys)
        for slot, vector in sorted(zip(slots, media_embeds), key=lambda x: -x[0]):
            keys.insert(slot, ("media", hashlib.sha1(_float32_bytes(vector)).hexdigest()))
        pieces, start = [], 0
        for slot, vector in zip(slots, media_embeds):  # <Img> [vector] </Img>
            pieces += [token_embeds[start:slot], vector[None]]
            start = slot
        pieces.append(token_embeds[start:])
        return self._cat(pieces)[None], keys

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        messages: list[Message],
        *,
        want: Iterable[str] = (),
        max_new_tokens: int = 246,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        allow_media: bool = True,
        on_text: Callable[[str], None] | None = None,
        cache: PromptCache | None = None,
        stop: Iterable[str] = (),
        isolate_groups: bool | str = False,
    ) -> Reply:
        """Sample a reply. When a modality's first signal token is sampled, its remaining N−1 tokens
        are forced (the official code asserted and crashed when the sampler strayed). Modalities in
        `want` that the model did not emit are forced at the end of the reply; `allow_media=False`
        keeps the model from starting any signal group of its own (text-only replies).

        `cache`: a conversation's PromptCache. The key/value cache of the longest prefix this
        prompt shares with the previous call's prompt + reply is reused, so a turn costs the new
        tokens only, not the whole history (regenerate, edits and truncation change the prefix
        and are recomputed from the first differing position).

        `stop`: more strings that end the reply, besides the template's (an API caller's `stop`); the
        reply ends as soon as one is generated, not after max_new_tokens.

        `isolate_groups`: a reply with several signal groups takes the states of the second and later
        groups from a re-read of the prompt + only the words since the previous group + the group, as
        if that output were the reply's only one (a small LLM's state at a second group mixes both
        things named). The cache then keeps the prompt; the next turn prefills the reply with it.
        `isolate_groups="restated"`: a later group's words are re-read as a request of their own, in a fresh
        context: the user says them ("and a purple circle" → "a purple circle"), the reply is "Here is" +
        them + the group, the states the model has for a single request. `"restated_all"`: every group,
        the first one read from its words as written (they open the reply already). The conversation's
        cache keeps the whole reply."""
        if isolate_groups not in (False, True, "restated", "restated_all"):
            raise ValueError(f"isolate_groups must be false, true, 'restated' or 'restated_all', got {isolate_groups!r}")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        stops = self.stop_strings + [s for s in stop if s and s not in self.stop_strings]
        want = [m for m in dict.fromkeys(want)]
        for m in want:
            if m not in MODALITIES:
                raise ValueError(f"unknown modality {m!r}; expected one of {', '.join(MODALITIES)}")
        generator = np.random.default_rng(seed)  # seed None: fresh entropy
        warpers = self._warpers(temperature, top_p, top_k)
        eos = self.tokenizer.eos_token_id

        inputs, keys = self.build_inputs(messages)
        timings["encode"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        logits, run = self._prefill(inputs, keys, cache)
        timings["prefill"] = time.perf_counter() - t1
        timings["prefill_tokens"] = len(keys) - run.reused
        timings["prompt_tokens"] = len(keys)
        t2 = time.perf_counter()

        n_prompt = len(keys)
        ids: list[int] = []
        states: list = []  # per generated token: last hidden state + its input embedding
        forced: list[int] = []
        emitted: list[tuple[str, int]] = []  # (modality, index of its first signal token)
        streamed, finish = 0, "length"
        ending = False  # the reply is over once the forced tokens are fed
        longest_stop = max((len(s) for s in stops), default=1)
        searched = 0  # the reply's text before this index holds no stop string
        while True:
            if ending and not forced:
                break
            if forced:  # wanted groups forced after a stop string or a loop
                batch, forced = forced, []
            else:
                if len(ids) >= max_new_tokens or self._full(run):
                    finish = "length"
                    next_id = None
                else:
                    next_id = self._sample(ids, logits, warpers, generator, allow_media)
                    if next_id == eos:
                        finish, next_id = "eos", None
                if next_id is None:  # the reply is over: force the wanted modalities not yet emitted
                    missing = [m for m in want if m not in {e[0] for e in emitted}]
                    if not missing:
                        break
                    next_id = self.signal_ids[missing[0]][0]
                batch = [next_id]
                if next_id in self.first_signal:  # a group's first token: the rest of the group follows it
                    modality = self.first_signal[next_id]
                    emitted.append((modality, len(ids)))
                    batch += self.signal_ids[modality][1:]
            # one pass for a whole group: 24 video tokens cost ~5 decode steps instead of 24
            logits, fed = self._feed(run, batch)
            ids += batch
            states += fed
            next_id = batch[-1]
            if not forced and next_id not in self.all_signal_ids and (loop := repeating_tail(ids) or repeated_phrase(ids, ignore=self.all_signal_ids)):
                # a reply that loops ("fivefivefive…") stops now instead of running to the token limit:
                # one copy of the repeated piece is kept, the rest is cut off the tokens and the cache
                keep = len(ids) - loop
                self._cut(run, n_prompt + keep)
                del ids[keep:], states[keep:]
                emitted = [e for e in emitted if e[1] < keep]
                finish, ending = "repetition", True
                missing = [m for m in want if m not in {e[0] for e in emitted}]
                if not missing:
                    break
                forced = []  # every wanted group, then the reply ends
                for m in missing:
                    emitted.append((m, len(ids) + len(forced)))
                    forced += self.signal_ids[m]
                continue
            if not forced and next_id not in self.all_signal_ids:
                text = self._text(ids)
                stop_at = self._stop_index(text, stops, searched)
                searched = max(0, len(text) - longest_stop - 4)  # a multi-byte character may still change the tail
                if stop_at is not None:
                    # cut the stop string off the tokens and the cache; wanted media may still follow
                    keep = self._tokens_before(ids, stop_at)
                    self._cut(run, n_prompt + keep)
                    del ids[keep:], states[keep:]
                    emitted = [e for e in emitted if e[1] < keep]
                    finish = "stop"
                    missing = [m for m in want if m not in {e[0] for e in emitted}]
                    if not missing:
                        break
                    emitted.append((missing[0], len(ids)))
                    forced = list(self.signal_ids[missing[0]])
                    continue
                if on_text is not None:
                    safe = len(text) - longest_stop + 1
                    if safe > streamed and not text[:safe].endswith("\ufffd"):  # no half UTF-8 characters
                        on_text(text[streamed:safe])
                        streamed = safe
        timings["decode"] = time.perf_counter() - t2
        timings["decode_tokens"] = len(ids)

        t3 = time.perf_counter()
        fed = keys + ids  # what the LLM's cache holds when the reply is done
        # each group's own words start where the group before it ends (the first group's at the reply's start)
        word_starts = [0] + [start + MODALITIES[m].num_tokens for m, start in emitted]
        if isolate_groups is True and len(emitted) > 1:  # re-read each later group after the prompt + its own words
            for (modality, start), since in zip(emitted[1:], word_starts[1:]):
                n = MODALITIES[modality].num_tokens
                self._cut(run, n_prompt)
                states[start : start + n] = self._states(run, ids[since : start + n])[start - since :]
            self._cut(run, n_prompt)
            fed = keys
        self._finish(run, cache, fed)
        if isolate_groups in ("restated", "restated_all"):  # the conversation's run is done with: fresh ones
            for k, ((modality, start), since) in enumerate(zip(emitted, word_starts)):
                if k == 0 and isolate_groups == "restated":
                    continue
                n = MODALITIES[modality].num_tokens
                states[start : start + n] = self._restated_states(ids[since:start], modality, first=k == 0) or states[start : start + n]
        signals = [self._project(modality, states[start : start + MODALITIES[modality].num_tokens], start) for modality, start in emitted]
        timings["project"] = time.perf_counter() - t3
        text = self._text(ids).strip()
        if on_text is not None and len(text) > streamed:
            on_text(self._text(ids)[streamed:].rstrip())
        trace = self.tokenizer.decode(ids, skip_special_tokens=False)
        return Reply(text=text, trace=trace, signals=signals, token_ids=ids, finish_reason=finish, timings=timings)

    def _restated_states(self, words: list[int], modality: str, first: bool = False) -> list:
        """`isolate_groups="restated"`/`"restated_all"`: the signal states of a `modality` group whose words
        are `words` (token ids), read as the only output of a one-turn conversation: user: the words without
        their leading "and"/","; assistant: RESTATE_LEAD + them (`first`: the words as written) + the group.
        [] when no words are left."""
        restated = restatement(self._text(words), first)
        if restated is None:
            return []
        said, reply = restated
        inputs, keys = self.build_inputs([Message("user", said)])
        tokens = self.tokenizer(reply, add_special_tokens=False)["input_ids"] + self.signal_ids[modality]
        side_cache = self._side_cache()  # not the conversation's: that one is left alone
        _, side = self._prefill(inputs, keys, side_cache)
        states = self._states(side, tokens)
        self._finish(side, side_cache, keys + tokens)
        return states[-len(self.signal_ids[modality]) :]

    def _side_cache(self) -> PromptCache | None:
        """The cache of side reads (restated groups): their own, so that the next one reuses the prefix they
        share (the system prompt), ~2/3 of what each would prefill."""
        return self.side_prompt_cache


    # ------------------------------------------------------------------ what a backend supplies
    def _token_rows(self, ids: list[int]):
        """(T, hidden) input embeddings of token ids."""
        raise NotImplementedError

    def encode_media(self, items: list[MediaInput]):
        """(n, hidden): each media item its own LLM input embedding."""
        raise NotImplementedError

    def _cat(self, pieces: list):
        """The pieces concatenated along the first axis."""
        raise NotImplementedError

    def _max_positions(self) -> int | None:
        raise NotImplementedError

    def _project(self, modality: str, states: list, position: int) -> Signal:
        """A group's signal states (one per token) through its output projector."""
        raise NotImplementedError

    def _prefill(self, inputs, keys: list, cache: PromptCache | None) -> tuple[np.ndarray, "Run"]:
        """Feed the prompt (only what `cache` does not already hold): the next token's logits (numpy), and the
        state of this reply's run."""
        raise NotImplementedError

    def _feed(self, run: "Run", tokens: list[int]) -> tuple[np.ndarray, list]:
        """Feed `tokens` in one pass: (the next token's logits, numpy; the signal state at each token: last
        hidden state + input embedding)."""
        raise NotImplementedError

    def _states(self, run: "Run", tokens: list[int]) -> list:
        """Feed `tokens` in one pass: the signal state (last hidden state + input embedding) at each."""
        return self._feed(run, tokens)[1]

    def _cut(self, run: "Run", length: int) -> None:
        """Keep the first `length` positions (prompt + reply tokens) of what was fed."""
        raise NotImplementedError

    def _full(self, run: "Run") -> bool:
        """No room for another position."""
        return False

    def _finish(self, run: "Run", cache: PromptCache | None, keys: list) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _warpers(temperature: float, top_p: float, top_k: int) -> Warpers | None:
        return None if temperature == 0 else Warpers(temperature, top_k, top_p)  # None: greedy

    def _sample(self, ids, logits: np.ndarray, warpers, generator: np.random.Generator, allow_media=True) -> int:
        # only a modality's first signal token may be sampled; the rest of its group is forced
        logits = np.array(logits, dtype=np.float32)  # a copy
        for m, group in self.signal_ids.items():
            logits[group if not allow_media else group[1:]] = -np.inf
        logits[[self.media_start_id, self.media_end_id]] = -np.inf
        if warpers is None:
            return int(logits.argmax())
        return draw(warpers(logits), generator)

    def _text(self, ids: list[int]) -> str:
        """The user-visible text: signal tokens removed."""
        return self.tokenizer.decode([i for i in ids if i not in self.all_signal_ids], skip_special_tokens=True)

    def _stop_index(self, text: str, stops: list[str], start: int = 0) -> int | None:
        """Where the first stop string begins in `text` (none begins before `start`), else None."""
        hits = [i for s in stops if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _tokens_before(self, ids: list[int], char_index: int) -> int:
        """The largest k such that the text of ids[:k] ends at or before char_index."""
        k = len(ids)
        while k > 0 and len(self._text(ids[:k])) > char_index:
            k -= 1
        return k


def _float32_bytes(vector) -> bytes:
    """A media embedding's bytes as fp32 on the CPU (its prompt-cache key): a torch tensor or a numpy array."""
    if hasattr(vector, "detach"):
        vector = vector.detach().float().cpu().numpy()
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()
