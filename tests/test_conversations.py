"""Multi-turn MosIT conversations (training.world.conversations) and their scoring (`nextgpt eval --dialogs`)."""

import re
from dataclasses import replace

import numpy as np
import pytest

from training.world.conversations import EDIT_PLUS_HELD, EDIT_PLUS_JOIN, PITCH_ORDER, SCENARIOS, TWO_CHANGES, W, W_TRAIN, sample_conversation, sample_conversations, sample_scenarios
from training.world.spec import AudioSpec, ImageSpec, VideoSpec


def _last(turns):
    return turns[-2], turns[-1]


def test_every_scenario_is_generated_deterministically():
    a, b = sample_conversations(40, seed=3), sample_conversations(40, seed=3)
    assert [[t["value"] for t in c] for c in a] == [[t["value"] for t in c] for c in b]
    kinds = {c[-1]["kind"] for c in a} | {c[-3]["kind"] for c in a if len(c) > 2}
    assert set(SCENARIOS) <= kinds
    assert sample_conversations(5, seed=4)[0] != a[0]


def test_an_edit_changes_one_attribute_and_keeps_the_rest():
    """Sometimes two ("make it blue and bigger"): the evaluation's hardest edits ("moving left and a circle
    please"), which the training wording asks for twice as often (TWO_CHANGES) while the evaluation's
    stream keeps its share."""
    share = {}
    for wording in ("train", "eval"):
        two = 0
        for turns in sample_scenarios("edit", 400, seed=11, wording=wording):
            _, gpt = _last(turns)
            new = gpt["outputs"][0]
            before = next(t["outputs"][-1] for t in reversed(turns[:-2]) if t.get("outputs"))
            changed = [gpt["changed"]] if isinstance(gpt["changed"], str) else gpt["changed"]
            assert type(new) is type(before) and 1 <= len(changed) <= 2
            for key in changed:
                assert getattr(new, key) != getattr(before, key)
                assert getattr(new, key) in gpt["value"]  # the reply says what it made
            assert replace(new, **{k: getattr(before, k) for k in changed}) == before  # everything else kept
            assert gpt["captions"][0] in gpt["value"]
            two += len(changed) == 2
        share[wording] = two / 400
        assert abs(share[wording] - TWO_CHANGES[wording]) < 0.07, share
    assert share["train"] > share["eval"] + 0.08


def test_a_training_edit_sometimes_asks_for_a_new_output_too():
    """"make it smaller, and also play a low buzz": the edited output and then the new one, each signal
    group after the words naming it; the evaluation's edits stay single (its random stream unchanged)."""
    plus = 0
    for turns in sample_scenarios("edit", 120, seed=5, wording="train"):
        human, gpt = _last(turns)
        if len(gpt["outputs"]) == 1:
            continue
        plus += 1
        edited, more = gpt["outputs"]
        assert len(gpt["captions"]) == 2 and gpt["captions"][1] in human["value"]  # the new output is asked for
        marks = re.findall(r"<(image|audio|video)>", gpt["value"])
        assert marks == [edited.modality, more.modality] and gpt["value"].endswith(f"<{more.modality}>")
        assert gpt["value"].index(gpt["captions"][0]) < gpt["value"].index(f"<{edited.modality}>")
    assert plus >= 5
    assert all(len(t[-1]["outputs"]) == 1 for t in sample_scenarios("edit", 60, seed=5, wording="eval"))
    # the evaluation's "edit-plus": always both, joined by wordings the training never uses
    assert not set(EDIT_PLUS_HELD) & set(EDIT_PLUS_JOIN)
    for turns in sample_scenarios("edit-plus", 30, seed=5, wording="eval"):
        human, gpt = _last(turns)
        before = next(t["outputs"][-1] for t in reversed(turns[:-2]) if t.get("outputs"))
        assert len(gpt["outputs"]) == 2 and type(gpt["outputs"][0]) is type(before) and gpt["captions"][1] in human["value"]


