"""The hand-try sets (training.hand_tries) ask only for what the shapes world has, and a turn is scored
right only on exactly the outputs asked for."""
from training.hand_tries import SETS, T, turn_ok
from training.world.spec import VOCABULARY


def test_every_expected_attribute_is_a_world_value():
    for name, convos in SETS.items():
        for convo in convos:
            for text, want in convo:
                assert text.strip(), name
                for modality, expect in want:
                    if modality == T:
                        assert len(want) == 1 and isinstance(expect, str) and expect == expect.lower()
                        continue
                    assert modality in ("image", "audio", "video") and expect
                    for key, value in expect.items():
                        assert value in VOCABULARY[key], (name, text, key, value)


def test_a_turn_is_right_only_with_exactly_the_outputs_asked_for():
    want = [("image", {"colour": "red", "shape": "circle"}), ("audio", {"pitch": "high"})]
    red = ("image", {"colour": "red", "shape": "circle", "size": "small"})
    assert turn_ok(want, [red, ("audio", {"pitch": "high", "timbre": "beep"})], "")
    assert not turn_ok(want, [red], "")  # one missing
    assert not turn_ok(want, [("audio", {"pitch": "high"}), red], "")  # the wrong order
    assert not turn_ok(want, [red, ("audio", {"pitch": "low"})], "")
    assert turn_ok([(T, "red")], [], "It was red.") and not turn_ok([(T, "red")], [red], "It was red.")
    assert turn_ok([], [], "You're welcome.") and not turn_ok([], [red], "Here is a red circle.")
