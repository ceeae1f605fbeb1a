"""NExT-GPT: ImageBind → input projection → LLM with signal tokens → output projectors.

    media files ──ImageBind──► 1 vector each ──input_proj──► one LLM input embedding per item
    prompt (template, one <Img></Img> slot per item) ──► LLM ──► text + [IMG0..3] [VID0..23] [AUD0..7]
    hidden states at the signal tokens (last layer + input embeddings) ──output projector──► prompt_embeds

The core stops at `prompt_embeds`: rendering them into media is the decoder tools' job (tools/).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from nextgpt import escape, templates
from nextgpt.config import Profile
from nextgpt.devices import resolve
from nextgpt.limits import BudgetExceeded
from nextgpt.llm import load_llm
from nextgpt.messages import MediaInput, Message  # noqa: F401  (re-exported: nextgpt.model.Message)
from nextgpt.projectors import InputProjection, OutputProjector
from nextgpt.sampling import Warpers
from nextgpt.tokens import MEDIA_END, MEDIA_START, MODALITIES

# isolate_groups="restated"/"restated_all": a later output's words ("and a purple circle on the center.") become a request
# and reply of their own ("a purple circle on the center." / "Here is a purple circle on the center.")
RESTATE_LEAD = "Here is "
_LEADING_LINK = re.compile(r"^[\s,;:&+]*(?:(?:and|also|then|plus|as well as)\b[\s,]*)*", re.IGNORECASE)

if TYPE_CHECKING:
    from transformers import DynamicCache


@dataclass
class Signal:
    """One modality request emitted by the LLM, projected into its decoder's conditioning space."""

    modality: str
    prompt_embeds: torch.Tensor  # (1, Q, D)
    position: int  # index of the first signal token among the generated tokens
    states: torch.Tensor | None = None  # (1, N, hidden): the signal states the projector was given


@dataclass
class Forward:
    """One LLM pass over inputs with the media spliced into their slots (`signal_forward`)."""

    logits: torch.Tensor  # (B, T, vocab); with `logits_at`: (K, vocab) at its K chosen positions
    inputs_embeds: torch.Tensor  # (B, T, hidden): token embeddings, projected media vectors in their slots
    states: dict[str, torch.Tensor]  # modality → (n, N, hidden): the signal states of each requested group
    all_states: torch.Tensor | None  # (B, T, hidden) signal states at every position, when asked
    past_key_values: object | None


def signal_forward(llm, input_proj, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, media_vectors: torch.Tensor | None = None,
                   media_batch: torch.Tensor | None = None, media_pos: torch.Tensor | None = None,
                   signals: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, all_states: bool = False,
                   past_key_values=None, use_cache: bool = False, logits_at: torch.Tensor | None = None) -> Forward:
    """The core step of NExT-GPT, the one place it is written: media spliced into their slots → LLM →
    (logits, signal states). Generation (`NextGPT.generate`), training (`training.trainer`) and the
    projector refit (`training.small.signal_states`) all run it.

    Inputs: token ids (B, T), with ImageBind vectors `media_vectors` (n, enc_dim) put through the
    input projection into the slots (`media_batch[i]`, `media_pos[i]`); or ready `inputs_embeds`
    (B, T, hidden), e.g. `NextGPT.build_inputs`' prompt. `llm` may be a PEFT/DDP-wrapped LLM.

    Signal states, the output projectors' input, are the last layer's hidden state plus the input
    embedding at a signal token (official: `hidden_states[-1] + input embeddings`):
    `signals={modality: (rows (n,), starts (n,))}` gives `states[modality]` (n, N, hidden) for the
    group of N signal tokens starting at (rows[i], starts[i]); `all_states=True` gives them at every
    position (generation, which learns only afterwards which tokens were signal tokens).

    `logits_at` (B, T) bool: the logits only at those positions, (K, vocab), from the last hidden state
    through the LLM's output layer (training: the positions whose next token is scored, a third of a
    conversation's — no (B, T, 49k) logits tensor, ~700 MB at 8 × 448 tokens; a whole step measured no
    faster for it; an all-False mask: none, for the refit, which needs only the states)."""
    if inputs_embeds is None:
        x = llm.get_input_embeddings()(input_ids)
        if media_vectors is not None and media_vectors.shape[0]:
            proj = input_proj(media_vectors.to(input_proj.weight.dtype)).to(x.dtype)
            x = x.index_put((media_batch, media_pos), proj)
    else:
        x = inputs_embeds
    wanted = bool(signals) or all_states or logits_at is not None
    kw = {} if logits_at is None else {"logits_to_keep": 1}  # the last position's only; the chosen ones below
    out = llm(inputs_embeds=x, attention_mask=attention_mask, past_key_values=past_key_values, use_cache=use_cache,
              output_hidden_states=wanted, **kw)  # fmt: skip
    logits = out.logits
    if logits_at is not None:
        logits = llm.get_output_embeddings()(out.hidden_states[-1][logits_at])
    states: dict[str, torch.Tensor] = {}
    everywhere = None
    if wanted:
        hidden = out.hidden_states[-1]
        if all_states:
            everywhere = hidden + x
        for m, (rows, starts) in (signals or {}).items():
            pos = starts[:, None] + torch.arange(MODALITIES[m].num_tokens, device=starts.device)
            at = rows[:, None].expand_as(pos)
            states[m] = hidden[at, pos] + x[at, pos]
    return Forward(logits, x, states, everywhere, out.past_key_values if use_cache else None)


