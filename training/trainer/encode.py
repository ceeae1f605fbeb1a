"""Dialogs → token ids, labels, media slots and signal-token groups; batches for the trainer.

The text is rendered with the profile's own template (`nextgpt.templates`, exactly what
`NextGPT.generate` sees at inference): for each assistant turn, the prompt up to that turn is
context (labels −100) and the reply is the target:

    vicuna_v0: `{reply}{signal tokens}\\n###`   (the official format; `###` is the stop string)
    chat:      `{reply}{signal tokens}{eos}`     (templates that close a turn with the EOS token)

vicuna_v0 is tokenized as the official training code did (`templates.tokenize_vicuna`): one BOS,
then each template piece on its own, whitespace around the added tokens dropped — so after a
signal group the reply's stop is `[IMG3]▁###`, without the newline token, as in the released weights.

Signal tokens are written as one contiguous group per output (`[IMG0][IMG1][IMG2][IMG3]`, no
spaces): that is what `generate` produces when it forces a group, so the hidden states the
projector learns from sit at the same positions as at inference. The official stage-2 target text
has spaces between them (`[IMG0] [IMG1] ...`); with its tokenizer that puts a space token between
every signal token, which our `generate` never emits. A group goes at the end of the reply, or
where the reply mentions its output when the data marks the place (`Output.at`: "a green square
<image> and a high beep <audio>"), so a second group follows words that name it.

Only assistant tokens carry labels. Each user media item is one input position between `<Img>`
and `</Img>` (filled with the input projection of its encoder vector in the forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nextgpt import templates
from nextgpt.tokens import MEDIA_END, MEDIA_START, MODALITIES
from training.trainer.data import Dialog, Output, Turn

IGNORE = -100


class TemplateError(ValueError):
    """The template cannot be split into context and reply for training."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    media: list[tuple[int, str, Path]] = field(default_factory=list)  # (position, modality, path)
    signals: list[tuple[int, str, str | None]] = field(default_factory=list)  # (start, modality, caption)
    source: str = ""