def test_a_relative_pitch_edit_moves_one_step():
    """The training-only "edit-pitch" scenario: "higher please" after a low beep makes a mid one, after a
    mid one a high one (with "edit-pitch-plus", a new output is asked for in the same message too); the
    timbre kept, the reply names the new pitch. The evaluation cannot be asked for it."""
    seen, plus = set(), 0
    rng = np.random.default_rng(7)
    for turns in (sample_conversation(rng, scenario) for scenario in ("edit-pitch", "edit-pitch-plus") * 60):
        human, gpt = _last(turns)
        before = next(t["outputs"][-1] for t in reversed(turns[:-2]) if t.get("outputs"))
        new = gpt["outputs"][0]
        assert isinstance(before, AudioSpec) and isinstance(new, AudioSpec) and new.timbre == before.timbre
        step = PITCH_ORDER.index(new.pitch) - PITCH_ORDER.index(before.pitch)
        assert abs(step) == 1 and f"{new.pitch}-pitched" in gpt["value"]
        assert re.search(r"higher|raise|\bup\b" if step > 0 else r"lower|drop|\bdown\b", human["value"], re.I)
        seen.add((before.pitch, new.pitch))
        plus += len(gpt["outputs"]) == 2 and gpt["captions"][1] in human["value"]
    assert seen == {("low", "mid"), ("mid", "high"), ("mid", "low"), ("high", "mid")}
    assert plus >= 60  # every "edit-pitch-plus" also asks for a new output
    with pytest.raises(ValueError, match="'edit-pitch' is not an evaluation scenario"):
        sample_scenarios("edit-pitch", 1, seed=1)


def test_the_first_item_is_what_recall_answers():
    for turns in sample_scenarios("recall", 30, seed=2, wording="train"):
        human, gpt = _last(turns)
        (key, value), = gpt["answer"].items()
        assert value in gpt["value"] and not gpt.get("outputs")


def test_a_training_recall_names_the_only_item_of_its_kind_without_first():
    """"what colour was the circle?" is asked only when one circle was made or shown; the answer is its
    colour. The evaluation never asks it that way and has no wording for it."""
    rng, named = np.random.default_rng(3), 0
    for turns in (sample_conversation(rng, "recall") for _ in range(300)):
        human, gpt = _last(turns)
        if "first" in human["value"].lower() or re.search(r"shape", human["value"], re.I):
            continue
        (key, value), = gpt["answer"].items()
        assert key in ("colour", "direction", "pitch") and value in gpt["value"]
        specs = [x for t in turns[:-2] for x in t.get("inputs", []) + t.get("outputs", [])]
        if key == "pitch":
            assert sum(isinstance(x, AudioSpec) for x in specs) == 1  # "the sound": the only one
        else:
            shape = next(n for n in ("circle", "square", "triangle") if n in human["value"].lower())
            assert sum(getattr(x, "shape", None) == shape for x in specs) == 1  # "the circle": the only one
        named += 1
    assert named >= 30
    for turns in sample_scenarios("recall", 40, seed=4):
        assert "first" in _last(turns)[0]["value"].lower()
    with pytest.raises(ValueError, match="training-only intent"):
        from training.world.conversations import Writer
        Writer(np.random.default_rng(0), wording="eval").say("recall.named.colour", r="circle")


def test_multi_asks_each_modality_in_order():
    for turns in sample_scenarios("multi", 30, seed=3, wording="train"):
        human, gpt = _last(turns)
        specs = gpt["outputs"]
        assert 2 <= len(specs) <= 3 and len(gpt["captions"]) == len(specs)
        positions = [human["value"].lower().find(c.lower()) for c in gpt["captions"]]
        assert all(p >= 0 for p in positions) and positions == sorted(positions)  # asked in this order


def test_show_me_a_moving_thing_is_a_video_and_a_still_one_a_picture():
    """ "show me a blue circle moving left" (training wording, alone or as one part of several) asks for
    a video; "show me a blue circle" for a picture."""
    seen = set()
    for convo in sample_conversations(600, seed=9, scenarios=("multi", "chat-create"), three=0.3):
        for human, gpt in zip(convo, convo[1:]):
            if human["from"] != "human" or "outputs" not in gpt:
                continue
            for spec, caption in zip(gpt["outputs"], gpt["captions"]):
                if f"show me {caption.lower()}" in human["value"].lower():
                    seen.add(type(spec).__name__)
                    assert (type(spec).__name__ == "VideoSpec") == (" moving " in caption), human["value"]
    assert seen == {"ImageSpec", "VideoSpec"}


def test_three_sets_how_often_several_outputs_are_three():
    def threes(three):
        convs = sample_conversations(200, seed=7, scenarios=("multi",), three=three)
        multi = [next(t for t in c if t["from"] == "gpt" and t["kind"] == "multi") for c in convs]
        return sum(len(t["outputs"]) == 3 for t in multi) / len(multi)

    assert threes(0.0) == 0 and threes(1.0) == 1 and 0.1 < threes(0.2) < 0.3 < 0.4 < threes(0.5) < 0.6


