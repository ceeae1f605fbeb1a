"""Multi-turn MosIT conversations over the shapes world: the follow-ups users make.

A conversation is 1–5 context exchanges followed by one exchange of a SCENARIO — the kinds of
turn that make a conversation, not a one-shot generator (the last exchange is what
`nextgpt eval --dialogs` scores):

| scenario | the last user turn | the reply |
|---|---|---|
| edit | change one attribute of the last output ("now make it blue", "make it bigger", "move it up", "higher") | the edited thing: that attribute changed, the rest kept |
| convert | "the same but as a video moving left" / "show me a still picture of it" | the same shape and colour in the other modality |
| refer | change an EARLIER output ("make the first circle green") | that one, edited |
| multi | two or three modalities in one message ("draw a green square and play a high beep") | each output, one signal group each, in the order asked |
| chat-create | a request after chit-chat ("hi! how are you?" … "could you draw an orange triangle?") | the requested output |
| recall | "what colour was the first circle?" | the answer in words, no media |
| ask | "what colour is it?" about the last output | the answer in words, no media |
| attach | an attached picture / sound / video + "draw this shape in green" | the output built from the input's attributes |

`nextgpt eval --dialogs` also scores "edit-plus" (an edit and a new output in one message). Two more
exist for training only, to weight what the others rarely ask: "edit-pitch", a relative pitch edit of a
sound ("higher please" after a low beep: one step, a mid beep), and "edit-pitch-plus", the same with a
new output asked in the same message.

Context exchanges are creates, describes (an attached input), chit-chat, questions and edits, so
every scenario is also seen deep in a conversation. The reply to every media request names the
result's attributes in words ("Here it is in blue: a large blue circle."), and that is what the
context keeps of an output (its trace: text + signal tokens), so the next edit can be learned from
it; the turn's `caption` (the projector target) is exactly those words. A caption names only what
the conversation said (a request for "a red circle" never fixes its size): the decoder fills in
the rest, and so an edit keeps what was said and changes one thing.

Wording: every intent has a pool of phrasings; `wording="train"` uses three in four of them,
`wording="eval"` only the held-out fourth, so the evaluation's requests are never seen in
training. Users' habits (lower case, no final full stop, "please") are added at random.

    turns = sample_conversations(100, seed=5)                       # training data
    cases = sample_scenarios("edit", 20, seed=12345, wording="eval") # evaluation
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from training.world.captions import fill
from training.world.spec import (
    ATTRIBUTE_KEYS,
    COLOURS,
    DIRECTIONS,
    PITCHES,
    VOCABULARY,
    AudioSpec,
    ImageSpec,
    Spec,
    VideoSpec,
    sample_spec,
)

SCENARIOS = ("edit", "convert", "refer", "multi", "chat-create", "recall", "ask", "attach")
# the evaluation's: + an edit and a new output in one message ("make it smaller, and also play a low buzz")
EVAL_SCENARIOS = SCENARIOS + ("edit-plus",)
# training only: a relative pitch edit of a sound, one step ("higher please" after a low beep → mid), alone
# or with a new output asked in the same message ("lower please, and also paint a blue triangle")
PITCH_SCENARIOS = ("edit-pitch", "edit-pitch-plus")
TRAIN_SCENARIOS = EVAL_SCENARIOS + PITCH_SCENARIOS
EDIT_PLUS = 0.15  # how often a training edit also asks for a new output ("make it blue, and play a beep")
TWO_CHANGES = {"eval": 0.15, "train": 0.3}  # how often an edit changes two attributes ("make it blue and bigger")
RECALL_NAMED = 0.4  # how often a training recall of the only item of its kind names it without "first" ("the circle")
REFER_BY_KIND = 0.4  # how often a training reference names the earlier output by its kind ("the first one", "the first picture"), not its shape
THREE = 0.2  # how often a several-outputs request asks for three outputs (else two); the evaluation's share
_STREAM = {"train": 5, "eval": 8}  # random streams (pairs 0-2, dialogs 3, evaluate 7)
NOUN = {"image": "picture", "audio": "sound", "video": "video"}

# ------------------------------------------------------------------------------------ wordings
# Each tuple is one intent's phrasings; index % 4 == 3 is held out for evaluation.
W: dict[str, tuple[str, ...]] = {
    # creating (c = the words naming the output)
    "create.image": ("Draw {c}.", "Please make an image of {c}.", "Can you show me a picture of {c}?", "draw me {c}",
                     "Create an image: {c}.", "I'd like a picture of {c}.", "Make a picture of {c}.", "could you draw {c}?",
                     "Paint {c}.", "Show me {c}.", "Generate an image of {c}.", "can you draw {c} for me?"),
    "create.audio": ("Make {c}.", "Play me {c}.", "Can you generate {c}?", "play {c}",
                     "I would like to hear {c}.", "Give me {c}.", "Create the sound of {c}.", "could you make {c}?",
                     "Produce {c}.", "Let me hear {c}.", "Generate {c} sound.", "can you play {c} for me?"),
    "create.video": ("Make a video of {c}.", "Show me a clip of {c}.", "Can you animate {c}?", "animate {c}",
                     "Create a video: {c}.", "I'd like a video of {c}.", "Make a short clip of {c}.", "could you make a video of {c}?",
                     "Render a video of {c}.", "Give me an animation of {c}.", "Generate a clip of {c}.", "can you make a clip of {c}?"),
    "made.image": ("Here is an image of {c}.", "Sure! Here is a picture of {c}.", "I made an image of {c}.", "Here is {c}."),
    "made.audio": ("Here is {c}.", "Sure! Here is the sound: {c}.", "I made {c} for you.", "Here you go: {c}."),
    "made.video": ("Here is a video of {c}.", "Sure! Here is a clip of {c}.", "I made a video of {c}.", "Here is an animation of {c}."),
    # edits (x = the new value)
    "edit.colour": ("Make it {x}.", "Now make it {x}.", "Change the colour to {x}.", "can it be {x}?",
                    "Can you make it {x}?", "Same thing but {x}.", "Turn it {x}.", "switch it to {x}",
                    "I'd prefer it in {x}.", "Recolour it {x}.", "Try it in {x}.", "go with {x} this time",
                    "Make the {r} {x}.", "Now a {x} one.", "Colour it {x}.", "paint the {r} {x}",
                    "Can you change the colour of the {r} to {x}?", "Same {r} in {x}, please.", "Redo it in {x}.", "could you do it in {x}?"),
    "edit.shape": ("Make it a {x} instead.", "Change it to a {x}.", "Now a {x}.", "how about a {x}?",
                   "Can you make it a {x}?", "Same but as a {x}.", "Turn it into a {x}.", "swap it for a {x}",
                   "Use a {x} instead.", "What about a {x}?", "Try a {x}.", "i want a {x} now",
                   "Make the {r} a {x}.", "A {x} this time.", "Replace it with a {x}.", "how about making it a {x}"),
    "edit.size.large": ("Make it bigger.", "Make it large.", "Can you make it larger?", "a bigger one please",
                        "Bigger, please.", "Now a large one.", "Enlarge it.", "can you make it big?"),
    "edit.size.small": ("Make it smaller.", "Make it small.", "Can you make it smaller?", "a smaller one please",
                        "Smaller, please.", "Now a small one.", "Shrink it.", "can you make it small?"),
    "edit.position": ("Move it to the {x}.", "Put it on the {x}.", "Now on the {x}.", "can you put it on the {x}?",
                      "Can you move it to the {x}?", "Shift it to the {x}.", "Place it on the {x}.", "put it on the {x} instead"),
    "edit.direction": ("Now make it move {x}.", "Make it go {x} instead.", "Change the direction to {x}.", "can you have it go {x}?",
                       "Can it move {x}?", "Have it slide {x}.", "Make it move {x}.", "make it go {x}"),
    "edit.pitch": ("Make it {x}-pitched.", "Change the pitch to {x}.", "Now a {x} one.", "can it be {x}-pitched?",
                   "Can you make it {x}-pitched?", "Same but {x}-pitched.", "Try a {x} pitch.", "now make it {x} pitched"),
    "edit.pitch.up": ("Make it higher.", "Raise the pitch.", "A higher one, please.", "higher please"),
    "edit.pitch.down": ("Make it lower.", "Lower the pitch.", "A lower one, please.", "lower please"),
    "edit.timbre": ("Make it a {x} instead.", "Change it to a {x}.", "Now as a {x}.", "switch it to a {x}",
                    "Can you make it a {x}?", "Same pitch but a {x}.", "Turn it into a {x}.", "could it be a {x}?"),
    "edit.two": ("Make it {x} and {y}.", "Now {x} and {y}.", "Change it to {x} and {y}.", "{x} and {y} please",
                 "Can you make it {x} and {y}?", "I want it {x} and {y}.", "Make it {y} and {x}.", "switch to {x} and {y}"),
    "edited": ("Here it is, now {d}: {c}.", "Done! Here is {c}.", "Sure, here is {c}.", "Here you go: {c}."),
    # converting
    "to.video": ("Now a video of it moving {x}.", "Animate it moving {x}.", "Make it move {x} in a video.", "now make a video of it going {x}",
                 "Can you make a clip of it going {x}?", "Same but as a video, moving {x}.", "Turn it into a video moving {x}.", "animate it going {x}",
                 "Animate it.", "Make a video of it.", "Can you make it move?", "make it move"),
    "to.image": ("Show me a still picture of it.", "Draw it as a picture.", "Make an image of it.", "now just a picture of it",
                 "Can I see a still image of it?", "Same but as a picture.", "Turn it into a picture.", "draw it as an image"),
    "converted.video": ("Here is a video of it: {c}.", "Sure! Here is a clip of {c}.", "Here it is moving: {c}.", "Here you go: {c}."),
    "converted.image": ("Here is a picture of it: {c}.", "Sure! Here is a still image of {c}.", "Here it is as a picture: {c}.", "Here you go: {c}."),
    # referring to an earlier output (r = how it is named, x = the new colour)
    "refer": ("Make the first {r} {x}.", "Go back to the first {r} and make it {x}.", "Take the first {r} and make it {x}.", "redo the first {r} but {x}",
              "Can you redo the first {r} in {x}?", "The first {r}, but {x}, please.", "Change the first {r} to {x}.", "make the first {r} {x} instead"),
    # several outputs in one message (a, b, c: the parts)
    "multi.2": ("{a} and {b}.", "Can you {a} and {b}?", "Please {a}, and also {b}.", "{a} plus {b}",
                "I'd like you to {a} and then {b}.", "{a}, then {b}.", "Could you {a} and {b}?", "{a} and also {b} please",
                "{a} with {b}.", "First {a}, then {b}.", "{a}, and {b} too.", "{a} & {b}"),
    "multi.3": ("{a}, {b} and {c}.", "Can you {a}, {b} and {c}?", "Please {a}, then {b}, then {c}.", "{a}, {b}, and also {c}"),
    "part.image": ("draw {c}", "make a picture of {c}", "show me {c}", "paint {c}"),
    "part.audio": ("play {c}", "make {c}", "give me {c}", "let me hear {c}"),
    "part.video": ("make a video of {c}", "animate {c}", "make a clip of {c}", "make a short clip of {c}"),
    "said.image": ("a picture of {c}", "an image of {c}", "{c}", "a picture of {c}"),
    "said.audio": ("{c}", "the sound of {c}", "{c}", "{c}"),
    "said.video": ("a video of {c}", "a clip of {c}", "an animation of {c}", "a video of {c}"),
    "multi.made": ("Here is {parts}.", "Sure! Here is {parts}.", "I made {parts}.", "Here you go: {parts}."),
    # questions
    "ask.colour": ("What colour is it?", "Which colour is that?", "What color is it?", "which colour did you use?"),
    "ask.shape": ("What shape is it?", "Which shape is that?", "What shape did you draw?", "what's the shape?"),
    "ask.direction": ("Which way does it move?", "What direction is it going?", "Where does it move?", "which way is it moving?"),
    "ask.pitch": ("How high is the pitch?", "Is it high or low?", "What pitch is it?", "how high is it?"),
    "ask.timbre": ("Is it a beep or a buzz?", "What kind of sound is it?", "Is that a beep or a buzz?", "beep or buzz?"),
    "recall.colour": ("What colour was the first {r}?", "Which colour was the first {r}?", "What color was the first {r}?", "what colour did the first {r} have?",
                      "Remind me, what colour was the first {r}?", "What was the colour of the first {r}?", "The first {r} was which colour?", "do you remember the first {r}'s colour?"),
    "recall.shape": ("What shape was the first {r}?", "Which shape did the first {r} have?", "What was the first {r}'s shape?", "what was the shape of the first {r}?"),
    "recall.pitch": ("How high was the first sound?", "What pitch was the first sound?", "Was the first sound high or low?", "do you remember how high the first sound was?"),
    "recall.direction": ("Which way did the first {r} move?", "What direction did the first {r} go?", "Where did the first {r} move?", "where was the first {r} heading?"),
    "answer.colour": ("It is {x}.", "It's {x}.", "That one is {x}.", "It is {x}."),
    "answer.shape": ("It is a {x}.", "It's a {x}.", "That is a {x}.", "It is a {x}."),
    "answer.direction": ("It moves {x}.", "It is moving {x}.", "It goes {x}.", "It moves {x}."),
    "answer.pitch": ("It is {x}-pitched.", "It's {x}-pitched.", "The pitch is {x}.", "It is {x}-pitched."),
    "answer.timbre": ("It is a {x}.", "It's a {x}.", "That is a {x}.", "It is a {x}."),
    "recalled.colour": ("The first {r} was {x}.", "It was {x}.", "The first one was {x}.", "It was {x}."),
    "recalled.shape": ("The first {r} was a {x}.", "It was a {x}.", "The first one was a {x}.", "It was a {x}."),
    "recalled.pitch": ("The first sound was {x}-pitched.", "It was {x}-pitched.", "The first one was {x}-pitched.", "It was {x}-pitched."),
    "recalled.direction": ("The first {r} moved {x}.", "It moved {x}.", "The first one moved {x}.", "It moved {x}."),
    # inputs
    "describe.ask.image": ("What is in this picture?", "Describe this image.", "What do you see here?", "what's in this picture?",
                           "Can you tell me what this image shows?", "What does this picture show?", "Look at this. What is it?", "describe this"),
    "describe.ask.audio": ("What does this sound like?", "Describe this sound.", "Listen to this. What is it?", "what can you hear in this?",
                           "What kind of sound is this?", "Can you describe what you hear?", "What do you hear?", "tell me about this sound"),
    "describe.ask.video": ("What happens in this video?", "Describe this clip.", "What is moving in this video?", "what's going on in this clip?",
                           "Can you tell me what this video shows?", "What do you see in this clip?", "Watch this. What happens?", "tell me about this video"),
    "described.image": ("It shows {c}.", "This is {c}.", "I see {c}.", "It shows {c}."),
    "described.audio": ("It is {c}.", "This sounds like {c}.", "That is {c}.", "It is {c}."),
    "described.video": ("It shows {c}.", "The clip shows {c}.", "I see {c}.", "It shows {c}."),
    "attach.colour": ("Draw this shape in {x}.", "Make a {x} version of this.", "Can you draw the same shape in {x}?", "paint this shape {x}",
                      "Draw this again but {x}.", "Make this {x}.", "Redraw it in {x}.", "same shape but {x} please"),
    "attach.video": ("Animate this moving {x}.", "Make a video of this shape going {x}.", "Can you make this move {x}?", "animate this going {x}"),
    "attach.pitch": ("Make this sound {x}-pitched.", "Play this at a {x} pitch.", "Can you make a {x}-pitched version of this?", "make this {x}-pitched"),
    "chat": ("Hello!", "Hi there.", "What can you do?", "hi! how are you?",
             "Thanks!", "Who are you?", "Good job.", "hiya",
             "How are you?", "Thank you, that is great.", "Nice.", "hey",
             "Can you explain what a square is?", "Cool, thanks.", "Are you a robot?", "good morning"),
}
# Training-only phrasings (never held out, so the evaluation's wording and random stream stay as
# they were): verbs and habits users bring that the pools above lack ("sketch", "u", "real quick").
W_TRAIN: dict[str, tuple[str, ...]] = {
    "create.image": ("Sketch {c}.", "can you sketch {c}?", "Illustrate {c}.", "I need a drawing of {c}.",
                     "yo draw {c} real quick", "Could you paint me {c}?", "picture of {c} please", "Make me an image with {c}.",
                     "can u draw {c}", "Doodle {c}.", "I want an image of {c}.", "Depict {c}."),
    "create.audio": ("Synthesize {c}.", "I want to hear {c}.", "can u play {c}", "Make a sound: {c}.",
                     "Give me a tone, {c}.", "play {c} real quick", "Could you produce {c} for me?", "Sound {c}, please."),
    "create.video": ("Make a movie of {c}.", "I want a clip of {c}.", "can u animate {c}", "Make an animation of {c}.",
                     "Film {c}.", "a short video of {c} please", "Could you render {c} as a video?", "Video of {c}, please.",
                     # "show me" + a moving thing is a video ("Show me {c}." in W asks for a still one)
                     "Show me {c}.", "can you show me {c}?", "let me see {c}"),
    # a recall that names the only item of its kind without "first" ("what colour was the circle?" after a
    # red circle and a blue triangle); training only, so these intents have no held-out wording in W
    "recall.named.colour": ("What colour was the {r}?", "the {r}, which colour was it?", "do you remember the {r}'s colour?",
                            "what colour did you make the {r}?", "remind me, what colour was the {r}?"),
    "recall.named.direction": ("Which way did the {r} move?", "where was the {r} going?", "do you remember which way the {r} went?"),
    "recall.named.pitch": ("What pitch was the sound?", "how high was that sound?", "remind me, was the sound high, mid or low?"),
    # a still picture brought to life, no direction named (none a paraphrase of the held-out "make it move")
    "to.video": ("Get it moving.", "Set it in motion.", "could you animate that?", "Bring it to life as a clip."),
    # questions about an attachment as users ask them (what a clip shows is the whole description,
    # direction included, whatever the question's words); none a paraphrase of a held-out wording
    # ("what's going on in this clip?", "what can you hear in this?", …) or of training.evaluate's
    "describe.ask.image": ("What does this image contain?", "Explain this picture.", "what am I looking at?",
                           "Can u describe this pic?", "Identify the shape in this image."),
    "describe.ask.audio": ("What is this noise?", "Explain this audio.", "can u describe this audio?",
                           "Identify this tone.", "What is playing here?"),
    "describe.ask.video": ("Explain this video.", "Which thing moves, and which way?", "can u describe this vid?",
                           "what does this clip show?", "Which shape is moving in this clip?", "What is in this video?",
                           "Identify the moving shape and its direction."),
    "part.image": ("sketch {c}", "illustrate {c}", "do a drawing of {c}", "make an image of {c}",
                   "render {c}", "give me a picture of {c}", "create an image of {c}", "put {c} in a picture"),
    "part.audio": ("play me {c}", "make me {c}", "add {c}", "play {c} as well",
                   "I want to hear {c}", "generate {c}", "sound {c}", "produce {c}"),
    "part.video": ("animate me {c}", "make a movie of {c}", "make an animation of {c}", "film {c}",
                   "give me a video of {c}", "render a clip of {c}", "show me a video of {c}", "create a clip of {c}",
                   "show me {c}", "let me see {c}"),
    # three outputs in one message, as users chain them (none of them the held-out ", and also")
    "multi.3": ("{a}, {b}, and {c}.", "{a}, {b}, plus {c}", "I'd like you to {a}, {b} and {c}.", "{a}; {b}; {c}",
                "First {a}, then {b}, and finally {c}.", "Could you {a}, {b}, and {c} please?", "{a}, {b}, as well as {c}",
                "{a}, {b}, and {c} too", "{a} and {b} and {c}", "can u {a}, {b} and {c}"),
    # requests phrased as questions ("could it be yellow?"): an edit, not a question about the output
    "edit.colour": ("could it be {x}?", "can we make it {x}?", "would you make it {x}?", "how about {x}?", "what about {x}?",
                    "can I get it in {x}?", "is it possible to make it {x}?", "Could you make the {r} {x}?", "can the {r} be {x}?",
                    "{x} please", "maybe {x}?", "make it {x} pls"),
    "edit.shape": ("could you turn it into a {x}?", "can we have a {x}?", "would you make it a {x}?", "can I get a {x} instead?",
                   "is a {x} possible?", "can the {r} be a {x}?", "a {x} please", "maybe a {x}?"),
    "edit.size.large": ("could it be bigger?", "can it be larger?", "would you make it bigger?", "is it possible to make it bigger?"),
    "edit.size.small": ("could it be smaller?", "can it be smaller?", "would you make it smaller?", "is it possible to make it smaller?"),
    "edit.position": ("could it be on the {x}?", "can it go on the {x}?", "would you move it to the {x}?", "how about the {x}?"),
    "edit.direction": ("could it move {x}?", "can it go {x} instead?", "would you make it move {x}?", "how about moving {x}?"),
    "edit.pitch": ("could it be {x}-pitched?", "can you do it {x}-pitched?", "would you make it {x}-pitched?", "how about a {x} pitch?"),
    "edit.pitch.up": ("could it be higher?", "can it go higher?", "Take the pitch up.", "can you pitch it up?", "Up a notch.", "Raise it a step."),
    "edit.pitch.down": ("could it be lower?", "can it go lower?", "Take the pitch down.", "can you pitch it down?", "Down a notch.", "Drop it a step."),
    "edit.timbre": ("can it be a {x}?", "would you make it a {x}?", "what about a {x}?", "can I get a {x} instead?"),
    "edit.two": ("could it be {x} and {y}?", "can you do {x} and {y}?"),
    "refer": ("could you make the first {r} {x}?", "can the first {r} be {x}?", "would you redo the first {r} in {x}?"),
    # questions as users type them: terse, "do you recall", "tell me" (none of the held-out wordings)
    # ... and either/or ("red or blue?", o = the true value and another, in random order; not for
    # the timbre, whose only either/or is the held-out "beep or buzz?")
    "ask.colour": ("colour?", "What colour did you make it?", "tell me the colour", "Which colour is it in?", "what colour is that one?",
                   "{o}?", "is it {o}?", "{o}, which one?"),
    "ask.shape": ("shape?", "What kind of shape is that?", "tell me the shape", "Which shape did you use?", "what shape is that one?",
                  "{o}?", "is it {o}?", "{o}, which one?"),
    "ask.direction": ("direction?", "Which direction?", "tell me which way it goes", "Where is it heading?", "which way does that one go?",
                      "{o}?", "does it go {o}?", "{o}, which one?"),
    "ask.pitch": ("pitch?", "Is the pitch high, mid or low?", "tell me the pitch", "How high does it sound?", "what pitch did you use?",
                  "{o}?", "is it {o}?", "{o}, which one?"),
    "ask.timbre": ("timbre?", "Is it beeping or buzzing?", "tell me what kind of sound that is", "Does it beep or buzz?", "What type of sound did you make?"),
    "recall.colour": ("What colour had the first {r}?", "Do you recall the first {r}'s colour?", "the first {r}: what colour was it?",
                      "Tell me the colour of the first {r}.", "first {r} colour?"),
    "recall.shape": ("What shape had the first {r}?", "Do you recall the first {r}'s shape?", "Tell me the shape of the first {r}.", "first {r} shape?"),
    "recall.pitch": ("Do you recall the first sound's pitch?", "What was the pitch of the first sound?", "Tell me how high the first sound was.",
                     "first sound: high, mid or low?", "How high did the first sound go?"),
    "recall.direction": ("Which way was the first {r} going?", "Do you recall where the first {r} moved?", "Tell me the direction of the first {r}.",
                         "first {r} direction?"),
}

# An edit of the last output and a new output in one message (a = the edit, b = the new part, p = the
# edit's end: "?" or "."); the training's none of the held-out ones (nor "{a} plus {b}", ", and also")
EDIT_PLUS_JOIN = ("{a}, and {b}", "{a} and {b} too", "{a}{p} Also {b}.", "{a}, then {b}", "{a}; and {b}",
                  "{a}, and then {b}", "{a}{p} And {b} as well.", "{a}, and can you {b}")
EDIT_PLUS_HELD = ("{a}, and also {b}", "{a}, plus {b}", "{a}{p} Oh, and {b} please.")  # the evaluation's ("edit-plus")


CHAT_REPLY = {
    "Hello!": "Hello! I can describe pictures, sounds and videos of simple shapes, and make new ones.",
    "Hi there.": "Hi! Give me an image, a sound or a video, or ask me to create one.",
    "What can you do?": "I can tell you what is in an image, a sound or a video, and I can draw shapes, make beeps and buzzes, and animate moving shapes.",
    "hi! how are you?": "I'm doing well, thanks! What would you like me to make?",
    "Thanks!": "You're welcome.",
    "Who are you?": "I am a small assistant that understands and creates images, sounds and videos of coloured shapes.",
    "Good job.": "Thank you!",
    "hello": "Hello! What would you like to see or hear?",
    "How are you?": "I'm fine, thank you. What can I make for you?",
    "Thank you, that is great.": "Glad you like it!",
    "Nice.": "Thanks!",
    "hey": "Hey! Ask me for a picture, a sound or a video.",
    "Can you explain what a square is?": "A square is a shape with four equal sides and four right angles.",
    "Cool, thanks.": "You're welcome!",
    "Are you a robot?": "I am an AI assistant. I can see, hear, draw, animate and make sounds.",
    "good morning": "Good morning! What shall I make today?",
    "hiya": "Hi! What would you like me to draw, play or animate?",
}
CREATE_KEYS = {  # which attributes a create request names (colour+shape / pitch+timbre / +direction always)
    "image": (("colour", "shape"), ("size", "colour", "shape"), ("colour", "shape", "position"), ("size", "colour", "shape", "position")),
    "audio": (("pitch", "timbre"),),
    "video": (("colour", "shape", "direction"),),
}
PITCH_ORDER = ("low", "mid", "high")


def mention(spec: Spec, keys) -> str:
    """The words naming `spec` by the attributes in `keys`: "a large blue circle on the left"."""
    a = spec.attributes()
    if isinstance(spec, ImageSpec):
        size = f"{a['size']} " if "size" in keys else ""
        pos = f" on the {a['position']}" if "position" in keys else ""
        return fill("a {s}{colour} {shape}{p}".replace("{s}", size).replace("{p}", pos), a)
    if isinstance(spec, AudioSpec):
        return fill("a {pitch}-pitched {timbre}", a)
    return fill("a {colour} {shape} moving {direction}", a)


@dataclass
class Item:
    """Something the conversation has shown: an input or an output, and the attributes it named."""

    spec: Spec
    keys: tuple[str, ...]
    output: bool

    @property
    def words(self) -> str:
        return mention(self.spec, self.keys)


@dataclass
class Writer:
    """Samples wordings (train / eval pools) and user habits."""

    rng: np.random.Generator
    wording: str = "train"
    three: float = THREE
    turns: list[dict[str, Any]] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)

    def pick(self, options):
        options = list(options)
        return options[int(self.rng.integers(len(options)))]

    def say(self, intent: str, user: bool = True, **kw) -> str:
        pool = W.get(intent, ())
        if self.wording == "eval" and intent not in W:
            raise ValueError(f"{intent!r} is a training-only intent; the evaluation has no wording for it")
        if user:
            held = [t for i, t in enumerate(pool) if i % 4 == 3]
            pool = held if self.wording == "eval" else [t for i, t in enumerate(pool) if i % 4 != 3] + list(W_TRAIN.get(intent, ()))
        text = self.pick(pool).format(**kw)
        text = text[0].upper() + text[1:] if not user else text
        if user and self.rng.random() < 0.25:  # users' habits
            text = text.rstrip(".") if self.rng.random() < 0.5 else text.lower()
        return text

    def said(self, item: Item) -> str:
        """How a reply names one of several outputs, mid-sentence: "a picture of a red circle"."""
        text = self.say(f"said.{item.spec.modality}", user=False, c=item.words)
        return text[0].lower() + text[1:]

    def other(self, options, current):
        return self.pick([o for o in options if o != current])

    def step(self, pitch: str) -> str:
        """One step up or down PITCH_ORDER from `pitch` (mid: either way)."""
        i = PITCH_ORDER.index(pitch)
        return PITCH_ORDER[self.pick([j for j in (i - 1, i + 1) if 0 <= j < len(PITCH_ORDER)])]

    # ---------------------------------------------------------------- exchanges
    def exchange(self, kind: str, human: str, gpt: str, *, inputs=(), outputs=(), captions=(), extra=None) -> None:
        h: dict[str, Any] = {"from": "human", "value": human, "kind": kind}
        if inputs:
            h["inputs"] = list(inputs)
        g: dict[str, Any] = {"from": "gpt", "value": gpt, "kind": kind}
        if outputs:
            g["outputs"], g["captions"] = list(outputs), list(captions)
        if extra:
            g.update(extra)
        self.turns += [h, g]

    def create(self, modality: str | None = None, kind: str = "create") -> Item:
        m = modality or self.pick(("image", "audio", "video"))
        spec = sample_spec(m, self.rng)
        item = Item(spec, self.pick(CREATE_KEYS[m]), True)
        c = item.words
        self.exchange(kind, self.say(f"create.{m}", c=c), self.say(f"made.{m}", user=False, c=c), outputs=[spec], captions=[c])
        self.items.append(item)
        return item

    def describe(self, modality: str | None = None) -> Item:
        m = modality or self.pick(("image", "audio", "video"))
        spec = sample_spec(m, self.rng)
        item = Item(spec, ATTRIBUTE_KEYS[spec.modality], False)
        self.exchange("describe", self.say(f"describe.ask.{m}"), self.say(f"described.{m}", user=False, c=item.words), inputs=[spec])
        self.items.append(item)
        return item

    def chat(self) -> None:
        q = self.say("chat")
        key = next((k for k in CHAT_REPLY if k.lower().rstrip(".!?") == q.lower().rstrip(".!?")), None)
        self.exchange("chat", q, CHAT_REPLY[key])

    def edit(self, item: Item | None = None, refer: str | None = None, plus: bool | None = None, relative: bool = False) -> Item:
        """Change one attribute of `item` (default: the last output) into a new output; sometimes two
        at once ("make it blue and bigger"). `plus`: the message also asks for a new output ("…, and
        also play a low buzz"; default: sometimes, in training wording only). `relative`: `item` is a
        sound and the edit is "higher" / "lower", one step of PITCH_ORDER."""
        item = item or self.last_output()
        spec, keys = item.spec, item.keys
        options = {ImageSpec: ("colour", "colour", "shape", "shape", "size", "position"),
                   VideoSpec: ("colour", "shape", "direction", "direction"), AudioSpec: ("pitch", "pitch", "timbre")}[type(spec)]  # fmt: skip
        what = "colour" if refer is not None else "pitch" if relative else self.pick(options)
        whats = [what]
        if refer is None and not relative and self.rng.random() < TWO_CHANGES[self.wording]:
            whats.append(self.other(sorted(set(options)), what))
        new, new_keys = spec, keys
        for w in whats:
            new = replace(new, **{w: self.step(spec.pitch) if relative else self.other(VOCABULARY[w], getattr(spec, w))})
            if w not in new_keys:
                new_keys = tuple(k for k in ("size", "colour", "shape", "position") if k in new_keys or k == w)
        x = getattr(new, what)
        if refer is not None:
            request = self.say("refer", r=refer, x=x)
        elif len(whats) == 2:
            request = self.say("edit.two", x=_change_words(whats[0], new), y=_change_words(whats[1], new))
        elif what == "size":
            request = self.say(f"edit.size.{x}")
        elif what == "pitch" and (relative or self.rng.random() < 0.4) and abs(PITCH_ORDER.index(x) - PITCH_ORDER.index(spec.pitch)) == 1:
            request = self.say("edit.pitch.up" if PITCH_ORDER.index(x) > PITCH_ORDER.index(spec.pitch) else "edit.pitch.down")
        else:
            request = self.say(f"edit.{what}", x=x, r=_referent(item))
        out = Item(new, new_keys, True)
        d = " and ".join(_change_words(w, new, said=True) for w in whats)
        reply, outs = self.say("edited", user=False, d=d, c=out.words), [out]
        # an edit and a new output in one message, "make it smaller, and also play a low buzz" (unasked,
        # training wording only: the evaluation's random stream stays as it was); the edited output's
        # signal group right after the words naming it, the new one's at the end (as in several-outputs replies)
        if plus is None:
            plus = self.wording != "eval" and refer is None and len(whats) == 1 and self.rng.random() < EDIT_PLUS
        if plus:
            m = self.pick(("image", "audio", "video"))
            more = Item(sample_spec(m, self.rng), self.pick(CREATE_KEYS[m]), True)
            join = self.pick(EDIT_PLUS_HELD if self.wording == "eval" else EDIT_PLUS_JOIN)
            request = join.format(a=request.rstrip(".!?"), b=self.say(f"part.{m}", c=more.words), p="?" if request.endswith("?") else ".")
            reply = f"{reply.rstrip('.')} <{new.modality}> and {self.said(more)}. <{m}>"
            outs.append(more)
        self.exchange("refer" if refer else "edit", request, reply, outputs=[o.spec for o in outs], captions=[o.words for o in outs],
                      extra={"changed": whats[0] if len(whats) == 1 else whats})  # fmt: skip
        self.items += outs
        return out

    def convert(self) -> Item:
        item = self.last_visual()
        spec = item.spec
        extra = None
        if isinstance(spec, ImageSpec):
            d = self.pick(DIRECTIONS)
            new, keys, request = VideoSpec(spec.shape, spec.colour, d), ("colour", "shape", "direction"), self.say("to.video", x=d)
            if not re.search(rf"\b{d}\b", request.lower()):  # "make it move": any direction answers it; the
                extra = {"scored": ["colour", "shape"]}  # reply names one, and the kept colour+shape are what is asked
        else:
            new, keys, request = ImageSpec(spec.shape, spec.colour, "large", "center"), ("colour", "shape"), self.say("to.image")
        out = Item(new, keys, True)
        self.exchange("convert", request, self.say(f"converted.{new.modality}", user=False, c=out.words), outputs=[new], captions=[out.words],
                      extra=extra)  # fmt: skip
        self.items.append(out)
        return out

    def multi(self, k: int | None = None) -> list[Item]:
        k = k or (2 if self.rng.random() < 1 - self.three else 3)
        modalities = list(self.rng.permutation(["image", "audio", "video"])[:k])
        if k == 2 and self.rng.random() < 0.15:  # two of the same kind: "draw a red circle and a blue square"
            modalities[1] = modalities[0]
        items = []
        for m in modalities:
            spec = sample_spec(m, self.rng)
            items.append(Item(spec, self.pick(CREATE_KEYS[m]), True))
        parts = [self.say(f"part.{it.spec.modality}", c=it.words) for it in items]
        request = self.say(f"multi.{k}", a=parts[0], b=parts[1], c=parts[2] if k == 3 else "")
        request = request[0].upper() + request[1:] if self.rng.random() < 0.7 else request
        said = [self.said(it) for it in items]
        # each output's signal group right after the words that name it (the last one at the end of
        # the reply, as in single replies), so the second group follows words that ask for it
        said = [x + f" <{it.spec.modality}>" for x, it in zip(said[:-1], items)] + said[-1:]
        joined = said[0] + " and " + said[1] if k == 2 else f"{said[0]}, {said[1]} and {said[2]}"
        made = self.say("multi.made", user=False, parts=joined) + f" <{items[-1].spec.modality}>"
        self.exchange("multi", request, made,
                      outputs=[it.spec for it in items], captions=[it.words for it in items])  # fmt: skip
        self.items += items
        return items

    def ask(self) -> None:
        item = self.last_output()
        key = self.pick({"image": ("colour", "shape"), "video": ("colour", "direction"), "audio": ("pitch", "timbre")}[item.spec.modality])
        x = getattr(item.spec, key)
        o = ""
        if self.wording != "eval":  # the evaluation's random stream stays as it was
            o = " or ".join(self.rng.permutation([x, self.other(VOCABULARY[key], x)]))
        self.exchange("ask", self.say(f"ask.{key}", o=o), self.say(f"answer.{key}", user=False, x=x), extra={"answer": {key: x}})

    def recall(self) -> bool:
        """A question about the FIRST item of a kind named in the conversation; False when there is none."""
        kinds = {}
        for it in self.items:
            r = _referent(it)
            kinds.setdefault(r, it)
        if not kinds:
            return False
        r, item = self.pick(list(kinds.items()))
        key = self.pick({"image": ("colour", "shape"), "video": ("colour", "direction"), "audio": ("pitch",)}[item.spec.modality])
        if key == "shape":
            r = NOUN["image"]
        x = getattr(item.spec, key)
        named = (self.wording != "eval" and key != "shape" and sum(_referent(it) == r for it in self.items) == 1
                 and self.rng.random() < RECALL_NAMED)  # (the evaluation's stream stays as it was)
        self.exchange("recall", self.say(f"recall.named.{key}" if named else f"recall.{key}", r=r), self.say(f"recalled.{key}", user=False, r=r, x=x), extra={"answer": {key: x}})
        return True

    def refer(self) -> Item | None:
        """Edit the first output of a kind when a later output exists (else None)."""
        outs = [it for it in self.items if it.output and it.spec.modality != "audio"]
        if len(outs) < 2:
            return None
        first = outs[0]
        r = _referent(first)
        if self.wording != "eval" and self.rng.random() < REFER_BY_KIND:  # (the evaluation's stream stays as it was)
            before = self.items[: self.items.index(first)]
            names = [] if any(it.spec.modality == first.spec.modality for it in before) else [NOUN[first.spec.modality]]  # the first of its kind
            if not before:
                names += ["one", "one"]  # "the first one" only when nothing came before it
            r = self.pick(names or [r])
        return self.edit(first, refer=r)

    def attach(self) -> Item:
        m = self.pick(("image", "image", "video", "audio"))
        spec = sample_spec(m, self.rng)
        if m == "image" and self.rng.random() < 0.7:
            x = self.other(tuple(COLOURS), spec.colour)
            new, keys, request = ImageSpec(spec.shape, x, spec.size, spec.position), ("colour", "shape"), self.say("attach.colour", x=x)
        elif m in ("image", "video"):
            d = self.pick(DIRECTIONS)
            new, keys, request = VideoSpec(spec.shape, spec.colour, d), ("colour", "shape", "direction"), self.say("attach.video", x=d)
        else:
            x = self.other(tuple(PITCHES), spec.pitch)
            new, keys, request = replace(spec, pitch=x), ("pitch", "timbre"), self.say("attach.pitch", x=x)
        out = Item(new, keys, True)
        self.items.append(Item(spec, ATTRIBUTE_KEYS[spec.modality], False))
        self.exchange("attach", request, self.say(f"made.{new.modality}", user=False, c=out.words), inputs=[spec], outputs=[new], captions=[out.words])
        self.items.append(out)
        return out

    # ---------------------------------------------------------------- state
    def last_output(self) -> Item:
        return next(it for it in reversed(self.items) if it.output)

    def last_visual(self) -> Item:
        return next(it for it in reversed(self.items) if it.output and it.spec.modality != "audio")


def _change_words(what: str, spec: Spec, said: bool = False) -> str:
    """How a request (or, `said`, a reply) names the new value of one attribute: "blue", "a triangle",
    "bigger" / "large", "on the left", "moving up", "high-pitched", "a buzz"."""
    x = getattr(spec, what)
    if what == "size":
        return x if said else {"large": "bigger", "small": "smaller"}[x]
    return {"colour": x, "shape": f"a {x}", "position": f"on the {x}", "direction": f"moving {x}",
            "pitch": f"{x}-pitched", "timbre": f"a {x}"}[what]  # fmt: skip


def _referent(item: Item) -> str:
    """How a user names an earlier item: its shape ("circle") or "sound"."""
    return "sound" if isinstance(item.spec, AudioSpec) else item.spec.shape


# ------------------------------------------------------------------------------------ scenarios


def _setup(w: Writer, scenario: str) -> None:
    """The context exchanges a scenario needs, with a few others around them."""
    needs_output = scenario in ("edit", "edit-plus", "ask")
    needs_visual = scenario == "convert"
    for _ in range(int(w.rng.integers(0, 3))):  # unrelated context first, sometimes
        r = w.rng.random()
        if r < 0.35:
            w.chat()
        elif r < 0.65:
            w.create()
        elif r < 0.85:
            w.describe()
        elif w.items and any(it.output for it in w.items):
            w.edit()
        else:
            w.chat()
    if scenario in PITCH_SCENARIOS:
        w.create("audio")
    elif scenario == "refer":
        m = w.pick(("image", "video"))
        w.create(m)
        for _ in range(int(w.rng.integers(1, 3))):
            w.edit() if w.rng.random() < 0.7 else w.create(m)
    elif scenario == "recall":
        if not w.items or w.rng.random() < 0.7:
            w.create()
        for _ in range(int(w.rng.integers(1, 3))):
            w.edit() if w.rng.random() < 0.6 and any(it.output for it in w.items) else w.chat()
    elif scenario == "chat-create":
        for _ in range(int(w.rng.integers(1, 3))):
            w.chat()
    elif needs_visual:
        if not any(it.output and it.spec.modality != "audio" for it in w.items) or w.rng.random() < 0.5:
            w.create(w.pick(("image", "video")))
    elif needs_output:
        if not any(it.output for it in w.items) or w.rng.random() < 0.5:
            w.create()


def _scenario(w: Writer, scenario: str) -> None:
    if scenario == "edit":
        w.edit()
    elif scenario == "edit-plus":
        w.edit(plus=True)
    elif scenario == "edit-pitch":
        w.edit(relative=True)
    elif scenario == "edit-pitch-plus":
        w.edit(relative=True, plus=True)
    elif scenario == "convert":
        w.convert()
    elif scenario == "refer":
        if w.refer() is None:
            raise AssertionError("refer set-up made no second output")
    elif scenario == "multi":
        w.multi()
    elif scenario == "chat-create":
        w.create(kind="chat-create")
    elif scenario == "recall":
        w.recall()
    elif scenario == "ask":
        w.ask()
    elif scenario == "attach":
        w.attach()
    else:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(TRAIN_SCENARIOS)}")


def sample_conversation(rng: np.random.Generator, scenario: str, wording: str = "train", follow: bool = False,
                        three: float = THREE) -> list[dict[str, Any]]:
    """One conversation ending with `scenario`'s exchange (`follow`: one more ordinary exchange after it;
    `three`: how often a several-outputs request asks for three)."""
    w = Writer(rng, wording, three)
    _setup(w, scenario)
    _scenario(w, scenario)
    if follow:
        r = rng.random()
        w.edit() if r < 0.4 and any(it.output for it in w.items) else w.chat() if r < 0.7 else w.create()
    return w.turns


def sample_conversations(n: int, seed: int, *, wording: str = "train", scenarios=SCENARIOS, three: float = THREE) -> list[list[dict[str, Any]]]:
    """n training conversations ending with the `scenarios` in turn (every scenario equally often by
    default; name one several times to weight it); a third go on for one more exchange. `three`: how
    often a several-outputs request asks for three outputs rather than two."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM[wording]]))
    return [sample_conversation(rng, scenarios[i % len(scenarios)], wording, follow=rng.random() < 0.33, three=three)
            for i in range(int(n))]


def sample_scenarios(scenario: str, n: int, seed: int, *, wording: str = "eval") -> list[list[dict[str, Any]]]:
    """n conversations ending with `scenario` (the evaluation scores the last exchange)."""
    if scenario not in EVAL_SCENARIOS:
        raise ValueError(f"{scenario!r} is not an evaluation scenario; expected one of {', '.join(EVAL_SCENARIOS)}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM[wording], EVAL_SCENARIOS.index(scenario)]))
    return [sample_conversation(rng, scenario, wording) for _ in range(int(n))]
