"""Training data: the accepted formats, clear errors for bad records, label masking, the MosIT
dialog generator. Fast: no training here (see test_train.py)."""

import json

import pytest
import torch

from nextgpt.tokens import MODALITIES
from training.trainer import DataError, DialogEncoder, align_target, load_stage_data, read_dialogs_file, read_pairs_file
from training.trainer.data import Dialog, Output, Turn
from training.world.dataset import write_pairs
from training.world.dialogs import sample_dialogs, write_dialogs


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    write_pairs(d, "image", 2, 0, side=32)
    return d


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "data, index, field, words",
    [
        ("[{", None, None, "not valid JSON"),
        ({"caption": "x"}, None, None, "JSON list"),
        ([{"caption": "a red circle", "image_name": "000000.png"}, {"image_name": "000001.png"}], 1, "caption", "missing"),
        ([{"caption": "", "image_name": "000000.png"}], 0, "caption", "non-empty"),
        ([{"caption": "a red circle"}], 0, "image_name|video_name|audio_name", "none of"),
        ([{"caption": "a", "image_name": "000000.png", "audio_name": "x.wav"}], 0, "image_name|video_name|audio_name", "more than one"),
        ([{"caption": "a red circle", "image_name": "missing.png"}], 0, "image_name", "not found"),
        ([{"caption": "say [IMG0]", "image_name": "000000.png"}], 0, "caption", "reserved"),
        ([{"conversation": []}], 0, None, "dialog record"),
    ],
)
def test_bad_pair_file_names_file_index_and_field(pairs_dir, data, index, field, words):
    path = _write(pairs_dir, "bad.json", data)
    with pytest.raises(DataError) as e:
        read_pairs_file(path)
    assert e.value.file == str(path) and e.value.index == index and e.value.field == field
    assert str(path) in str(e.value) and words in str(e.value)
    if index is not None:
        assert f"record {index}" in str(e.value)


