"""What the runtime needs to load the `small` profile's shapes-world decoders.

- `tools.world.vocoder`  GriffinLimVocoder: AudioLDMPipeline's vocoder slot, no learned weights

The decoders are built and trained by the training wing (`training.decoders`); the pipelines live
in weights/small/{image,audio,video} (model card: weights/small/DECODERS.md). Importing this package
imports nothing heavy; loading the audio pipeline needs `tools.world.vocoder` imported first
(diffusers imports no module a model_index.json names).
"""