@dataclass
class Run:
    """One reply's LLM state inside `NextGPT.generate`: how many prompt positions came from the cache,
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


class NextGPT(nn.Module):
    def __init__(self, llm, tokenizer, encoder, input_proj, output_projectors, *, template, system_prompt=None):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.encoder = encoder  # MediaEncoder (frozen ImageBind); not an nn.Module child on purpose
        self.input_proj = input_proj
        self.output_projectors = output_projectors  # nn.ModuleDict: image / video / audio
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

    # ------------------------------------------------------------------ building
    @classmethod
    def from_profile(cls, profile: Profile, cache_dir: Path) -> "NextGPT":
        if profile.llm.resolved_backend() == "llama_cpp":  # llama.cpp runs the LLM: nextgpt/llama_backend.py
            from nextgpt.llama_backend import LlamaCppNextGPT

            return LlamaCppNextGPT.from_profile(profile, cache_dir)
        from nextgpt.checkpoint import apply_checkpoint, load_checkpoint
        from nextgpt.encoder import MediaEncoder

        device, dtype = resolve(profile.llm.device, profile.llm.dtype)
        loaded = load_llm(profile.llm, cache_dir, device, dtype)
        enc_device, enc_dtype = resolve(profile.encoder.device, profile.encoder.dtype)
        encoder = MediaEncoder(profile.encoder, cache_dir, enc_device, enc_dtype)
        hidden = loaded.model.config.get_text_config().hidden_size
        torch.manual_seed(0)  # untrained projections are random: make them reproducible
        input_proj = InputProjection(encoder.out_dim, hidden)
        projectors = nn.ModuleDict({m: OutputProjector(hidden, profile.projectors[m]) for m in MODALITIES})
        llm = loaded.model
        if profile.checkpoint:
            ckpt = load_checkpoint(Path(profile.checkpoint).expanduser())
            llm = apply_checkpoint(ckpt, input_proj=input_proj, output_projectors=projectors, llm=llm)
        input_proj.to(device, dtype).eval()
        projectors.to(device, dtype).eval()
        return cls(
            llm, loaded.tokenizer, encoder, input_proj, projectors,
            template=profile.llm.template, system_prompt=profile.llm.system_prompt,
        )

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs) -> Forward:
        """`signal_forward` on this model's LLM and input projection (media spliced into their slots →
        LLM → logits and signal states); see there for the arguments."""
        return signal_forward(self.llm, self.input_proj, input_ids, **kwargs)

    # ------------------------------------------------------------------ inputs
    def encode_media(self, items: list[MediaInput]) -> torch.Tensor:
        """(n, hidden): each item its own LLM input embedding (the official code summed them)."""
        vectors = [None] * len(items)
        to_encode = [(i, it) for i, it in enumerate(items) if it.embedding is None]
        if to_encode:
            encoded = self.encoder.encode([(it.modality, it.path) for _, it in to_encode])
            for (i, _), v in zip(to_encode, encoded):
                vectors[i] = v
        for i, it in enumerate(items):
            if it.embedding is not None:
                vectors[i] = it.embedding.reshape(-1)
        stacked = torch.stack(vectors).to(self.device, self.input_proj.weight.dtype)
        # one item at a time: a batched matmul's last bits depend on the batch's size, and an item
        # must get the same embedding (so the same cache key) on every turn, however many media the
        # history holds. Batched, a second media item changed the first one's digest by float noise
        # and PromptCache was reused only up to that first item: the turn was prefilled again.
        return torch.cat([self.input_proj(v[None]) for v in stacked])

    def build_inputs(self, messages: list[Message]) -> tuple[torch.Tensor, list]:
        """Prompt embeddings (1, T, hidden) — the template's tokens with media spliced into their
        slots — and one key per position (the token id, or a digest of the media embedding), which
        `PromptCache` compares to reuse the key/value cache of an unchanged prefix."""
        messages = escape.neutralise_messages(messages, self.markers)  # typed markers stay text
        ids = torch.tensor(templates.encode(self.template, self.tokenizer, messages, self.system_prompt), dtype=torch.long)
        embed = self.llm.get_input_embeddings()
        media = [item for m in messages for item in m.media]
        keys: list = ids.tolist()
        pairs = zip(keys, keys[1:])  # on Python ints: indexing the tensor one element at a time cost ms per turn
        slots = [i + 1 for i, pair in enumerate(pairs) if pair == (self.media_start_id, self.media_end_id)]
        if len(slots) != len(media):  # the template writes one slot per item; text can no longer add any
            raise ValueError(f"prompt has {len(slots)} media slots for {len(media)} media items")
        limit = getattr(self.llm.config.get_text_config(), "max_position_embeddings", None)
        if limit and len(keys) + len(media) > limit:  # refused before the prefill, the expensive step
            raise BudgetExceeded(f"prompt too long ({len(keys) + len(media)} tokens, limit max_prompt_tokens = {limit}, "
                                 "the model's max_position_embeddings)")  # fmt: skip
        token_embeds = embed(ids.to(self.device))
        if not media:
            return token_embeds[None], keys
        media_embeds = self.encode_media(media).to(token_embeds.dtype)
        for slot, vector in sorted(zip(slots, media_embeds), key=lambda x: -x[0]):
            digest = hashlib.sha1(vector.detach().float().cpu().numpy().tobytes()).hexdigest()
            keys.insert(slot, ("media", digest))
        pieces, start = [], 0
        for slot, vector in zip(slots, media_embeds):  # <Img> [vector] </Img>
            pieces += [token_embeds[start:slot], vector[None]]
            start = slot
        pieces.append(token_embeds[start:])
        return torch.cat(pieces)[None], keys

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
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
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
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
        states: list[torch.Tensor] = []  # per generated token: last hidden state + its input embedding
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
        signals = []
        for modality, start in emitted:
            n = MODALITIES[modality].num_tokens
            group = torch.stack(states[start : start + n])[None]
            projector = self.output_projectors[modality]
            signals.append(Signal(modality, projector(group.to(projector.fc.weight.dtype)), start, group))
        timings["project"] = time.perf_counter() - t3
        text = self._text(ids).strip()
        if on_text is not None and len(text) > streamed:
            on_text(self._text(ids)[streamed:].rstrip())
        trace = self.tokenizer.decode(ids, skip_special_tokens=False)
        return Reply(text=text, trace=trace, signals=signals, token_ids=ids, finish_reason=finish, timings=timings)

    def _restated_states(self, words: list[int], modality: str, first: bool = False) -> list[torch.Tensor]:
        """`isolate_groups="restated"`/`"restated_all"`: the signal states of a `modality` group whose words
        are `words` (token ids), read as the only output of a one-turn conversation: user: the words without
        their leading "and"/","; assistant: RESTATE_LEAD + them (`first`: the words as written) + the group.
        [] when no words are left."""
        said = _LEADING_LINK.sub("", self._text(words)).strip()
        if not said:
            return []
        inputs, keys = self.build_inputs([Message("user", said)])
        reply = said if first else RESTATE_LEAD + said  # a reply's first words already open a reply
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

    # ------------------------------------------------------------------ the LLM steps generate runs
    # (transformers here; nextgpt/llama_backend.py overrides them and shares the loop above)
    def _prefill(self, inputs: torch.Tensor, keys: list, cache: PromptCache | None) -> tuple[torch.Tensor, "Run"]:
        """Feed the prompt (only what `cache` does not already hold): the next token's logits, and the
        state of this reply's run."""
        from nextgpt.kv_cache import KVCache

        kv, reused = (cache.reuse(keys) if cache is not None else (KVCache(), 0))
        out = self(inputs_embeds=inputs[:, reused:], past_key_values=kv, use_cache=True)
        return out.logits[0, -1], Run(reused, kv)

    def _feed(self, run: "Run", tokens: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Feed `tokens` in one pass: (the next token's logits, the signal state at each token: last hidden
        state + input embedding)."""
        out = self(torch.tensor([tokens], device=self.device), past_key_values=run.kv, use_cache=True, all_states=True)
        return out.logits[0, -1], list(out.all_states[0])

    def _states(self, run: "Run", tokens: list[int]) -> list[torch.Tensor]:
        """Feed `tokens` in one pass: the signal state (last hidden state + input embedding) at each."""
        out = self(torch.tensor([tokens], device=self.device), past_key_values=run.kv, use_cache=True, all_states=True)
        return list(out.all_states[0])

    def _cut(self, run: "Run", length: int) -> None:
        """Keep the first `length` positions (prompt + reply tokens) of what was fed."""
        from nextgpt.kv_cache import crop_to

        crop_to(run.kv, length)

    def _full(self, run: "Run") -> bool:
        """No room for another position (llama.cpp's context); transformers has none of its own."""
        return False

    def _finish(self, run: "Run", cache: PromptCache | None, keys: list) -> None:
        if cache is not None:  # the cache now holds the prompt and every token fed since
            cache.store(run.kv, keys)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _warpers(temperature: float, top_p: float, top_k: int) -> Warpers | None:
        return None if temperature == 0 else Warpers(temperature, top_k, top_p)  # None: greedy

    def _sample(self, ids, logits, warpers, generator, allow_media=True) -> int:
        # only a modality's first signal token may be sampled; the rest of its group is forced
        logits = logits.float().clone()
        for m, group in self.signal_ids.items():
            logits[group if not allow_media else group[1:]] = float("-inf")
        for token in (self.media_start_id, self.media_end_id):
            logits[token] = float("-inf")
        if warpers is None:
            return int(logits.argmax())
        scores = warpers(logits[None])
        # drawn on the CPU, where `generate`'s seeded generator lives: torch.multinomial refuses a CPU
        # generator for CUDA probabilities, and a seed then gives the same reply on every device
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=generator)[0, 0])

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