@pytest.mark.parametrize(
    "conv, field, words",
    [
        ("nope", "conversation", "non-empty list"),
        ([{"from": "gpt", "value": "hi"}], "conversation[0].from", "first turn"),
        ([{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}], "conversation[1].from", "'human' or 'gpt'"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "conversation[0].value", "string"),
        ([{"from": "human", "value": "hi"}], "conversation", "no 'gpt' turn"),
        ([{"from": "human", "value": "hi <Img>"}, {"from": "gpt", "value": "x"}], "conversation[0].value", "reserved"),
        ([{"from": "human", "value": "hi", "image_name": "nope.png"}, {"from": "gpt", "value": "x"}], "conversation[0].image_name", "not found"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x", "output_modality": "smell"}], "conversation[1].output_modality", "image"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x", "caption": "c"}], "conversation[1].caption", "output_modality"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x", "output_modality": ["image", "audio"], "caption": "c"}],
         "conversation[1].caption", "2 output"),
    ],
)  # fmt: skip
def test_bad_dialog_file_names_file_index_and_field(tmp_path, conv, field, words):
    good = {"conversation": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = _write(tmp_path, "dialogs.json", [good, {"conversation": conv}])
    with pytest.raises(DataError) as e:
        read_dialogs_file(path)
    assert (e.value.file, e.value.index, e.value.field) == (str(path), 1, field)
    assert words in str(e.value) and "record 1" in str(e.value)


def test_all_problems_are_listed(tmp_path):
    path = _write(tmp_path, "p.json", [{"image_name": "a.png"}, {"caption": 5, "image_name": "b.png"}])
    with pytest.raises(DataError) as e:
        read_pairs_file(path, need_media=False)
    assert [(p[1], p[2]) for p in e.value.problems] == [(0, "caption"), (1, "caption")]


# ------------------------------------------------------------------------------------------ formats


def test_official_dialog_variants(tmp_path, pairs_dir):
    """Legacy record-level image_name, `conversations`, placeholders and signal text in gpt turns."""
    img = pairs_dir / "images" / "000000.png"
    data = [
        {"image_name": str(img), "conversation": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A shape."}]},
        {"conversations": [
            {"from": "human", "value": "Draw a cat", "input_modality": "text"},
            {"from": "gpt", "value": "Here it is. <Image>", "caption": "a cat"}]},
        {"conversation": [
            {"from": "human", "value": "Beep please"},
            {"from": "gpt", "value": "Done.[AUD0] [AUD1] [AUD2] [AUD3] [AUD4] [AUD5] [AUD6] [AUD7]"}]},
        {"conversation": [  # signal text in lower case (it raised KeyError before)
            {"from": "human", "value": "Draw"},
            {"from": "gpt", "value": "Ok [img0][img1][img2][img3]"}]},
    ]  # fmt: skip
    d = read_dialogs_file(_write(tmp_path, "d.json", data), media_root="/")
    assert d[0].turns[0].media == [("image", img)] and d[0].turns[0].text == "What is this?"
    assert d[1].turns[1].text == "Here it is." and d[1].outputs == [Output("image", "a cat")]
    assert d[2].turns[1].text == "Done." and d[2].outputs == [Output("audio", None)]
    assert d[3].turns[1].text == "Ok" and d[3].outputs == [Output("image", None)]


def test_stage_data_kinds(pairs_dir):
    d1 = load_stage_data(1, [pairs_dir / "image_pairs.json"])
    assert d1[0].turns[0].text == "generate a caption" and d1[0].media[0][0] == "image"
    d2 = load_stage_data(2, [pairs_dir / "image_pairs.json"])
    caption = d2[0].turns[0].text
    assert d2[0].turns[1].text == caption and d2[0].outputs == [Output("image", caption)] and not d2[0].media
    with pytest.raises(DataError, match="pair record"):
        load_stage_data(3, [pairs_dir / "image_pairs.json"])


# ------------------------------------------------------------------------------------------ labels


def test_stage1_and_stage2_prompts_are_the_official_ones(tiny_model, pairs_dir):
    enc = DialogEncoder(tiny_model.tokenizer, "vicuna_v0")
    d1 = load_stage_data(1, [pairs_dir / "image_pairs.json"])[0]
    cap = d1.turns[1].text
    assert [(t, tr) for t, tr, _ in enc.segments(d1)] == [
        ("### Human: <Img></Img> generate a caption\n### Assistant: ", False), (f"{cap}\n###", True)]  # fmt: skip
    d2 = load_stage_data(2, [pairs_dir / "image_pairs.json"])[0]
    assert [t for t, _, _ in enc.segments(d2)] == [f"### Human: {cap}\n### Assistant: ", f"{cap}[IMG0][IMG1][IMG2][IMG3]\n###"]


def test_only_assistant_tokens_have_labels(tiny_model, pairs_dir):
    tok = tiny_model.tokenizer
    img = pairs_dir / "images" / "000000.png"
    dialog = Dialog([
        Turn("user", "What is this?", media=[("image", img)]),
        Turn("assistant", "A red circle."),
        Turn("user", "Hello"),
        Turn("assistant", "Hi! Here is a video.", outputs=[Output("video", "a red circle moving left")]),
        Turn("user", "and a sound"),
        Turn("assistant", "", outputs=[Output("audio", "a high beep"), Output("image", None)]),
        Turn("user", "trailing question"),
    ])  # fmt: skip
    ex = DialogEncoder(tok, "vicuna_v0").encode(dialog)
    ids, labels = ex.input_ids, ex.labels
    trained = [i for i, lab in enumerate(labels) if lab != -100]
    assert all(labels[i] == ids[i] for i in trained)
    # the labelled spans are exactly the replies (with their signal groups and the stop), nothing else
    spans, cur = [], []
    for i in range(len(ids)):
        if labels[i] != -100:
            cur.append(ids[i])
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur) if cur else None
    sig = {m: "".join(s.signal_tokens) for m, s in MODALITIES.items()}
    # the official tokenization drops whitespace next to an added token: after a signal group the
    # reply's `\n###` loses its newline (`[IMG3]▁###` with the official sentencepiece tokenizer)
    assert [tok.decode(s) for s in spans] == [
        "A red circle.\n###", f"Hi! Here is a video.{sig['video']}###", f"{sig['audio']}{sig['image']}###"]  # fmt: skip
    text = tok.decode(ids)
    assert "trailing question" not in text and text.count("Human:") == 3
    # the media slot: <Img> [placeholder] </Img>, unlabelled
    (pos, m, p), = ex.media
    assert (m, p) == ("image", img) and labels[pos] == -100
    assert tok.convert_ids_to_tokens([ids[pos - 1], ids[pos + 1]]) == ["<Img>", "</Img>"]
    # signal groups point at their first token, in order, with their captions
    assert [(tok.convert_ids_to_tokens(ids[s]), m, c) for s, m, c in ex.signals] == [
        ("[VID0]", "video", "a red circle moving left"), ("[AUD0]", "audio", "a high beep"), ("[IMG0]", "image", None)]  # fmt: skip
    # the context is what generate() would see: the template's own token ids for the history
    from nextgpt import templates
    from nextgpt.model import MediaInput, Message

    history = [Message("user", "What is this?", [MediaInput("image", path=img)]), Message("assistant", "A red circle."),
               Message("user", "Hello")]  # fmt: skip
    prompt = templates.encode("vicuna_v0", tok, history)
    assert (ids[:pos] + ids[pos + 1 :])[: len(prompt)] == prompt  # the media placeholder taken out


def test_chat_template_replies_end_with_eos(tiny_model):
    import copy

    from training.trainer import TemplateError

    tok = copy.deepcopy(tiny_model.tokenizer)
    dialog = Dialog([Turn("user", "hi"), Turn("assistant", "hello", outputs=[Output("image", "x")]), Turn("user", "more"),
                     Turn("assistant", "ok")])  # fmt: skip
    with pytest.raises(TemplateError, match="vicuna_v0"):  # ChatML ends turns with <|im_end|>, not this EOS (</s>)
        DialogEncoder(tok, "chat").encode(dialog)
    tok.eos_token = "<|im_end|>"  # as SmolLM2 / Qwen instruct tokenizers
    enc = DialogEncoder(tok, "chat", system_prompt="be brief")
    assert [t for t, tr, _ in enc.segments(dialog) if tr] == ["hello[IMG0][IMG1][IMG2][IMG3]<|im_end|>", "ok<|im_end|>"]
    ex = enc.encode(dialog)
    assert tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != -100]) == (
        "hello[IMG0][IMG1][IMG2][IMG3]<|im_end|>ok<|im_end|>")  # fmt: skip


