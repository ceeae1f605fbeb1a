"""`NextGPT.forward` (`nextgpt.model.signal_forward`): the one place media are spliced into their slots,
the LLM runs and the signal states (last hidden state + input embedding at the signal tokens) are
taken. Generation, the trainer and the small recipe's projector refit all run it, so for the same
dialog they see the same states."""

from __future__ import annotations

import torch

from nextgpt.messages import MediaInput, Message
from nextgpt.tokens import MODALITIES


def _batch(model, examples):
    from training.trainer.encode import Collator, MediaCache

    shapes = {m: (p.query_embs.shape[1], p.model.out_features) for m, p in model.output_projectors.items()}
    target = lambda m, cap: torch.ones(shapes[m])  # noqa: E731 - any target: has_target set
    collate = Collator(model.tokenizer.pad_token_id or 0, model.input_proj.in_features, shapes, MediaCache(model.encoder.encode), target)
    return collate, collate(examples)


def test_trainer_refit_and_generate_see_the_same_signal_states(tiny_model, media_files):
    from training.small import signal_states
    from training.trainer.data import Dialog, Output, Turn
    from training.trainer.encode import DialogEncoder
    from training.trainer.trainer import TrainModule

    model, image = tiny_model, media_files["red.png"]
    enc = DialogEncoder(model.tokenizer, model.template, model.system_prompt)
    # the reply is the signal group alone, so generate (the group forced at once) feeds the same tokens
    dialog = Dialog([Turn("user", "draw this in blue", media=[("image", image)]),
                     Turn("assistant", "", outputs=[Output("image", "a blue square")])])  # fmt: skip
    longer = Dialog([Turn("user", "a much longer request, so that the first example is padded in the batch " * 3),
                     Turn("assistant", "", outputs=[Output("image", "a red circle")])])  # fmt: skip
    ex, ex_long = enc.encode(dialog), enc.encode(longer)
    (start, modality, _), = ex.signals
    assert modality == "image" and len(ex_long.input_ids) > len(ex.input_ids)
    n = MODALITIES["image"].num_tokens
    assert ex.input_ids[start : start + n] == model.signal_ids["image"]

    reply = model.generate([Message("user", "draw this in blue", [MediaInput("image", path=image)])],
                           want=["image"], max_new_tokens=0)  # fmt: skip
    (signal,) = reply.signals
    assert reply.token_ids[:n] == model.signal_ids["image"] and signal.position == 0
    prompt = model.build_inputs([Message("user", "draw this in blue", [MediaInput("image", path=image)])])[0]
    assert prompt.shape[1] == start  # the example's context is generate's prompt, to the position
    generated = signal.states[0]  # (N, hidden)

    # the trainer: its module runs the batch (padded: the short example second) through the same function
    collate, batch = _batch(model, [ex_long, ex])
    module = TrainModule(model.llm, model.input_proj, model.output_projectors, {m: 1.0 for m in MODALITIES})
    with torch.no_grad():
        out = module.run(batch)
    rows = batch["signals"]["image"]["batch"]
    trained = out.states["image"][rows == 1][0]
    torch.testing.assert_close(trained, generated, rtol=1e-4, atol=1e-5)
    # and its loss uses exactly those states
    with torch.no_grad():
        losses = module(batch)
        proj = model.output_projectors["image"]
        pred = proj(out.states["image"].to(proj.fc.weight.dtype))
        l2 = torch.linalg.vector_norm(pred.float() - batch["signals"]["image"]["target"].float(), dim=-1).mean()
    torch.testing.assert_close(losses["l2_image"], l2)

    # the refit's states (what the small recipe fits the projectors on)
    refit = signal_states(model, collate, [ex, ex_long], forward_batch=2)["image.x"]
    assert refit.shape == (2, n, generated.shape[-1])
    torch.testing.assert_close(refit[0], generated.float(), rtol=1e-4, atol=1e-5)  # sorted by length: ex first

    # the projected signal generate hands the decoder is the projector on those states
    torch.testing.assert_close(signal.prompt_embeds, proj(trained[None].to(proj.fc.weight.dtype)), rtol=1e-4, atol=1e-5)


def test_forward_splices_media_into_their_slots(tiny_model, media_files):
    """Token ids + media vectors at (row, position) give the same inputs as build_inputs' prompt, and
    `all_states` is hidden state + input embedding at every position."""
    model = tiny_model
    message = Message("user", "what is this?", [MediaInput("image", path=media_files["red.png"])])
    prompt, keys = model.build_inputs([message])
    slot = next(i for i, k in enumerate(keys) if isinstance(k, tuple))
    ids = torch.tensor([[k if not isinstance(k, tuple) else 0 for k in keys]])
    vector = model.encoder.encode([("image", media_files["red.png"])]).to(model.input_proj.weight.dtype)
    with torch.no_grad():
        spliced = model(ids, media_vectors=vector, media_batch=torch.tensor([0]), media_pos=torch.tensor([slot]), all_states=True)
        ready = model(inputs_embeds=prompt, all_states=True)
        plain = model.llm(inputs_embeds=prompt, output_hidden_states=True)
    torch.testing.assert_close(spliced.inputs_embeds, prompt)
    torch.testing.assert_close(spliced.logits, ready.logits)
    torch.testing.assert_close(ready.all_states, plain.hidden_states[-1] + prompt)
    assert ready.states == {} and ready.past_key_values is None
