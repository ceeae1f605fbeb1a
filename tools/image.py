"""Image decoder: StableDiffusionPipeline (SD 1.5 in NExT-GPT) → PNG."""

from __future__ import annotations

import io
from typing import Any

from tools.base import DecoderTool, MediaOutput, to_uint8, write_bytes_addressed


def png_bytes(rgb) -> bytes:
    """uint8 (H, W, 3) → PNG bytes; no metadata chunks, so equal pixels give equal bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


class ImageTool(DecoderTool):
    """`prompt_embeds` (B, Q, D) — CLIP text-encoder states, (1, 77, 768) for SD 1.5 — → PNGs.

    Size overrides: `height`, `width` (multiples of 8; default from the config, else the UNet's).

    Safety: a pipeline that ships a safety checker (SD 1.5 does) keeps it unless the config says
    `safety_checker: false` (then it is not even loaded). The tool takes it out of the pipeline
    and runs it itself after each call (`_unsafe_rows`), so that one call can skip it (a Discord
    server that turned it off) and a flagged image is withheld rather than written black.
    """

    modality = "image"
    pipeline_class_name = "StableDiffusionPipeline"
    extension = "png"
    mime = "image/png"
    size_keys = ("height", "width")
    safety_checker = None  # the pipeline's StableDiffusionSafetyChecker, when it ships one
    feature_extractor = None  # its CLIPImageProcessor

    def _load_kwargs(self) -> dict[str, Any]:
        return {} if self.cfg.safety_checker else {"safety_checker": None, "requires_safety_checker": False}

    def _loaded(self, pipe) -> None:
        self.safety_checker = getattr(pipe, "safety_checker", None)
        self.feature_extractor = getattr(pipe, "feature_extractor", None)
        if self.safety_checker is not None:
            if self.feature_extractor is None:
                raise ValueError(f"{self.cfg.source}: the pipeline has a safety checker but no feature_extractor to feed it")
            pipe.safety_checker = None  # run by _unsafe_rows, per call

    def _unsafe_rows(self, rows) -> list[int]:
        import numpy as np
        import torch
        from diffusers.image_processor import VaeImageProcessor

        if self.safety_checker is None:
            return []
        images = np.stack(rows).astype(np.float32)  # (B, H, W, 3) in [0, 1]
        device = self._pipe.unet.device
        checker = self.safety_checker.to(device)
        try:
            clip = self.feature_extractor(VaeImageProcessor.numpy_to_pil(images), return_tensors="pt").pixel_values
            with torch.inference_mode():
                _, flags = checker(images=images.copy(), clip_input=clip.to(device, checker.dtype))
        finally:
            if self.cfg.offload:
                checker.to("cpu")
        return [i for i, flagged in enumerate(flags) if flagged]

    def _embed_dim(self, pipe) -> int:
        return int(pipe.unet.config.cross_attention_dim)

    def _resolve_sizes(self, sizes: dict[str, Any]) -> dict[str, Any]:
        pipe = self.load()
        default = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        out = {
            "height": int(sizes.get("height") or self.cfg.height or default),
            "width": int(sizes.get("width") or self.cfg.width or default),
        }
        for k, v in out.items():
            if v < 8 or v % 8:
                raise ValueError(f"{k} must be a positive multiple of 8, got {v}")
        return out

    def _generate(self, pipe, embeds, negative, *, generator, steps, guidance, sizes, progress) -> list:
        result = pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            height=sizes["height"],
            width=sizes["width"],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="np",
            **progress,
        )
        return list(result.images)  # B × (H, W, 3) float in [0, 1]

    def _write(self, row, sizes: dict[str, Any], meta: dict[str, Any]) -> MediaOutput:
        rgb = to_uint8(row)
        path, sha = write_bytes_addressed(png_bytes(rgb), self.output_dir, self.extension)
        return MediaOutput(
            modality=self.modality,
            path=path,
            mime=self.mime,
            sha256=sha,
            width=int(rgb.shape[1]),
            height=int(rgb.shape[0]),
            **meta,
        )
