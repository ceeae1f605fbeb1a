"""Hand tries: whole conversations as a user types them, driven through the `small` model greedily,
every output rendered and checked with the world analyzer (the README's "hand tries").

    python -m training.hand_tries [--set chosen|fresh|s33] [--checkpoint DIR]

`chosen`: 41 turns used since session 29 to choose between releases; `fresh`: 38 turns in other
phrasings, written in session 32 after its weights were chosen; `s33`: 33 turns written in session 33
before its round's weights were seen. A turn is right when it made exactly
the outputs asked for, in order, with the named attributes (or, for a question, no media and the
expected word in the reply). Prints one line per turn and the count."""
import argparse
import tempfile
from pathlib import Path

import torch

from assistant.agent import Assistant
from nextgpt.config import load_settings
from nextgpt.messages import Message
from nextgpt.model import PromptCache
from training.evaluate import register_world_components
from training.world.analyze import attributes

I, A, V, T = "image", "audio", "video", "text"

SETS = {
    "chosen": [
        [("draw a red circle", [(I, dict(colour="red", shape="circle"))]),
         ("now make it blue", [(I, dict(colour="blue", shape="circle"))]),
         ("draw a green square and play a high beep", [(I, dict(colour="green", shape="square")), (A, dict(pitch="high", timbre="beep"))]),
         ("what colour was the first circle?", [(T, "red")])],
        [("please draw a yellow circle", [(I, dict(colour="yellow", shape="circle"))]),
         ("change it to a triangle", [(I, dict(colour="yellow", shape="triangle"))]),
         ("and make it purple", [(I, dict(colour="purple", shape="triangle"))])],
        [("hi! how are you?", []), ("could you draw an orange triangle?", [(I, dict(colour="orange", shape="triangle"))]),
         ("now the same as a video, moving left", [(V, dict(shape="triangle", direction="left"))])],
        [("make a video of a blue square moving up", [(V, dict(colour="blue", shape="square", direction="up"))]),
         ("can you make it purple?", [(V, dict(colour="purple", shape="square"))]),
         ("now have it go down instead", [(V, dict(shape="square", direction="down"))])],
        [("play a low beep", [(A, dict(pitch="low", timbre="beep"))]),
         ("higher please", [(A, dict(pitch="mid"))]),
         ("make it a buzz", [(A, dict(timbre="buzz"))])],
        [("draw a blue circle", [(I, dict(colour="blue", shape="circle"))]),
         ("draw a red square", [(I, dict(colour="red", shape="square"))]),
         ("make the first one yellow", [(I, dict(colour="yellow", shape="circle"))])],
        [("paint a green triangle", [(I, dict(colour="green", shape="triangle"))]),
         ("make it a blue circle on the left, and also play a low buzz", [(I, dict(colour="blue", shape="circle", position="left")), (A, dict(pitch="low", timbre="buzz"))])],
        [("draw a purple square", [(I, dict(colour="purple", shape="square"))]),
         ("could it be a triangle? also play a mid buzz", [(I, dict(colour="purple", shape="triangle")), (A, dict(pitch="mid", timbre="buzz"))])],
        [("show me a yellow circle moving right", [(V, dict(colour="yellow", shape="circle", direction="right"))]),
         ("what direction was it moving?", [(T, "right")]),
         ("now draw it as a picture", [(I, dict(colour="yellow", shape="circle"))])],
        [("draw a red triangle, play a high buzz and make a video of a green circle moving down",
          [(I, dict(colour="red", shape="triangle")), (A, dict(pitch="high", timbre="buzz")), (V, dict(colour="green", shape="circle", direction="down"))])],
        [("draw a small orange circle", [(I, dict(colour="orange", shape="circle", size="small"))]),
         ("bigger and on the right please, plus a video of a red square moving left", [(I, dict(colour="orange", shape="circle", position="right")), (V, dict(colour="red", shape="square", direction="left"))])],
        [("i'd like a picture of a blue triangle", [(I, dict(colour="blue", shape="triangle"))]),
         ("thanks! what shape was that?", [(T, "triangle")]),
         ("make it green", [(I, dict(colour="green", shape="triangle"))])],
        [("play a high beep", [(A, dict(pitch="high", timbre="beep"))]),
         ("draw a red circle", [(I, dict(colour="red", shape="circle"))]),
         ("was the sound high or low?", [(T, "high")])],
        [("make a clip of a red circle going up", [(V, dict(colour="red", shape="circle", direction="up"))]),
         ("make it a yellow triangle going down", [(V, dict(colour="yellow", shape="triangle", direction="down"))])],
        [("draw a green circle", [(I, dict(colour="green", shape="circle"))]),
         ("now a purple circle moving down", [(V, dict(colour="purple", shape="circle", direction="down"))])],
        [("can you play a mid buzz", [(A, dict(pitch="mid", timbre="buzz"))]),
         ("lower, and also draw a blue square", [(A, dict(pitch="low")), (I, dict(colour="blue", shape="square"))])],
    ],
    "fresh": [
        [("can u draw me a green triangle", [(I, dict(colour="green", shape="triangle"))]),
         ("hmm make it red instead", [(I, dict(colour="red", shape="triangle"))]),
         ("and turn it into a square", [(I, dict(colour="red", shape="square"))])],
        [("I want a picture of a yellow square", [(I, dict(colour="yellow", shape="square"))]),
         ("now animate it moving right", [(V, dict(colour="yellow", shape="square", direction="right"))]),
         ("which way does it move?", [(T, "right")])],
        [("play a high buzz please", [(A, dict(pitch="high", timbre="buzz"))]),
         ("can you make it lower?", [(A, dict(pitch="mid"))]),
         ("now turn it into a beep", [(A, dict(timbre="beep"))])],
        [("hello there", []),
         ("paint a purple circle for me", [(I, dict(colour="purple", shape="circle"))]),
         ("what colour is it?", [(T, "purple")])],
        [("draw a blue square and make a video of a red circle moving up", [(I, dict(colour="blue", shape="square")), (V, dict(colour="red", shape="circle", direction="up"))])],
        [("play a low beep and draw an orange triangle", [(A, dict(pitch="low", timbre="beep")), (I, dict(colour="orange", shape="triangle"))])],
        [("video of a green square moving left please", [(V, dict(colour="green", shape="square", direction="left"))]),
         ("make it go right", [(V, dict(shape="square", direction="right"))]),
         ("now a still image of it", [(I, dict(colour="green", shape="square"))])],
        [("draw a red circle", [(I, dict(colour="red", shape="circle"))]),
         ("draw a blue triangle", [(I, dict(colour="blue", shape="triangle"))]),
         ("what colour was the circle?", [(T, "red")])],
        [("sketch a small yellow triangle", [(I, dict(colour="yellow", shape="triangle", size="small"))]),
         ("make it large", [(I, dict(colour="yellow", shape="triangle", size="large"))])],
        [("make a beep, mid pitch", [(A, dict(pitch="mid", timbre="beep"))]),
         ("higher", [(A, dict(pitch="high"))])],
        [("draw an orange circle on the left", [(I, dict(colour="orange", shape="circle", position="left"))]),
         ("move it to the right", [(I, dict(colour="orange", shape="circle", position="right"))])],
        [("show me a purple triangle moving down", [(V, dict(colour="purple", shape="triangle", direction="down"))]),
         ("make it blue, and also play a high beep", [(V, dict(colour="blue", shape="triangle")), (A, dict(pitch="high", timbre="beep"))])],
        [("draw a green circle", [(I, dict(colour="green", shape="circle"))]),
         ("play a low buzz", [(A, dict(pitch="low", timbre="buzz"))]),
         ("make the first one a square", [(I, dict(colour="green", shape="square"))])],
        [("what can you do?", []),
         ("ok draw a red square then", [(I, dict(colour="red", shape="square"))]),
         ("thanks", [])],
        [("give me a picture of a blue circle, a high beep and a clip of a yellow square going left",
          [(I, dict(colour="blue", shape="circle")), (A, dict(pitch="high", timbre="beep")), (V, dict(colour="yellow", shape="square", direction="left"))])],
        [("play a mid buzz", [(A, dict(pitch="mid", timbre="buzz"))]),
         ("is it a beep or a buzz?", [(T, "buzz")]),
         ("draw a red triangle too", [(I, dict(colour="red", shape="triangle"))])],
    ],
    "s33": [
        [("yo draw a blue triangle", [(I, dict(colour="blue", shape="triangle"))]),
         ("make it orange pls", [(I, dict(colour="orange", shape="triangle"))]),
         ("what shape is it?", [(T, "triangle")])],
        [("Could you generate an image of a red square?", [(I, dict(colour="red", shape="square"))]),
         ("Same thing but moving up", [(V, dict(colour="red", shape="square", direction="up"))]),
         ("cool, thanks!", [])],
        [("I'd love to hear a low buzz", [(A, dict(pitch="low", timbre="buzz"))]),
         ("make it a beep instead", [(A, dict(pitch="low", timbre="beep"))]),
         ("a bit higher", [(A, dict(pitch="mid", timbre="beep"))])],
        [("play a high beep and show me a blue circle moving left", [(A, dict(pitch="high", timbre="beep")), (V, dict(colour="blue", shape="circle", direction="left"))])],
        [("good morning!", []),
         ("can you show me a yellow circle going down?", [(V, dict(colour="yellow", shape="circle", direction="down"))]),
         ("what direction was that?", [(T, "down")])],
        [("draw a red circle", [(I, dict(colour="red", shape="circle"))]),
         ("draw a green triangle", [(I, dict(colour="green", shape="triangle"))]),
         ("make the first one purple", [(I, dict(colour="purple", shape="circle"))])],
        [("create a clip of an orange square moving right", [(V, dict(colour="orange", shape="square", direction="right"))]),
         ("now make it a circle", [(V, dict(colour="orange", shape="circle", direction="right"))])],
        [("beep, high pitch please", [(A, dict(pitch="high", timbre="beep"))]),
         ("also draw a yellow triangle", [(I, dict(colour="yellow", shape="triangle"))])],
        [("draw a blue circle and play a mid beep", [(I, dict(colour="blue", shape="circle")), (A, dict(pitch="mid", timbre="beep"))])],
        [("make a video of a green triangle moving up, and draw a red square", [(V, dict(colour="green", shape="triangle", direction="up")), (I, dict(colour="red", shape="square"))])],
        [("play a mid buzz", [(A, dict(pitch="mid", timbre="buzz"))]),
         ("how high was it?", [(T, "mid")])],
        [("Draw me a circle in blue on the right", [(I, dict(colour="blue", shape="circle", position="right"))]),
         ("now put it on the left", [(I, dict(colour="blue", shape="circle", position="left"))])],
        [("draw a small purple square", [(I, dict(colour="purple", shape="square", size="small"))]),
         ("make it green and play a low beep", [(I, dict(colour="green", shape="square")), (A, dict(pitch="low", timbre="beep"))])],
        [("show a red triangle going left", [(V, dict(colour="red", shape="triangle", direction="left"))]),
         ("reverse the direction", [(V, dict(shape="triangle", direction="right"))])],
        [("i need a yellow square", [(I, dict(colour="yellow", shape="square"))]),
         ("and a high buzz", [(A, dict(pitch="high", timbre="buzz"))]),
         ("what colour was the square?", [(T, "yellow")])],
    ],
}