def test_either_or_questions_offer_the_true_value_and_one_other():
    """ "red or blue?" (training wording only): both are values of the asked attribute, one is the
    output's, and the answer names that one."""
    import re

    seen = 0
    for turns in sample_scenarios("ask", 200, seed=8, wording="train"):
        human, gpt = _last(turns)
        m = re.search(r"(\w+) or (\w+)", human["value"])
        (key, value), = gpt["answer"].items()
        if not m or key == "timbre" or "high, mid" in human["value"].lower():  # the older wordings
            continue
        options = {m.group(1).lower(), m.group(2).lower()}
        if key == "pitch" and "high or low" in human["value"].lower() and value == "mid":
            continue  # "Is it high or low?" (an old wording) for a mid pitch
        assert value in options and len(options) == 2 and value in gpt["value"], human["value"]
        seen += 1
    assert seen > 10
    evals = [_last(t)[0]["value"] for t in sample_scenarios("ask", 60, seed=8)]
    assert not any(re.fullmatch(r"(red|green|blue|yellow|purple|orange|circle|square|triangle) or \w+\??", e.lower()) for e in evals)


def test_eval_wording_is_never_a_training_wording():
    """Every user intent's held-out phrasings (index % 4 == 3) differ from all its training phrasings,
    also after a user's habits (lower case, no punctuation); and the training data never uses them."""
    import re

    def norm(t):
        return re.sub(r"[^a-z{} ]", "", t.lower()).strip()

    replies = ("answer", "recalled", "said", "described", "made", "edited", "converted", "multi.made")
    for intent, pool in W.items():
        if intent.startswith(replies):
            continue
        trained = {norm(t) for i, t in enumerate(pool) if i % 4 != 3} | {norm(t) for t in W_TRAIN.get(intent, ())}
        assert not [t for i, t in enumerate(pool) if i % 4 == 3 and norm(t) in trained], intent
    held = {norm(t) for intent, pool in W.items() if not intent.startswith(replies) for i, t in enumerate(pool) if i % 4 == 3}
    assert set(W_TRAIN) - set(W) == {"recall.named.colour", "recall.named.direction", "recall.named.pitch"} and not held & {norm(t) for pool in W_TRAIN.values() for t in pool}
    shapes = {norm(re.sub(r"\b(red|green|blue|yellow|purple|orange|circle|square|triangle)\b", "{}", t["value"]))
              for c in sample_conversations(300, seed=0) for t in c if t["from"] == "human"}
    assert len(shapes) > 50
    assert not {h for h in held if "{" not in h} & {norm(t["value"]) for c in sample_conversations(300, seed=0) for t in c}


def test_records_round_trip_with_several_outputs(tmp_path, settings):
    from training.trainer.data import read_dialogs_file
    from training.world.dialogs import write_records

    convs = sample_scenarios("multi", 3, seed=5, wording="train") + sample_scenarios("attach", 3, seed=5, wording="train")
    path = write_records(tmp_path / "d", convs, 32, outputs=True)
    dialogs = read_dialogs_file(path)
    for conv, dialog in zip(convs, dialogs):
        gpt = conv[-1]
        last = dialog.turns[-1]
        assert [o.modality for o in last.outputs] == [s.modality for s in gpt["outputs"]]
        assert [o.caption for o in last.outputs] == gpt["captions"]
    attach = dialogs[3:]
    assert all(any(t.media for t in d.turns if t.role == "user") for d in attach)  # the attachment is an input


