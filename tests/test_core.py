"""The NExT-GPT core on the tiny profile: tokens, templates, generation with signal tokens, projection."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nextgpt import templates
from nextgpt.model import MediaInput, Message
from nextgpt.tokens import MODALITIES, NEW_TOKENS


def test_official_tokens_appended_in_order(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.convert_tokens_to_ids(NEW_TOKENS)
    base = ids[0]
    assert ids == list(range(base, base + 38))
    assert tiny_model.llm.get_input_embeddings().weight.shape[0] == len(tok) == base + 38
    assert tiny_model.llm.get_output_embeddings().weight.shape[0] == len(tok)


def test_text_only_reply_streams_and_has_no_signals(tiny_model):
    chunks = []
    reply = tiny_model.generate(
        [Message("user", "hello")], allow_media=False, seed=3, max_new_tokens=12, on_text=chunks.append
    )
    assert reply.signals == []
    assert not any(t in reply.trace for t in NEW_TOKENS)
    assert 1 <= len(reply.token_ids) <= 12
    assert "".join(chunks).strip() == reply.text


@pytest.mark.parametrize("modality", list(MODALITIES))
def test_forced_modality_projects_to_decoder_shape(tiny_model, settings, modality):
    reply = tiny_model.generate([Message("user", "make something")], want=[modality], seed=0, max_new_tokens=4)
    cfg = settings.profile("tiny").projectors[modality]
    mine = [s for s in reply.signals if s.modality == modality]
    assert mine, reply.trace
    assert mine[0].prompt_embeds.shape == (1, cfg.num_queries, cfg.out_dim)
    assert "".join(MODALITIES[modality].signal_tokens) in reply.trace.replace(" ", "")
    if cfg.normalize:
        assert torch.allclose(mine[0].prompt_embeds.norm(dim=-1), torch.ones(1, cfg.num_queries), atol=1e-4)


def test_all_three_modalities_in_one_reply(tiny_model):
    reply = tiny_model.generate([Message("user", "all of it")], want=["image", "video", "audio"], seed=0, max_new_tokens=4)
    assert {"image", "video", "audio"} <= {s.modality for s in reply.signals}
    for s in reply.signals:  # every group is complete and contiguous
        group = MODALITIES[s.modality].signal_tokens
        got = tiny_model.tokenizer.convert_ids_to_tokens(reply.token_ids[s.position : s.position + len(group)])
        assert got == group


def test_sampler_that_strays_after_first_signal_token_is_corrected(tiny_model):
    """Make [IMG0] the model's favourite first token; left alone, the model would not continue with
    [IMG1] (checked below), which crashed the official code. Ours forces the whole group."""
    tok = tiny_model.tokenizer
    img = tok.convert_tokens_to_ids(MODALITIES["image"].signal_tokens)
    head = tiny_model.llm.get_output_embeddings().weight
    saved = head.data.clone()
    try:
        with torch.no_grad():  # a direction every hidden state shares: push [IMG0] up everywhere
            h, _ = tiny_model.build_inputs([Message("user", "hi")])
            out = tiny_model.llm(inputs_embeds=h, output_hidden_states=True)
            direction = out.hidden_states[-1][0, -1]
            head.data[img[0]] = direction / direction.norm() * 1000
            first = int(tiny_model.llm(inputs_embeds=h).logits[0, -1].argmax())
            assert first == img[0]
            after = torch.cat([h, tiny_model.llm.get_input_embeddings()(torch.tensor([[img[0]]]))], 1)
            unconstrained_next = int(tiny_model.llm(inputs_embeds=after).logits[0, -1].argmax())
            assert unconstrained_next != img[1]  # the sampler would stray here
        reply = tiny_model.generate([Message("user", "hi")], temperature=0, max_new_tokens=6)
    finally:
        head.data.copy_(saved)
    assert reply.token_ids[:4] == img
    assert reply.signals[0].modality == "image" and reply.signals[0].position == 0


def test_same_seed_same_reply_different_seed_differs(tiny_model):
    a = tiny_model.generate([Message("user", "x")], seed=7, max_new_tokens=10, want=["image"])
    b = tiny_model.generate([Message("user", "x")], seed=7, max_new_tokens=10, want=["image"])
    c = tiny_model.generate([Message("user", "x")], seed=8, max_new_tokens=10, want=["image"])
    assert a.token_ids == b.token_ids
    assert torch.equal(a.signals[0].prompt_embeds, b.signals[0].prompt_embeds)
    assert a.token_ids != c.token_ids


def test_unknown_wanted_modality_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        tiny_model.generate([Message("user", "x")], want=["smell"])


def test_each_media_item_gets_its_own_slot(tiny_model, media_files):
    items = [MediaInput("image", media_files["red.png"]), MediaInput("image", media_files["blue.png"])]
    text_only, _ = tiny_model.build_inputs([Message("user", "compare")])
    with_two, keys = tiny_model.build_inputs([Message("user", "compare", items)])
    assert len(keys) == with_two.shape[1] and sum(isinstance(k, tuple) for k in keys) == 2
    # <Img></Img> twice; the space between "Human:" and the slots is dropped (the official tokenizer
    # stripped whitespace around added tokens; the byte-level tiny tokenizer had made it a token)
    slot_tokens = 2 * 2 - 1
    assert with_two.shape[1] == text_only.shape[1] + slot_tokens + 2  # + one embedding per item
    projected = tiny_model.encode_media(items)
    ids = templates.encode("vicuna_v0", tiny_model.tokenizer, [Message("user", "compare", items)])
    assert tiny_model.tokenizer.decode(ids) == "<s>### Human:<Img></Img><Img></Img>compare\n### Assistant: "
    starts = [i for i, t in enumerate(ids) if t == tiny_model.media_start_id]
    # the first slot sits right after the first <Img>; the second after the second <Img>, shifted by one
    assert torch.allclose(with_two[0, starts[0] + 1], projected[0])
    assert torch.allclose(with_two[0, starts[1] + 2], projected[1])
    assert not torch.allclose(projected[0], projected[1])  # not summed into one token


def test_audio_and_video_inputs_are_encoded(tiny_model, media_files):
    items = [MediaInput("audio", media_files["beep.wav"]), MediaInput("video", media_files["move.mp4"])]
    reply = tiny_model.generate([Message("user", "what is this?", items)], seed=0, max_new_tokens=4)
    assert reply.token_ids
    vectors = tiny_model.encode_media(items)
    assert vectors.shape == (2, tiny_model.llm.config.hidden_size)
    assert torch.isfinite(vectors).all()


def test_typed_media_markers_make_no_slot(tiny_model):
    """`<Img></Img>` typed by a user stays text: no media slot, no error, the turn works (issue 17)."""
    embeds, keys = tiny_model.build_inputs([Message("user", "<Img></Img> sneaky", [])])
    assert tiny_model.media_start_id not in keys and not any(isinstance(k, tuple) for k in keys)
    assert embeds.shape[1] == len(keys)


def test_multi_turn_context_and_vicuna_stop(tiny_model):
    from nextgpt import templates

    msgs = [Message("user", "hi"), Message("assistant", "hello [IMG0][IMG1][IMG2][IMG3]"), Message("user", "again")]
    assert templates.vicuna_v0_segments(msgs) == [  # the pieces the official code tokenized one by one
        "### Human: ", "hi\n### Assistant: ", "hello [IMG0][IMG1][IMG2][IMG3]\n###", "Human: again\n### Assistant: "]  # fmt: skip
    ids = templates.encode("vicuna_v0", tiny_model.tokenizer, msgs)
    # byte-level tiny tokenizer: no sentencepiece "▁" at the start of each piece, so "###Human"
    assert tiny_model.tokenizer.decode(ids) == (
        "<s>### Human: hi\n### Assistant: hello[IMG0][IMG1][IMG2][IMG3]###Human: again\n### Assistant: ")  # fmt: skip
    ids = tiny_model.tokenizer("abc###def")["input_ids"]
    assert tiny_model._tokens_before(ids, 3) == 3  # byte-level: "abc" is 3 tokens


def test_chat_template_path(settings, cache_dir, tiny_model):
    from nextgpt.model import NextGPT

    m = NextGPT(
        tiny_model.llm, tiny_model.tokenizer, tiny_model.encoder, tiny_model.input_proj,
        tiny_model.output_projectors, template="chat", system_prompt="be brief",
    )
    from nextgpt import templates

    prompt = templates.render("chat", m.tokenizer, [Message("user", "hi")], "be brief")
    assert prompt.startswith("<|im_start|>system\nbe brief<|im_end|>") and prompt.endswith("<|im_start|>assistant\n")
    reply = m.generate([Message("user", "hi")], want=["audio"], seed=0, max_new_tokens=3)
    assert reply.signals[-1].modality == "audio"


def test_prompt_cache_reuses_the_prefix_and_matches_a_fresh_prefill(tiny_model, media_files):
    from nextgpt.model import PromptCache

    cache = PromptCache()
    history = [Message("user", "hello there", [MediaInput("image", media_files["red.png"])])]
    first = tiny_model.generate(history, seed=1, max_new_tokens=8, cache=cache, want=["image"])
    first_prompt = len(tiny_model.build_inputs(history)[1])
    history += [Message("assistant", first.trace), Message("user", "and again")]
    cached = tiny_model.generate(history, seed=2, max_new_tokens=8, cache=cache)
    fresh = tiny_model.generate(history, seed=2, max_new_tokens=8)
    full = fresh.timings["prefill_tokens"]
    # at least the whole first prompt is reused (the random tiny model's byte soup may not
    # re-tokenize to its own tokens, so the reply itself may be fed again)
    assert cached.timings["prefill_tokens"] <= full - first_prompt
    assert cached.token_ids == fresh.token_ids
    # the logits after the cached prefix equal those of a fresh prefill, to tolerance
    inputs, keys = tiny_model.build_inputs(history)
    kv, reused = cache.reuse(keys)
    assert reused > 0
    with torch.no_grad():
        via_cache = tiny_model.llm(inputs_embeds=inputs[:, reused:], past_key_values=kv).logits[0, -1]
        direct = tiny_model.llm(inputs_embeds=inputs).logits[0, -1]
    assert torch.allclose(via_cache, direct, atol=1e-4)
    # an edited history (regenerate / truncation) shares less: recomputed from the first difference
    edited = [Message("user", "something else entirely")]
    tiny_model.generate(edited, seed=3, max_new_tokens=4, cache=cache)
    _, edited_keys = tiny_model.build_inputs(edited)
    assert cache.keys[: len(edited_keys)] == edited_keys


def test_growing_kv_cache_matches_transformers_dynamic_cache(tiny_model):
    """KVCache writes tokens into a buffer with spare room instead of torch.cat. Same logits as
    DynamicCache through: a long prefill, a crop, decoding across the buffer's re-allocation (256
    spare positions), a crop to nothing, and a call outside inference_mode on a buffer made inside it."""
    from transformers import DynamicCache

    from nextgpt.kv_cache import KVCache, crop_to

    torch.manual_seed(0)
    x = torch.randn(1, 700, tiny_model.llm.config.hidden_size)
    mine, theirs = KVCache(), DynamicCache()

    def both(chunk, inference=True):
        mode = torch.inference_mode() if inference else torch.no_grad()
        with mode:
            a = tiny_model.llm(inputs_embeds=chunk, past_key_values=mine, use_cache=True).logits
            b = tiny_model.llm(inputs_embeds=chunk, past_key_values=theirs, use_cache=True).logits
        assert mine.get_seq_length() == theirs.get_seq_length()
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()

    both(x[:, :200])
    crop_to(mine, 150), crop_to(theirs, 150)
    for i in range(150, 420):  # decode one position at a time, past the first buffer's end
        both(x[:, i : i + 1])
    both(x[:, 420:430], inference=False)  # a buffer made under inference_mode is re-made, not written
    crop_to(mine, 0), crop_to(theirs, 0)
    both(x[:, 500:700])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.3, 0.7, 1.0, 1.5]), st.sampled_from([0, 1, 5, 50, 500]),
       st.sampled_from([1.0, 0.9, 0.5, 0.01]), st.sampled_from([1.0, 4.0, 30.0]))  # fmt: skip
def test_warpers_equal_transformers_logits_warpers(seed, temperature, top_k, top_p, spread):
    """Sampling warps logits on numpy, without importing transformers or torch (a chat start on llama.cpp
    needs neither for its first words): temperature, top-k and top-p give transformers' scores, removed
    tokens included, on random logits of several spreads (a flat distribution, a peaked one, ties from
    rounding). Where tied scores straddle the nucleus's edge, which of them stay is arbitrary (torch's sort
    orders ties its own way, ours keeps their index order): the two may differ there and nowhere else."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from nextgpt.sampling import Warpers

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(1, 300, generator=g) * spread).round(decimals=1)
    theirs = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
    if top_k:
        theirs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        theirs.append(TopPLogitsWarper(top_p))
    expected = theirs(torch.zeros(1, 1, dtype=torch.long), logits.clone())
    got = torch.from_numpy(Warpers(temperature, top_k, top_p)(logits.numpy()))
    kept, kept_theirs = ~torch.isinf(got), ~torch.isinf(expected)
    differ = kept != kept_theirs
    edge = expected[kept_theirs].min()  # the lowest score transformers keeps
    assert torch.equal(got[kept & kept_theirs], expected[kept & kept_theirs])
    if differ.any():  # only tied scores at the edge, and as many kept by each
        before_top_p = logits.clone()
        for warper in list(theirs)[:-1]:
            before_top_p = warper(None, before_top_p)
        assert top_p < 1.0 and torch.all(before_top_p[differ] == edge)
        assert kept.sum() == kept_theirs.sum()


