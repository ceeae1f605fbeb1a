"""NExT-GPT: ImageBind → input projection → LLM with signal tokens → output projectors.

    media files ──ImageBind──► 1 vector each ──input_proj──► one LLM input embedding per item
    prompt (template, one <Img></Img> slot per item) ──► LLM ──► text + [IMG0..3] [VID0..23] [AUD0..7]
    hidden states at the signal tokens (last layer + input embeddings) ──output projector──► prompt_embeds

The core stops at `prompt_embeds`: rendering them into media is the decoder tools' job (tools/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nextgpt.config import Profile
from nextgpt.devices import resolve
from nextgpt.llm import load_llm
from nextgpt.loop import (  # noqa: F401  (re-exported: nextgpt.model.Reply, PromptCache, ...)
    RESTATE_LEAD, PromptCache, Reply, Run, Signal, SignalLoop, load_model, repeated_phrase, repeating_tail,
)
from nextgpt.messages import MediaInput, Message  # noqa: F401  (re-exported: nextgpt.model.Message)
from nextgpt.projectors import InputProjection, OutputProjector
from nextgpt.tokens import MODALITIES

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


def project_media(encoder, input_proj, items: list[MediaInput]) -> torch.Tensor:
    """(n, hidden): each media item through ImageBind (unless it carries its embedding) and the input projection."""
    vectors = [None] * len(items)
    to_encode = [(i, it) for i, it in enumerate(items) if it.embedding is None]
    if to_encode:
        encoded = encoder.encode([(it.modality, it.path) for _, it in to_encode])
        for (i, _), v in zip(to_encode, encoded):
            vectors[i] = v
    for i, it in enumerate(items):
        if it.embedding is not None:
            vectors[i] = it.embedding.reshape(-1)
    stacked = torch.stack(vectors).to(input_proj.weight.device, input_proj.weight.dtype)
    # one item at a time: a batched matmul's last bits depend on the batch's size, and an item
    # must get the same embedding (so the same cache key) on every turn, however many media the
    # history holds. Batched, a second media item changed the first one's digest by float noise
    # and PromptCache was reused only up to that first item: the turn was prefilled again.
    return torch.cat([input_proj(v[None]) for v in stacked])


class NextGPT(nn.Module, SignalLoop):
    """NExT-GPT on transformers (the reference path); `generate` is `SignalLoop.generate`."""

    def __init__(self, llm, tokenizer, encoder, input_proj, output_projectors, *, template, system_prompt=None):
        super().__init__()
        self.llm = llm
        self.encoder = encoder  # MediaEncoder (frozen ImageBind); not an nn.Module child on purpose
        self.input_proj = input_proj
        self.output_projectors = output_projectors  # nn.ModuleDict: image / video / audio
        self._setup(tokenizer, template, system_prompt)

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
        return project_media(self.encoder, self.input_proj, items)

    def _token_rows(self, ids: list[int]) -> torch.Tensor:
        return self.llm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=self.device))

    def _cat(self, pieces: list) -> torch.Tensor:
        return torch.cat([p.to(pieces[0].dtype) for p in pieces])

    def _max_positions(self) -> int | None:
        return getattr(self.llm.config.get_text_config(), "max_position_embeddings", None)

    # ------------------------------------------------------------------ generation: SignalLoop.generate, without autograd
    generate = torch.inference_mode()(SignalLoop.generate)

    def _project(self, modality: str, states: list, position: int) -> Signal:
        group = torch.stack(states)[None]
        projector = self.output_projectors[modality]
        return Signal(modality, projector(group.to(projector.fc.weight.dtype)), position, group)

    # ------------------------------------------------------------------ the LLM steps SignalLoop.generate runs
    # (transformers here; nextgpt/llama_backend.py has its own)
    def _prefill(self, inputs: torch.Tensor, keys: list, cache: PromptCache | None) -> tuple[np.ndarray, Run]:
        """Feed the prompt (only what `cache` does not already hold): the next token's logits, and the
        state of this reply's run."""
        from nextgpt.kv_cache import KVCache

        kv, reused = (cache.reuse(keys) if cache is not None else (KVCache(), 0))
        out = self(inputs_embeds=inputs[:, reused:], past_key_values=kv, use_cache=True)
        return _logits(out), Run(reused, kv)

    def _feed(self, run: Run, tokens: list[int]) -> tuple[np.ndarray, list[torch.Tensor]]:
        """Feed `tokens` in one pass: (the next token's logits, the signal state at each token: last hidden
        state + input embedding)."""
        out = self(torch.tensor([tokens], device=self.device), past_key_values=run.kv, use_cache=True, all_states=True)
        return _logits(out), list(out.all_states[0])

    def _cut(self, run: "Run", length: int) -> None:
        """Keep the first `length` positions (prompt + reply tokens) of what was fed."""
        from nextgpt.kv_cache import crop_to

        crop_to(run.kv, length)

    def _finish(self, run: "Run", cache: PromptCache | None, keys: list) -> None:
        if cache is not None:  # the cache now holds the prompt and every token fed since
            cache.store(run.kv, keys)


def _logits(out) -> np.ndarray:
    """The next token's logits, fp32 on the CPU (SignalLoop samples on numpy)."""
    return out.logits[0, -1].detach().float().cpu().numpy()