def test_truncation_drops_partial_groups(tiny_model):
    dialog = Dialog([Turn("user", "x" * 5), Turn("assistant", "ok", outputs=[Output("video", "v")])])
    enc = DialogEncoder(tiny_model.tokenizer, "vicuna_v0", max_length=40)
    ex = enc.encode(dialog)
    assert len(ex.input_ids) == 40 and ex.signals == [] and enc.truncated == 1


def test_align_target():
    t = torch.arange(12.0).reshape(1, 6, 2)
    assert torch.equal(align_target(t, 3), t[0, :3])
    assert torch.equal(align_target(t, 8)[6:], t[0, -1:].expand(2, 2))
    assert align_target(torch.ones(1, 5), 1).shape == (1, 5)


# ------------------------------------------------------------------------------------------ dialogs


def test_dialog_generator(tmp_path):
    a = write_dialogs(tmp_path / "a", 6, seed=3, side=32)
    b = write_dialogs(tmp_path / "b", 6, seed=3, side=32)
    assert a.read_bytes() == b.read_bytes()
    for f in (tmp_path / "a").rglob("*.*"):
        other = tmp_path / "b" / f.relative_to(tmp_path / "a")
        # MP4 bytes: training.world.dataset.write_mp4 is not always byte-reproducible (x264); same frames
        assert other.is_file() and (f.suffix == ".mp4" or f.read_bytes() == other.read_bytes())
    assert sample_dialogs(6, 4) != sample_dialogs(6, 3)

    records = json.loads(a.read_text())
    dialogs = read_dialogs_file(a)  # the generator's output is valid stage-3 data
    assert len(dialogs) == 6
    kinds = set()
    for rec, dialog in zip(records, dialogs):
        gpt = [t for t in rec["conversation"] if t["from"] == "gpt"]
        assistant = [t for t in dialog.turns if t.role == "assistant"]
        assert len(gpt) == len(assistant) >= 2
        for t, turn in zip(gpt, assistant):
            kinds.add(t["kind"])
            if t["kind"] in ("chat", "ask", "describe"):
                assert "output_modality" not in t and turn.outputs == []  # text only: no signal tokens
            else:
                assert turn.outputs == [Output(t["output_modality"], t["caption"])]
                assert t["caption"] in t["value"]  # says in words what it makes
                assert (a.parent / {"image": "images", "video": "videos", "audio": "audios"}[t["output_modality"]]
                        / t[t["output_modality"] + "_name"]).is_file()  # fmt: skip
    assert sum(len(d.media) for d in dialogs) > 0
    many = [t["kind"] for d in sample_dialogs(60, 0) for t in d]
    assert {"chat", "ask", "describe", "create", "transform"} <= set(many)
    transforms = [t["value"] for d in sample_dialogs(60, 0) for t in d if t["kind"] == "transform" and t["from"] == "human"]
    assert any(v.startswith("Make it ") for v in transforms) and any("video of it moving" in v for v in transforms)