def turn_ok(want: list, got: list, text: str) -> bool:
    """`want`: [(modality, {attribute: value}), ...] in order, [(T, word)] for an answer, [] for no media."""
    if not want:
        return not got
    if want[0][0] == T:
        return not got and want[0][1] in text.lower()
    return len(got) == len(want) and all(g[0] == w[0] and all(g[1].get(k) == v for k, v in w[1].items()) for g, w in zip(got, want))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=sorted(SETS), default="chosen")
    ap.add_argument("--checkpoint", help="a checkpoint folder (default: the profile's)")
    args = ap.parse_args(argv)
    register_world_components()
    asst = Assistant(load_settings(), "small", output_dir=Path(tempfile.mkdtemp(prefix="hand-tries-")))
    if args.checkpoint:
        asst.profile = asst.profile.model_copy(update={"checkpoint": args.checkpoint})
    model, gen = asst.model, asst.profile.generation
    right = total = 0
    for ci, convo in enumerate(SETS[args.set]):
        messages, cache = [], PromptCache()
        for ti, (text, want) in enumerate(convo):
            messages.append(Message("user", text, []))
            r = model.generate(messages, want=[], seed=1, cache=cache, **gen.sampling())
            messages.append(Message("assistant", r.trace))
            got = []
            for k, s in enumerate(r.signals):
                with torch.inference_mode():
                    files = asst.tools[s.modality](s.prompt_embeds, seed=k)
                got.append((s.modality, attributes(s.modality, files[0].path)))
            ok = turn_ok(want, got, r.text)
            right += ok
            total += 1
            print(f"{'OK ' if ok else 'BAD'} [{ci}.{ti}] {text!r} -> {r.text.strip()!r} {got}", flush=True)
    print(f"{right}/{total} turns right")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