class DialogEncoder:
    def __init__(self, tokenizer, template: str = "vicuna_v0", system_prompt: str | None = None, max_length: int = 512):
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.max_length = int(max_length)
        tok = tokenizer.convert_tokens_to_ids
        self.media_start, self.media_end = tok(MEDIA_START), tok(MEDIA_END)
        self.signal_ids = {m: tok(spec.signal_tokens) for m, spec in MODALITIES.items()}
        self.first_signal = {ids[0]: m for m, ids in self.signal_ids.items()}
        self.all_signal = {i for ids in self.signal_ids.values() for i in ids}
        self.placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if template == "vicuna_v0":
            self.end = "\n" + templates.VICUNA_STOP
        else:
            if not tokenizer.eos_token:
                raise TemplateError(f"template {template!r}: the tokenizer has no EOS token to end a reply with")
            self.end = tokenizer.eos_token
        self.truncated = 0  # examples cut at max_length
        self.skipped = 0  # examples with nothing left to train after truncation

    # ------------------------------------------------------------------ text
    def segments(self, dialog: Dialog) -> list[tuple[str, bool, list]]:
        """[(text, trained, outputs)]: context and reply pieces whose concatenation is the rendered
        dialog (replies followed by the template's end of turn)."""
        return [("".join(pieces), trained, outputs) for pieces, trained, outputs in self._pieces(dialog)]

    def _pieces(self, dialog: Dialog) -> list[tuple[list[str], bool, list]]:
        """As `segments`, each text split into the pieces that are tokenized one by one (vicuna_v0:
        the official code's pieces, `templates.vicuna_v0_segments`; chat: one piece)."""
        from nextgpt.messages import MediaInput, Message

        msgs: list = []
        done: list[str] = []
        out: list[tuple[list[str], bool, list]] = []
        for turn in dialog.turns:
            if turn.role == "user":
                msgs.append(Message("user", turn.text, [MediaInput(m, path=p) for m, p in turn.media]))
                continue
            if self.template == "vicuna_v0":
                prompt = templates.vicuna_v0_segments(msgs, self.system_prompt)
            else:
                prompt = [templates.render(self.template, self.tokenizer, msgs, self.system_prompt)]
            pieces_kept = self.template != "vicuna_v0" or prompt[: len(done)] == done
            if not pieces_kept or not "".join(prompt).startswith("".join(done)):
                raise TemplateError(
                    f"{dialog.source or 'dialog'}: template {self.template!r} cannot be trained on: rendering the dialog "
                    f"after a reply + {self.end!r} (the tokenizer's EOS, which ends a reply at inference) does not give "
                    f"the same text as the template's own rendering of that turn; use the vicuna_v0 template"
                )
            if self.template == "vicuna_v0":
                context = prompt[len(done) :]
            else:
                context = ["".join(prompt)[len("".join(done)) :]]
            out.append((context, False, []))
            content = with_signals(turn.text, turn.outputs)
            out.append(([content + self.end], True, list(turn.outputs)))
            done = prompt + [content + self.end]
            msgs.append(Message("assistant", content))
        return out

    def _tokenize(self, text: str) -> list[int]:
        if self.template == "vicuna_v0":
            return templates.tokenize_segment(self.tokenizer, text)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ tokens
    def encode(self, dialog: Dialog) -> Example | None:
        """Token ids + labels; None when truncation left nothing to train."""
        ids: list[int] = []
        labels: list[int] = []
        media_pos: list[int] = []
        signals: list[tuple[int, str, str | None]] = []
        if self.template == "vicuna_v0" and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)  # as templates.tokenize_vicuna: one BOS first
            labels.append(IGNORE)
        for pieces, trained, outputs in self._pieces(dialog):
            seg = [t for piece in pieces for t in self._tokenize(piece)]
            if trained:
                groups = self._groups(seg, dialog.source)
                want = [o.modality for o in outputs]
                if [m for _, m in groups] != want:
                    raise TemplateError(f"{dialog.source}: the reply's signal tokens tokenized as {groups}, expected groups {want}")
                signals += [(len(ids) + pos, m, o.caption) for (pos, m), o in zip(groups, outputs)]
                ids += seg
                labels += seg
                continue
            if any(t in self.all_signal for t in seg):
                raise TemplateError(f"{dialog.source}: signal tokens in the context outside a reply")
            for t in seg:
                ids.append(t)
                labels.append(IGNORE)
                if len(ids) >= 2 and ids[-2] == self.media_start and t == self.media_end:
                    # <Img></Img> → <Img> [media] </Img>
                    ids.insert(len(ids) - 1, self.placeholder)
                    labels.insert(len(labels) - 1, IGNORE)
                    media_pos.append(len(ids) - 2)
        items = dialog.media
        if len(items) != len(media_pos):
            raise TemplateError(f"{dialog.source}: {len(media_pos)} media slots for {len(items)} media items")
        media = [(pos, m, p) for pos, (m, p) in zip(media_pos, items)]
        if len(ids) > self.max_length:
            self.truncated += 1
            L = self.max_length
            ids, labels = ids[:L], labels[:L]
            media = [x for x in media if x[0] < L]
            signals = [s for s in signals if s[0] + MODALITIES[s[1]].num_tokens <= L]
        if all(lab == IGNORE for lab in labels[1:]):
            self.skipped += 1
            return None
        return Example(ids, labels, media, signals, source=dialog.source)

    def _groups(self, seg: list[int], source: str) -> list[tuple[int, str]]:
        out, i = [], 0
        while i < len(seg):
            t = seg[i]
            if t in self.first_signal:
                m = self.first_signal[t]
                n = MODALITIES[m].num_tokens
                if seg[i : i + n] != self.signal_ids[m]:
                    raise TemplateError(f"{source}: incomplete {m} signal-token group in a reply")
                out.append((i, m))
                i += n
                continue
            if t in self.all_signal:
                raise TemplateError(f"{source}: stray signal token in a reply")
            i += 1
        return out