def test_dialog_generator_varied_captions(tmp_path):
    """vary_captions: create turns name their output in partial / paraphrased words, the caption
    (projector target) is exactly those words, and `attributes` keeps only what they say; the
    default is unchanged (the full canonical caption), so earlier data sets stay reproducible."""
    from training.world.analyze import parse_caption
    from training.world.captions import canonical_caption

    plain = [t for d in sample_dialogs(80, 5) for t in d if t["kind"] == "create" and t["from"] == "gpt"]
    assert all(t["caption"] == canonical_caption(t["output"]) for t in plain)
    varied = [t for d in sample_dialogs(80, 5, vary_captions=True) for t in d if t["kind"] == "create" and t["from"] == "gpt"]
    assert any(t["caption"] != canonical_caption(t["output"]) for t in varied)
    image = [t["caption"] for t in varied if t["output"].modality == "image"]
    assert any(" on the " not in c for c in image) and any(" on the " in c for c in image)  # partial and full
    for t in varied:
        spec = t["output"]
        main = {"image": ("colour", "shape"), "audio": ("pitch", "timbre"), "video": ("colour", "shape", "direction")}[spec.modality]
        said = parse_caption(t["caption"], spec.modality)
        assert all(said[k] == spec.attributes()[k] for k in main), t["caption"]  # always names the main attributes
        assert t["caption"] in t["value"]

    path = write_dialogs(tmp_path / "v", 40, seed=5, side=32, outputs=False, vary_captions=True)
    for rec in json.loads(path.read_text()):
        for t in rec["conversation"]:
            if t.get("kind") == "create" and t["from"] == "gpt" and t["output_modality"] == "image":
                said = parse_caption(t["caption"], "image")
                assert t["attributes"] == {k: v for k, v in said.items() if k in t["attributes"]} and set(said) == set(t["attributes"])
    assert read_dialogs_file(path)  # valid stage-3 data


