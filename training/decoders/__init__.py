"""The `small` profile's diffusion decoders, trained on the shapes world (training.world).

- `training.decoders.build`    tokenizers, text encoders, VAEs, UNets, schedulers, pipeline assembly
- `training.decoders.data`     the world's samples and captions as training data
- `training.decoders.train`    resumable, seeded training; `python -m training.decoders train [--smoke]`
- `training.decoders.evaluate` generation through the decoder tools, scored by the world's analyzer;
                               `python -m training.decoders eval`

Trained pipelines live in weights/small/{image,audio,video} (model card: weights/small/DECODERS.md).
The audio pipeline's vocoder slot holds `tools.world.vocoder.GriffinLimVocoder`, which stays in the
runtime (the weights name that class). Importing this package imports nothing heavy.
"""