def test_warpers_equal_transformers_on_untied_logits():
    """Without ties, the kept set and the scores are transformers' exactly."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from nextgpt.sampling import Warpers

    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        logits = torch.randn(1, 2000, generator=g) * 3
        expected = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(50)(None, TemperatureLogitsWarper(0.7)(None, logits.clone())))
        got = torch.from_numpy(Warpers(0.7, 50, 0.9)(logits.numpy()))
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        assert torch.equal(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_draw_follows_the_distribution_and_never_draws_a_removed_token():
    """`draw`: a seed gives the same token again; over many draws each token comes up at its softmax
    probability (within 4 standard errors) and a -inf score never."""
    from nextgpt.sampling import draw

    scores = np.array([2.0, -np.inf, 1.0, 0.0, -np.inf, 1.5], dtype=np.float32)
    assert draw(scores, np.random.default_rng(5)) == draw(scores, np.random.default_rng(5))
    rng = np.random.default_rng(0)
    n = 20000
    counts = np.bincount([draw(scores, rng) for _ in range(n)], minlength=len(scores))
    e = np.exp(scores.astype(np.float64) - scores.max())  # -inf → 0
    p = e / e.sum()
    assert counts[1] == counts[4] == 0
    assert np.all(np.abs(counts / n - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-12)


def test_cached_turns_give_the_full_prefill_logits_through_a_conversation(tiny_model, media_files):
    """Turn after turn (media in and out, a regenerate, an edit, the oldest turns dropped), the logits
    after reusing the conversation's cache equal those of prefilling the whole prompt, and a cached
    reply equals an uncached one token for token."""
    from nextgpt.model import PromptCache

    cache, history = PromptCache(), []
    red = MediaInput("image", embedding=tiny_model.encoder.encode([("image", media_files["red.png"])])[0])

    def turn(seed, want=()):
        """(reply, prompt positions taken from the cache, prompt length)"""
        inputs, keys = tiny_model.build_inputs(history)
        kv, reused = cache.reuse(keys)
        with torch.inference_mode():
            direct = tiny_model.llm(inputs_embeds=inputs).logits[0, -1]
            via_cache = tiny_model.llm(inputs_embeds=inputs[:, reused:], past_key_values=kv, use_cache=True).logits[0, -1]
        assert torch.allclose(via_cache, direct, atol=1e-4), (via_cache - direct).abs().max()
        cache.store(kv, keys)  # the cache holds exactly this prompt, as generate leaves it
        cached = tiny_model.generate(history, seed=seed, max_new_tokens=6, want=want, cache=cache)
        fresh = tiny_model.generate(history, seed=seed, max_new_tokens=6, want=want)
        assert cached.token_ids == fresh.token_ids
        assert cached.timings["prefill_tokens"] < cached.timings["prompt_tokens"]  # generate reused it too
        return cached, reused, len(keys)

    history.append(Message("user", "look at this", [red]))
    assert turn(0)[1] == 0
    previous = 0
    for i, want in enumerate([["image"], [], ["audio"], []], start=1):
        reply, reused, length = turn(i, want)
        assert reused >= previous  # at least the whole previous prompt came from the cache
        previous = length
        history.append(Message("assistant", reply.trace, [red] if want == ["image"] else []))
        history.append(Message("user", f"and now number {i}"))
    turn(10)
    again, reused, length = turn(11)  # regenerate: the same prompt answered again with another seed
    assert reused == length - 1
    history.append(Message("assistant", again.trace))
    history[-2] = Message("user", "an edited question")  # an edit in the middle of the prompt
    history.append(Message("user", "after the edit"))
    _, reused, length = turn(12)
    assert 0 < reused < length - 10
    del history[:4]  # truncation: the oldest turns dropped, the prompt changes from its start
    _, reused, length = turn(13)
    assert reused < 20  # only the template's opening is shared
    turn(14)


def test_a_looping_reply_stops_early(tiny_model):
    """A model that says one word forever ("fivefivefive…") stops after the loop is seen, not at the limit."""
    tok = tiny_model.tokenizer
    five = tok("five", add_special_tokens=False)["input_ids"][-1]
    bias = torch.zeros(tiny_model.llm.get_output_embeddings().weight.shape[0])
    bias[five] = 1e4
    hook = tiny_model.llm.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
    try:
        reply = tiny_model.generate([Message("user", "count")], temperature=0, max_new_tokens=200)
        wanted = tiny_model.generate([Message("user", "count")], temperature=0, max_new_tokens=200, want=["audio", "image"])
    finally:
        hook.remove()
    assert reply.finish_reason == "repetition"
    assert reply.token_ids == [five]  # one copy of the repeated piece is kept
    assert wanted.finish_reason == "repetition" and [s.modality for s in wanted.signals] == ["audio", "image"]
    audio, image = (MODALITIES[m].signal_tokens for m in ("audio", "image"))
    assert tok.convert_ids_to_tokens(wanted.token_ids) == [tok.convert_ids_to_tokens(five)] + audio + image
    assert [s.position for s in wanted.signals] == [1, 1 + len(audio)]


def test_repeating_tail_finds_loops_not_ordinary_repetition():
    from nextgpt.model import repeating_tail

    assert repeating_tail([1, 2, 3] + [7, 8, 9] * 6) == 15  # keeps one "7 8 9"
    assert repeating_tail([5] * 16) == 15
    assert repeating_tail([5] * 15) == 0  # shorter than the span
    assert repeating_tail([4, 9] * 4) == 0  # "beep beep beep beep"
    assert repeating_tail(list(range(40))) == 0


def test_repeated_phrase_finds_loops_through_signal_groups():
    """The session-8 eval's one reply at the token limit: a phrase said a third time, with signal groups and
    other words between the copies (no fixed period). Naming a thing twice is not a loop."""
    from nextgpt.model import repeated_phrase

    vid = list(range(100, 124))  # a 24-token signal group
    phrase = [7, 8, 9, 10, 11]  # "a green circle moving up"
    looping = [1, 2, 3] + phrase + vid + [5] + phrase + vid + [5, 20, 21] + phrase
    assert repeated_phrase(looping, ignore=set(vid)) == 5  # the third copy goes
    assert repeated_phrase(looping[:-1], ignore=set(vid)) == 0  # not yet
    assert repeated_phrase([1, 2] + phrase + vid + [30] + phrase, ignore=set(vid)) == 0  # twice: "… and a green circle moving up"
    assert repeated_phrase(looping + vid, ignore=set(vid)) == 0  # the window ends in a signal group: nothing to cut
    assert repeated_phrase([4, 9] * 8) == 0  # overlapping or touching copies do not count (repeating_tail's case)
    assert repeated_phrase([4, 9] * 9) == 5
    assert repeated_phrase([5] * 16) == 0 and repeated_phrase([5] * 17) == 5  # after repeating_tail's 16


def test_a_caller_stop_string_ends_generation_early(tiny_model):
    """`stop` ends the reply when the string is generated, not after max_new_tokens (an API caller's stop)."""
    tok = tiny_model.tokenizer
    full = tiny_model.generate([Message("user", "say something")], temperature=0, max_new_tokens=30, allow_media=False)
    pieces = [tok.decode([i]) for i in full.token_ids]
    k = next(k for k in range(3, len(pieces)) if pieces[k].strip() and "\ufffd" not in pieces[k] and pieces[k] not in "".join(pieces[:k]))
    stopped = tiny_model.generate([Message("user", "say something")], temperature=0, max_new_tokens=30, allow_media=False,
                                  stop=[pieces[k]])  # fmt: skip
    assert stopped.finish_reason == "stop"
    assert pieces[k] not in stopped.text
    assert len(stopped.token_ids) <= k < len(full.token_ids)


def _scripted_sampler(model, script: list[int]):
    """A stand-in for `_sample` that says `script` (first signal tokens included; the rest of a group is
    forced by generate as always), then ends the reply: the tiny random model's own picks put no words
    between groups, and "restated" needs them."""
    said = iter(script)
    return lambda *a, **k: next(said, model.tokenizer.eos_token_id)


def _one_turn_output(model, user: str, reply: str, modality: str) -> torch.Tensor:
    """The projector's output for a `modality` group after user: `user`, assistant: `reply`, in one plain
    forward pass."""
    prompt, _ = model.build_inputs([Message("user", user)])
    piece = torch.tensor(model.tokenizer.encode(reply, add_special_tokens=False) + model.signal_ids[modality])
    x = torch.cat([prompt, model.llm.get_input_embeddings()(piece)[None]], dim=1)
    n = MODALITIES[modality].num_tokens
    with torch.inference_mode():
        return model.output_projectors[modality](model(inputs_embeds=x, all_states=True).all_states[:, -n:])


def test_a_restated_group_cut_mid_sentence_reads_as_a_whole_reply():
    """`restatement`: a group's words cut before the next output ("Here is a low beep" | "and a picture …")
    are closed with a period, as a one-output reply ("Here is a low beep.") is; words already closed stay."""
    from nextgpt.loop import restatement

    assert restatement("Here is a low beep", first=True) == ("Here is a low beep.", "Here is a low beep.")
    assert restatement(" and a high beep, ", first=False) == ("a high beep.", "Here is a high beep.")
    assert restatement(" and a purple circle on the center.", first=False) == ("a purple circle on the center.", "Here is a purple circle on the center.")
    assert restatement("Sure! Is it red?", first=True)[1] == "Sure! Is it red?"
    assert restatement(" and ", first=False) is None


def test_restated_groups_read_their_words_as_a_request_of_their_own(tiny_model, monkeypatch):
    """`isolate_groups="restated"`: the words, the first group and the cache are those of the plain reply;
    a later group's states are those of a fresh one-turn conversation — user: its words without the
    leading "and", assistant: "Here is" + them + the group (checked against one plain forward pass)."""
    from nextgpt.model import RESTATE_LEAD, PromptCache

    tok = tiny_model.tokenizer
    words = tok.encode(" and a purple circle on the center.", add_special_tokens=False)
    script = tok.encode("a beep", add_special_tokens=False) + [tiny_model.signal_ids["audio"][0]] + words + \
        [tiny_model.signal_ids["image"][0]]  # fmt: skip
    messages = [Message("user", "a beep and a purple circle please")]
    kw = dict(temperature=0, max_new_tokens=len(script) + 20)  # (the tiny tokenizer spells words out)
    monkeypatch.setattr(tiny_model, "_sample", _scripted_sampler(tiny_model, script))
    plain = tiny_model.generate(messages, **kw)
    monkeypatch.setattr(tiny_model, "_sample", _scripted_sampler(tiny_model, script))
    cache = PromptCache()
    restated = tiny_model.generate(messages, isolate_groups="restated", cache=cache, **kw)
    assert restated.token_ids == plain.token_ids and [s.modality for s in restated.signals] == ["audio", "image"]
    assert torch.equal(restated.signals[0].prompt_embeds, plain.signals[0].prompt_embeds)
    said = "a purple circle on the center."
    want = _one_turn_output(tiny_model, said, RESTATE_LEAD + said, "image")
    assert torch.allclose(restated.signals[1].prompt_embeds, want, atol=1e-4)
    assert not torch.allclose(restated.signals[1].prompt_embeds, plain.signals[1].prompt_embeds, atol=1e-3)
    # the cache kept the whole reply: the next turn reuses it and equals one without a cache
    later = messages + [Message("assistant", restated.trace), Message("user", "again")]
    monkeypatch.undo()
    a = tiny_model.generate(later, temperature=0, max_new_tokens=5, cache=cache)
    assert a.timings["prefill_tokens"] < len(tiny_model.build_inputs(later)[1]) - len(restated.token_ids)
    assert a.token_ids == tiny_model.generate(later, temperature=0, max_new_tokens=5).token_ids
    # "restated_all": the first group too, read from its words as they open the reply (user: them; reply: them, closed with a period)
    monkeypatch.setattr(tiny_model, "_sample", _scripted_sampler(tiny_model, script))
    every = tiny_model.generate(messages, isolate_groups="restated_all", **kw)
    monkeypatch.undo()
    assert every.token_ids == plain.token_ids and torch.equal(every.signals[1].prompt_embeds, restated.signals[1].prompt_embeds)
    want = _one_turn_output(tiny_model, "a beep.", "a beep.", "audio")  # closed with a period, as a reply is
    assert torch.allclose(every.signals[0].prompt_embeds, want, atol=1e-4)
    assert not torch.allclose(every.signals[0].prompt_embeds, plain.signals[0].prompt_embeds, atol=1e-3)
    # groups with no words between them (forced at the reply's end) keep their plain states
    back_to_back = tiny_model.generate(messages, want=["image", "audio"], temperature=0, max_new_tokens=2,
                                       isolate_groups="restated")  # fmt: skip
    again = tiny_model.generate(messages, want=["image", "audio"], temperature=0, max_new_tokens=2)
    assert all(torch.equal(p.prompt_embeds, q.prompt_embeds) for p, q in zip(back_to_back.signals, again.signals))
    with pytest.raises(ValueError, match="isolate_groups"):
        tiny_model.generate(messages, isolate_groups="yes")


def test_isolated_groups_take_their_states_from_their_own_words(tiny_model):
    """`isolate_groups`: the words and the first group are unchanged; a later group's states are those of
    the prompt + only the words since the previous group + the group, read afresh (checked against one
    plain forward pass); and the conversation's cache stays consistent for the next turn."""
    from nextgpt.model import PromptCache

    messages = [Message("user", "a picture and a sound")]
    kw = dict(want=["image", "audio"], temperature=0, max_new_tokens=3)
    plain = tiny_model.generate(messages, **kw)
    cache = PromptCache()
    iso = tiny_model.generate(messages, isolate_groups=True, cache=cache, **kw)
    assert iso.token_ids == plain.token_ids and [s.modality for s in iso.signals] == ["image", "audio"]
    assert torch.equal(iso.signals[0].prompt_embeds, plain.signals[0].prompt_embeds)
    first, second = iso.signals
    since = first.position + MODALITIES["image"].num_tokens
    n = MODALITIES["audio"].num_tokens
    assert since <= second.position  # (forced groups at a reply's end follow each other: no words between)
    prompt, _ = tiny_model.build_inputs(messages)
    piece = torch.tensor(iso.token_ids[since : second.position + n])
    x = torch.cat([prompt, tiny_model.llm.get_input_embeddings()(piece)[None]], dim=1)
    with torch.inference_mode():
        states = tiny_model(inputs_embeds=x, all_states=True).all_states[:, -n:]
        want = tiny_model.output_projectors["audio"](states)
    assert torch.allclose(second.prompt_embeds, want, atol=1e-4)
    assert not torch.allclose(second.prompt_embeds, plain.signals[1].prompt_embeds, atol=1e-3)  # the first group is not read
    # the next turn: the cache held the prompt only, and the turn equals one without a cache
    later = messages + [Message("assistant", iso.trace), Message("user", "again")]
    a = tiny_model.generate(later, temperature=0, max_new_tokens=5, cache=cache)
    b = tiny_model.generate(later, temperature=0, max_new_tokens=5)
    assert a.token_ids == b.token_ids