# --------------------------------------------------------------------------------------------------
# batches


def isolate_later_groups(examples: list[Example]) -> list[Example]:
    """The examples as `generate(isolate_groups=True)` reads their signal groups: a group that follows
    another group in the same reply is taken out and read in an example of its own — the context up to
    that reply + only the reply's words since the previous group + the group (what inference re-reads
    after the prompt), so the projector is fitted on the states it gets at inference. A reply is a
    run of labelled tokens; its context is everything before it."""
    out = []
    for e in examples:
        kept, extra = [], []
        for k, (start, modality, caption) in enumerate(e.signals):
            reply = start
            while reply > 0 and e.labels[reply - 1] != IGNORE:
                reply -= 1
            prev = e.signals[k - 1] if k else None
            if prev is None or prev[0] < reply:  # the reply's first group: read as it is
                kept.append((start, modality, caption))
                continue
            since, end = prev[0] + MODALITIES[prev[1]].num_tokens, start + MODALITIES[modality].num_tokens
            extra.append(Example(
                input_ids=e.input_ids[:reply] + e.input_ids[since:end], labels=e.labels[:reply] + e.labels[since:end],
                media=[m for m in e.media if m[0] < reply], signals=[(reply + start - since, modality, caption)],
                source=e.source,
            ))  # fmt: skip
        out.append(Example(e.input_ids, e.labels, e.media, kept, e.source) if len(kept) < len(e.signals) else e)
        out += extra
    return out


def restated_dialogs(dialog: Dialog) -> list[Dialog]:
    """Each output of the dialog as `generate(isolate_groups="restated_all")` reads its signal states: in
    a one-turn dialog of its own, the user saying the reply's words since the previous group and the
    reply restating them + the group (`nextgpt.loop.restatement`, the rule inference applies), so the
    projector refit fits the states inference feeds it. Outputs with no words before them are left out."""
    from nextgpt.loop import restatement

    out = []
    for turn in dialog.turns:
        done = 0
        for k, (o, at) in enumerate(zip(turn.outputs, group_offsets(turn.text, turn.outputs))):
            restated = restatement(turn.text[done:at], first=k == 0)
            done = at
            if restated is not None:
                said, reply = restated
                out.append(Dialog([Turn("user", said), Turn("assistant", reply, outputs=[Output(o.modality, o.caption)])],
                                  source=f"{dialog.source} (restated output {k + 1})"))  # fmt: skip
    return out


def with_signals(text: str, outputs) -> str:
    """The reply as the model writes it: each output's signal group where it is mentioned
    (`Output.at`, a character offset) or, by default, at the end, in the order of the outputs."""
    pieces, done = [], 0
    for o, at in zip(outputs, group_offsets(text, outputs)):
        pieces += [text[done:at], "".join(MODALITIES[o.modality].signal_tokens)]
        done = at
    return "".join(pieces) + text[done:]


def group_offsets(text: str, outputs) -> list[int]:
    """Where in `text` each output's signal group goes: its `Output.at`, kept in order and inside the
    text, or the end (with_signals writes the groups there; restated_dialogs reads the words before them)."""
    offsets, done = [], 0
    for o in outputs:
        done = len(text) if o.at is None else max(done, min(o.at, len(text)))
        offsets.append(done)
    return offsets


def align_target(t: torch.Tensor, q: int) -> torch.Tensor:
    """A decoder text embedding (L, D) / (1, L, D) / (D,) / (1, D) → (q, D): the first q positions
    (fewer projector queries than tokenizer positions: the tiny profile's 8 vs 77), or the last
    position repeated when there are fewer — the same rule the decoder tools use for the
    unconditional embedding."""
    t = t.detach()
    if t.ndim == 3:
        if t.shape[0] != 1:
            raise ValueError(f"expected one target embedding, got shape {tuple(t.shape)}")
        t = t[0]
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise ValueError(f"target embedding must be (L, D) or (D,), got shape {tuple(t.shape)}")
    if t.shape[0] >= q:
        return t[:q]
    return torch.cat([t, t[-1:].expand(q - t.shape[0], -1)])