def test_a_multi_output_reply_trains_one_signal_group_per_output(tiny_model, tmp_path):
    from training.trainer.data import read_dialogs_file
    from training.trainer.encode import DialogEncoder
    from training.world.dialogs import write_records

    convs = sample_scenarios("multi", 4, seed=6, wording="train")
    dialogs = read_dialogs_file(write_records(tmp_path / "m", convs, 32, outputs=False))
    enc = DialogEncoder(tiny_model.tokenizer, tiny_model.template, tiny_model.system_prompt, 1024)
    for conv, d in zip(convs, dialogs):
        ex = enc.encode(d)
        asked = [s.modality for s in conv[-1]["outputs"]]
        last = [m for _, m, _ in ex.signals][-len(asked):]
        assert last == asked
        starts = [s for s, _, _ in ex.signals][-len(asked):]
        assert starts == sorted(starts)
        # each group follows the words naming its output: the labelled text before group i (after
        # group i-1) names output i, and no later one
        ends = [s + len(enc.signal_ids[m]) for s, m in zip(starts, asked)]
        reply = starts[0]
        while ex.labels[reply - 1] != -100:  # back to the first trained token of the last reply
            reply -= 1
        for i, cap in enumerate(conv[-1]["captions"]):
            between = tiny_model.tokenizer.decode(ex.input_ids[(ends[i - 1] if i else reply) : starts[i]], skip_special_tokens=True)
            assert cap.lower() in between.lower(), (cap, between)
            later = conv[-1]["captions"][i + 1 :]
            assert not any(c.lower() in between.lower() and c.lower() not in cap.lower() for c in later)


def test_a_placeholder_inside_a_reply_puts_its_signal_group_there(tmp_path, tiny_model):
    import json

    from training.trainer.data import Output, read_dialogs_file
    from training.trainer.encode import DialogEncoder, with_signals

    rec = [{"id": "x", "conversation": [
        {"from": "human", "value": "draw a green square and play a high beep"},
        {"from": "gpt", "value": "Here is a green square <image> and a high beep. <audio>", "output_modality": ["image", "audio"],
         "caption": ["a green square", "a high beep"]},
    ]}]  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps(rec))
    turn = read_dialogs_file(tmp_path / "d.json")[0].turns[-1]
    assert turn.text == "Here is a green square and a high beep."
    assert turn.outputs == [Output("image", "a green square", len("Here is a green square")), Output("audio", "a high beep")]
    img, aud = "[IMG0][IMG1][IMG2][IMG3]", "".join(f"[AUD{i}]" for i in range(8))
    assert with_signals(turn.text, turn.outputs) == f"Here is a green square{img} and a high beep.{aud}"
    # without places every group goes at the end, in order (the official data's form)
    assert with_signals("Done.", [Output("audio"), Output("image")]) == f"Done.{aud}{img}"
    ex = DialogEncoder(tiny_model.tokenizer, tiny_model.template, tiny_model.system_prompt, 512).encode(read_dialogs_file(tmp_path / "d.json")[0])
    (s_img, m_img, _), (s_aud, m_aud, _) = ex.signals
    assert (m_img, m_aud) == ("image", "audio")
    between = tiny_model.tokenizer.decode(ex.input_ids[s_img + 4 : s_aud], skip_special_tokens=True)
    assert between.strip() == "and a high beep."
    assert all(lab != -100 for lab in ex.labels[s_img : s_aud + 8])  # the words between the groups are trained


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    from training.world.dataset import write_media

    d = tmp_path_factory.mktemp("truth")
    files = {}
    for name, spec in {"blue-circle": ImageSpec("circle", "blue", "large", "center"),
                       "red-circle": ImageSpec("circle", "red", "large", "center"),
                       "high-beep": AudioSpec("high", "beep")}.items():  # fmt: skip
        files[name] = d / f"{name}.{'png' if isinstance(spec, ImageSpec) else 'wav'}"
        write_media(spec, files[name], 64)
    return files