# ------------------------------------------------------------------------------------------ new rows


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_are_the_only_trainable_embedding_parameters(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.trainer.rows import N_NEW, NewRows

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=50 + N_NEW, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))  # fmt: skip
    llm.requires_grad_(False)
    emb0, head0 = llm.get_input_embeddings().weight.clone(), llm.get_output_embeddings().weight.clone()
    plain = llm(torch.tensor([[1, 60, 3]])).logits
    rows = NewRows(llm)
    assert len(rows.parameters()) == (1 if tied else 2) and rows.tied == tied
    assert torch.allclose(llm(torch.tensor([[1, 60, 3]])).logits, plain, atol=1e-6)  # same function before training
    opt = torch.optim.AdamW(rows.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        out = llm(torch.tensor([[1, 60, 3, 70]]))
        out.logits[..., -N_NEW:].sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(llm.get_input_embeddings().weight, emb0)  # the frozen matrices are untouched
    rows.merge()
    emb, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert torch.equal(emb[:-N_NEW], emb0[:-N_NEW]) and torch.equal(head[:-N_NEW], head0[:-N_NEW])
    assert not torch.equal(head[-N_NEW:], head0[-N_NEW:]) and (emb is head) == tied
    sd = rows.state_dict()
    assert torch.equal(sd["embed_tokens.new_rows"], emb[-N_NEW:]) and torch.equal(sd["lm_head.new_rows"], head[-N_NEW:])


@pytest.mark.parametrize("tied", [False, True])
def test_embed_rows_train_the_input_side_only(tied):
    """`embed_rows`: the new tokens' input rows train, their lm_head rows stay, so logits at positions
    before a new token cannot move (a tied model is untied when merged)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.trainer.rows import N_NEW, NewRows

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=50 + N_NEW, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))  # fmt: skip
    llm.requires_grad_(False)
    emb0, head0 = llm.get_input_embeddings().weight.clone(), llm.get_output_embeddings().weight.clone()
    ids = torch.tensor([[1, 60, 3, 70]])
    plain = llm(ids).logits
    rows = NewRows(llm, train_head=False)
    assert len(rows.parameters()) == 1 and not rows.tied
    opt = torch.optim.AdamW(rows.parameters(), lr=0.1)
    for _ in range(3):
        llm(ids).logits[..., -N_NEW:].sum().backward()
        opt.step()
        opt.zero_grad()
    after = llm(ids).logits
    assert torch.allclose(after[0, 0], plain[0, 0], atol=1e-6)  # before the first new token: the same distribution
    assert not torch.allclose(after[0, 1:], plain[0, 1:])  # from the new token on, its trained input row acts
    rows.merge()
    emb, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert emb is not head and torch.equal(head, head0)  # the output rows, new ones included, as they were
    assert torch.equal(emb[:-N_NEW], emb0[:-N_NEW]) and not torch.equal(emb[-N_NEW:], emb0[-N_NEW:])
    assert torch.allclose(llm(ids).logits, after, atol=1e-6)  # merged: the same function as while training
    sd = rows.state_dict()
    assert torch.equal(sd["embed_tokens.new_rows"], emb[-N_NEW:]) and torch.equal(sd["lm_head.new_rows"], head0[-N_NEW:])


def test_target_cache_shards(tmp_path):
    from training.trainer import TargetCache

    cache = TargetCache({"image": tmp_path / "img", "audio": tmp_path / "aud"}, flush_every=2)
    caps = [f"a red circle {i}" for i in range(5)]
    n = cache.fill([("image", c) for c in caps] + [("audio", "a beep")], lambda m, c: torch.full((1, 3, 2), float(len(c))))
    assert n == 6 and len(list((tmp_path / "img").glob("*.safetensors"))) == 2  # flushed as it went
    cache.save()
    again = TargetCache({"image": tmp_path / "img", "audio": tmp_path / "aud"})
    assert again.count("image") == 5 and again.count("audio") == 1 and not again.missing([("image", c) for c in caps])
    assert torch.equal(again.get("image", caps[4]), torch.full((3, 2), float(len(caps[4]))))
    with pytest.raises(KeyError, match="no precomputed"):
        again.get("image", "unknown")


def test_epoch_sampler_groups_batches_by_length():
    """--group-by-length: every example once per epoch, the same order for the same (seed, epoch), batches
    of similar length (far less padding than a random draw), and a short last batch stays last."""
    from training.trainer.trainer import EpochSampler

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(40, 440, (203,), generator=g).tolist()
    bs = 8

    def padded(order):
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    plain = EpochSampler(len(lengths), seed=3)
    grouped = EpochSampler(len(lengths), seed=3, lengths=lengths, batch_size=bs, group=8)
    order = list(grouped)
    assert sorted(order) == list(range(len(lengths)))
    assert order == list(EpochSampler(len(lengths), seed=3, lengths=lengths, batch_size=bs, group=8))
    grouped.use_epoch(1)
    assert list(grouped) != order  # another epoch, another order
    assert padded(order) < 0.8 * padded(list(plain))
    assert padded(order) < 1.15 * sum(lengths)
    tail = order[-(len(lengths) % bs) :]  # 203 = 25 × 8 + 3: the three of the short batch come last, together
    assert len(tail) == 3 and sorted(tail, key=lengths.__getitem__) == tail
    assert list(EpochSampler(len(lengths), seed=3, lengths=lengths, batch_size=bs, group=0)) == list(plain)  # off: unchanged

    from training.trainer.trainer import TrainConfig

    with pytest.raises(ValueError, match="group_by_length"):
        TrainConfig(stage=3, output_dir="unused", group_by_length=-1)


def test_isolated_later_groups_give_the_states_generate_reads(tiny_model):
    """The refit's `isolate_later_groups` (for profiles with generation.isolate_groups): a reply's second
    group is read after the context + only the words since the first group, exactly the sequence
    `generate(isolate_groups=True)` re-reads; the first group stays in the whole example, and a group
    in a later reply with no group before it in that reply is left alone."""
    from nextgpt.model import Message
    from training.trainer import Example, isolate_later_groups

    tok = tiny_model.tokenizer
    img, aud = (tok.convert_tokens_to_ids(MODALITIES[m].signal_tokens) for m in ("image", "audio"))
    prompt = tiny_model.build_inputs([Message("user", "a picture and a sound")])[1]
    words1, words2 = tok.encode("a red circle", add_special_tokens=False), tok.encode(" and a high beep", add_special_tokens=False)
    reply = words1 + img + words2 + aud
    turn2 = tok.encode(" next please", add_special_tokens=False)  # an unlabelled user turn, then a reply with one group
    ids = prompt + reply + turn2 + words1 + img
    labels = [-100] * len(prompt) + reply + [-100] * len(turn2) + words1 + img
    a1, a2, b1 = len(prompt) + len(words1), len(prompt) + len(words1) + len(img) + len(words2), len(ids) - len(img)
    e = Example(ids, labels, signals=[(a1, "image", "x"), (a2, "audio", "y"), (b1, "image", "z")])
    whole, alone = isolate_later_groups([e])
    assert whole.input_ids == ids and whole.signals == [(a1, "image", "x"), (b1, "image", "z")]
    assert alone.input_ids == prompt + words2 + aud and alone.signals == [(len(prompt) + len(words2), "audio", "y")]
    assert alone.labels[: len(prompt)] == [-100] * len(prompt) and alone.labels[len(prompt):] == words2 + aud

    with torch.inference_mode():  # the generate side: the prompt + the words since the first group + the group
        x = torch.tensor([prompt + words2 + aud])
        want = tiny_model(x, all_states=True).all_states[0, -len(aud):]
        got = tiny_model(torch.tensor([alone.input_ids]), signals={"audio": (torch.tensor([0]), torch.tensor([alone.signals[0][0]]))}).states["audio"][0]
        mixed = tiny_model(torch.tensor([ids]), signals={"audio": (torch.tensor([0]), torch.tensor([a2]))}).states["audio"][0]
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(mixed, want, atol=1e-3)  # read in the whole reply the state differs
    assert isolate_later_groups([whole]) == [whole]  # nothing left to take out


def test_restated_dialogs_give_the_states_generate_reads(tiny_model):
    """The refit's `restated_dialogs` (--restated-refit, for isolate_groups: restated_all): each output
    becomes a one-turn dialog — user: its words (without the leading "and", closed with a period),
    assistant: them (the reply's first group) or "Here is" + them — whose states at the group are exactly those
    `generate` reads for it (`_restated_states`)."""
    from training.trainer import restated_dialogs

    text = "a red circle and a high beep."
    dialog = Dialog([Turn("user", "a picture and a sound"),
                     Turn("assistant", text, outputs=[Output("image", "a red circle", at=len("a red circle")), Output("audio", "a high beep")])],
                    source="t")  # fmt: skip
    restated = restated_dialogs(dialog)
    assert [(d.turns[0].text, d.turns[1].text, [(o.modality, o.caption, o.at) for o in d.outputs]) for d in restated] == [
        ("a red circle.", "a red circle.", [("image", "a red circle", None)]),  # cut mid-sentence: closed, as a reply is
        ("a high beep.", "Here is a high beep.", [("audio", "a high beep", None)]),
    ]
    tok = tiny_model.tokenizer
    enc = DialogEncoder(tok, tiny_model.template, tiny_model.system_prompt)
    for d, (words, m, first) in zip(restated, [("a red circle", "image", True), (" and a high beep.", "audio", False)]):
        e = enc.encode(d)
        [(start, modality, caption)] = e.signals
        with torch.inference_mode():
            got = tiny_model(torch.tensor([e.input_ids]), signals={m: (torch.tensor([0]), torch.tensor([start]))}).states[m][0]
            want = tiny_model._restated_states(tok.encode(words, add_special_tokens=False), m, first=first)
        want = torch.stack(list(want)) if isinstance(want, (list, tuple)) else want
        assert modality == m and torch.allclose(got, want.reshape(got.shape), atol=1e-5)
    # an output with no words before it (back to back with the previous group) is left out
    back_to_back = Dialog([Turn("user", "two"), Turn("assistant", "a red circle", outputs=[Output("image", "x"), Output("audio", "y")])])
    assert [d.turns[1].text for d in restated_dialogs(back_to_back)] == ["a red circle."]