class Collator:
    """Examples → a padded batch (a dict of CPU tensors).

    `media_fn([(modality, path), ...])` → (n, E) encoder vectors; `target_fn(modality, caption)` →
    the decoder's text embedding; `target_shapes[modality]` = (Q, D) of that modality's projector.
    """

    def __init__(
        self,
        pad_id: int,
        media_dim: int,
        target_shapes: dict[str, tuple[int, int]],
        media_fn: Callable[[list[tuple[str, Path]]], torch.Tensor] | None = None,
        target_fn: Callable[[str, str], torch.Tensor] | None = None,
    ):
        self.pad_id = pad_id
        self.media_dim = media_dim
        self.target_shapes = target_shapes
        self.media_fn = media_fn
        self.target_fn = target_fn

    def __call__(self, examples: list[Example]) -> dict:
        with torch.profiler.record_function("collate"):  # (a label for the trainer's profile_steps)
            return self._collate(examples)

    def _collate(self, examples: list[Example]) -> dict:
        B = len(examples)
        T = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, e in enumerate(examples):
            n = len(e.input_ids)
            input_ids[b, :n] = torch.tensor(e.input_ids)
            labels[b, :n] = torch.tensor(e.labels)
            mask[b, :n] = 1
        items = [(b, pos, m, p) for b, e in enumerate(examples) for pos, m, p in e.media]
        if items:
            if self.media_fn is None:
                raise ValueError("these examples have media inputs but no media encoder was given")
            vectors = self.media_fn([(m, p) for _, _, m, p in items]).detach().float().cpu()
        else:
            vectors = torch.zeros(0, self.media_dim)
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "media_batch": torch.tensor([x[0] for x in items], dtype=torch.long),
            "media_pos": torch.tensor([x[1] for x in items], dtype=torch.long),
            "media_vectors": vectors,
            "signals": {},
        }
        for m in MODALITIES:
            groups = [(b, s, cap) for b, e in enumerate(examples) for s, mm, cap in e.signals if mm == m]
            if not groups:
                continue
            q, d = self.target_shapes[m]
            target = torch.zeros(len(groups), q, d)
            has = torch.zeros(len(groups), dtype=torch.bool)
            for g, (_, _, cap) in enumerate(groups):
                if cap is None or self.target_fn is None:
                    continue
                t = align_target(self.target_fn(m, cap), q).float().cpu()
                if t.shape[-1] != d:
                    raise ValueError(
                        f"the {m} decoder's text embedding is {t.shape[-1]}-d but the {m} output projector's out_dim is {d}"
                    )
                target[g] = t
                has[g] = True
            batch["signals"][m] = {
                "batch": torch.tensor([x[0] for x in groups], dtype=torch.long),
                "start": torch.tensor([x[1] for x in groups], dtype=torch.long),
                "target": target,
                "has_target": has,
            }
        return batch


class MediaCache:
    """`media_fn` over a frozen encoder, computing each file's vector once."""

    def __init__(self, encode: Callable[[list[tuple[str, Path]]], torch.Tensor]):
        self.encode = encode
        self.vectors: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, items: list[tuple[str, Path]]) -> torch.Tensor:
        todo = list(dict.fromkeys((m, str(p)) for m, p in items if (m, str(p)) not in self.vectors))
        if todo:
            out = self.encode([(m, Path(p)) for m, p in todo])
            for key, v in zip(todo, out):
                self.vectors[key] = v.detach().float().cpu()
        return torch.stack([self.vectors[(m, str(p))] for m, p in items])
