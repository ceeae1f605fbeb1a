"""The training wing: everything that makes weights, apart from the runtime that uses them.

- `training.world`     the shapes world: specs, rendering, captions, pair data, MosIT dialogs and
                       multi-turn conversations, the attribute analyzer, and the ImageBind-small
                       encoder trainer (`training.world.encoder_train`)
- `training.trainer`   NExT-GPT training: data files, dialog encoding, projector targets, the
                       stage trainer (`Trainer`), export to the official checkpoint layout
- `training.decoders`  the shapes-world diffusion decoders: building, data, training, evaluation
- `training.stages`    the stage driver (`nextgpt train --stage 1|2|3`, `python -m training.stages`)
- `training.small`     the small profile's recipe (`make train-small`, `python -m training.small`)
- `training.evaluate`  per-direction and conversation evaluation (`nextgpt eval`)
- `training.cli`       `nextgpt train|eval ...` and `nextgpt export --official`

Arrows point one way: the wing imports the runtime (`nextgpt`, `tools`, `assistant`, `bots`,
`memory`); the runtime imports nothing from here (tests/test_layers.py). What inference needs
(e.g. the vocoder class the audio weights name, `tools.world.vocoder`) lives in the runtime.
Importing this package imports nothing heavy.
"""