def test_dialog_scoring_checks_attributes_order_and_answers(rendered):
    from training.evaluate import DialogCase, score_dialog_turn

    blue = ImageSpec("circle", "blue", "large", "center")
    edit = DialogCase("edit", [{"from": "human", "value": "now make it blue"},
                               {"from": "gpt", "value": "", "outputs": [blue], "captions": ["a blue circle"], "changed": "colour"}])  # fmt: skip
    text = "Here it is in blue: a blue circle."
    assert score_dialog_turn(edit, text, ["image"], [("image", rendered["blue-circle"])], "eos")["ok"]
    assert not score_dialog_turn(edit, text, ["image"], [("image", rendered["red-circle"])], "eos")["ok"]  # the picture stayed red
    assert not score_dialog_turn(edit, text, [], [], "eos")["ok"]  # no picture at all

    multi = DialogCase("multi", [{"from": "human", "value": "draw a blue circle and play a high beep"},
                                 {"from": "gpt", "value": "", "outputs": [blue, AudioSpec("high", "beep")],
                                  "captions": ["a blue circle", "a high-pitched beep"]}])  # fmt: skip
    both = [("image", rendered["blue-circle"]), ("audio", rendered["high-beep"])]
    assert score_dialog_turn(multi, "", ["image", "audio"], both, "eos")["ok"]
    assert not score_dialog_turn(multi, "", ["audio", "image"], both, "eos")["ok"]  # not in the order asked
    assert not score_dialog_turn(multi, "", ["image"], both[:1], "eos")["ok"]  # only one of the two

    # "make it blue, and also play a high beep": the edited attribute is scored on the edited output only
    plus = DialogCase("edit-plus", [{"from": "human", "value": "make it blue, and also play a high beep"},
                                    {"from": "gpt", "value": "", "outputs": [blue, AudioSpec("high", "beep")],
                                     "captions": ["a blue circle", "a high-pitched beep"], "changed": "colour"}])  # fmt: skip
    scored = score_dialog_turn(plus, "", ["image", "audio"], both, "eos")
    assert scored["ok"] and [o["keys"] for o in scored["outputs"]] == [["colour", "shape"], ["pitch"]]
    assert not score_dialog_turn(plus, "", ["image", "audio"], [("image", rendered["red-circle"]), both[1]], "eos")["ok"]
    assert not score_dialog_turn(plus, "", ["image"], both[:1], "eos")["ok"]  # the edit without the new output

    # two pictures: each output's words are the ones before its own signal group, not the first thing named
    red = ImageSpec("circle", "red", "large", "center")
    two = DialogCase("multi", [{"from": "human", "value": "draw a red circle and a blue circle"},
                               {"from": "gpt", "value": "", "outputs": [red, blue], "captions": ["a red circle", "a blue circle"]}])  # fmt: skip
    pics = [("image", rendered["red-circle"]), ("image", rendered["blue-circle"])]
    text = "Here is a red circle and a blue circle."
    scored = score_dialog_turn(two, text, ["image", "image"], pics, "eos", ["Here is a red circle", " and a blue circle."])
    assert scored["ok"] and scored["text_ok"] and [o["text_ok"] for o in scored["outputs"]] == [True, True]
    swapped = score_dialog_turn(two, "Here is a blue circle and a red circle.", ["image", "image"], pics, "eos",
                                ["Here is a blue circle", " and a red circle."])  # fmt: skip
    assert [o["text_ok"] for o in swapped["outputs"]] == [False, False]
    assert not score_dialog_turn(two, text, ["image", "image"], pics, "eos")["text_ok"]  # without the words: the first thing named for both
    assert not score_dialog_turn(two, text, ["image"], pics[:1], "eos", ["Here is a red circle"])["text_ok"]

    recall = DialogCase("recall", [{"from": "human", "value": "what colour was the first circle?"},
                                   {"from": "gpt", "value": "It was red.", "answer": {"colour": "red"}}])  # fmt: skip
    assert score_dialog_turn(recall, "The first circle was red.", [], [], "eos")["ok"]
    assert not score_dialog_turn(recall, "It was blue.", [], [], "eos")["ok"]
    assert not score_dialog_turn(recall, "It was red.", ["image"], [], "eos")["ok"]  # an answer needs no media


def test_dialog_scoring_reports_words_that_break_a_named_attribute(rendered):
    """`words_keep`: the reply's words contradict nothing the script's caption of the output names; the
    score itself (main attributes + the edited one) is unchanged by it."""
    from training.evaluate import DialogCase, score_dialog_turn

    large = ImageSpec("circle", "blue", "large", "center")
    bigger = DialogCase("edit", [{"from": "human", "value": "make it bigger"},
                                 {"from": "gpt", "value": "", "outputs": [large], "captions": ["a large blue circle in the middle"],
                                  "changed": "size"}])  # fmt: skip
    pic = [("image", rendered["blue-circle"])]
    moved = score_dialog_turn(bigger, "Done! Here is a large blue circle on the right.", ["image"], pic, "eos")
    assert moved["ok"] and moved["text_ok"]  # colour, shape and size are right in both
    assert moved["words_keep"] is False and moved["outputs"][0]["words_break"] == ["position"]
    for fine in ("Done! Here is a large blue circle in the centre.", "Here you go: a large blue circle."):  # a synonym; not restated
        kept = score_dialog_turn(bigger, fine, ["image"], pic, "eos")
        assert kept["words_keep"] is True and "words_break" not in kept["outputs"][0]
    # an attribute the caption never named is not held against the words
    unnamed = DialogCase("edit", [{"from": "human", "value": "make it bigger"},
                                  {"from": "gpt", "value": "", "outputs": [large], "captions": ["a large blue circle"], "changed": "size"}])  # fmt: skip
    assert score_dialog_turn(unnamed, "Done! Here is a large blue circle on the right.", ["image"], pic, "eos")["words_keep"] is True
    recall = DialogCase("recall", [{"from": "human", "value": "what colour was it?"},
                                   {"from": "gpt", "value": "It was red.", "answer": {"colour": "red"}}])  # fmt: skip
    assert "words_keep" not in score_dialog_turn(recall, "It was red.", [], [], "eos")  # questions: not a media turn
    # "make it move": the script's caption picked a direction the user left open; any direction keeps the rest
    moving = VideoSpec("circle", "blue", "up")
    move = DialogCase("convert", [{"from": "human", "value": "make it move"},
                                  {"from": "gpt", "value": "", "outputs": [moving], "captions": ["a blue circle moving up"],
                                   "scored": ["colour", "shape"]}])  # fmt: skip
    assert score_dialog_turn(move, "Here it is moving: a blue circle moving down.", ["video"], [], "eos")["words_keep"] is True
    assert score_dialog_turn(move, "Here it is moving: a red circle moving down.", ["video"], [], "eos")["words_keep"] is False


def test_make_it_move_is_scored_on_what_was_asked_not_on_a_guessed_direction(tmp_path):
    """'make it move' names no direction: any direction answers it, the kept colour+shape are scored;
    'animate it going left' is scored on the direction."""
    import re

    from training.evaluate import DialogCase, score_dialog_turn
    from training.world.dataset import write_media
    from training.world.spec import VideoSpec

    named = unnamed = 0
    for wording in ("eval", "train"):
        for turns in sample_scenarios("convert", 120, seed=5, wording=wording):
            human, gpt = _last(turns)
            spec = gpt["outputs"][0]
            if not isinstance(spec, VideoSpec):
                continue
            if re.search(rf"\b{spec.direction}\b", human["value"].lower()):
                named += 1
                assert "scored" not in gpt
            else:
                unnamed += 1
                assert gpt["scored"] == ["colour", "shape"], human["value"]
    assert named and unnamed

    left = tmp_path / "left.mp4"
    write_media(VideoSpec("circle", "red", "left"), left, 64)
    asked_up = {"from": "gpt", "value": "", "outputs": [VideoSpec("circle", "red", "up")], "captions": ["a red circle moving up"]}
    text = "Here it is moving: a red circle moving left."
    made = [("video", left)]
    assert score_dialog_turn(DialogCase("convert", [dict(asked_up, scored=["colour", "shape"])]), text, ["video"], made, "eos")["ok"]
    assert not score_dialog_turn(DialogCase("convert", [asked_up]), text, ["video"], made, "eos")["ok"]  # "going up" asked
    blue = {"from": "gpt", "value": "", "outputs": [VideoSpec("circle", "blue", "up")], "captions": ["a blue circle moving up"],
            "scored": ["colour", "shape"]}  # fmt: skip
    assert not score_dialog_turn(DialogCase("convert", [blue]), text, ["video"], made, "eos")["ok"]  # the colour not kept


def test_a_reference_names_the_first_output_unambiguously():
    """"make the first circle blue"; in training also "the first one" (only when nothing came before it)
    and "the first picture" / "the first video" (only when it is the first of its kind); the edit is of
    that output. The evaluation names the shape, as before."""
    named = set()
    for wording in ("train", "eval"):
        for turns in sample_scenarios("refer", 80, seed=6, wording=wording):
            human, gpt = _last(turns)
            media = [(t["from"], s) for t in turns[:-2] for s in t.get("inputs", []) + t.get("outputs", [])]
            i, first = next((i, s) for i, (who, s) in enumerate(media) if who == "gpt" and s.modality != "audio")
            word = re.search(r"first (\w+)", human["value"], re.I).group(1)
            assert word == first.shape or wording == "train", human["value"]
            if word == "one":
                assert i == 0
            elif word != first.shape:
                assert word == {"image": "picture", "video": "video"}[first.modality]
                assert all(s.modality != first.modality for _, s in media[:i])
            new = gpt["outputs"][0]
            assert replace(new, colour=first.colour) == first and new.colour != first.colour
            named.add(word if wording == "train" and word in ("one", "picture", "video") else "shape")
    assert named == {"one", "picture", "video", "shape"}
