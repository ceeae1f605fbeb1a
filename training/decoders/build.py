"""The world decoders' components and their assembly into diffusers pipelines (offline, seeded).

Same classes and wiring as the NExT-GPT decoders, at shapes-world size:

- image  StableDiffusionPipeline: word-level CLIPTokenizer (max length 16), CLIPTextModel
         (64-d, 2 layers), AutoencoderKL 64×64×3 → 16×16×4 (3 blocks, f = 4), UNet2DConditionModel
         over 16×16×4 latents with cross-attention on the text states, DDIM (trailing, v-prediction).
- video  TextToVideoSDPipeline: the same tokenizer, text encoder and VAE (it is trained on 64-px
         images and 32-px video frames), UNet3DConditionModel over 8 frames × 8×8×4 latents
         (32×32 frames), DDIM.
- audio  AudioLDMPipeline: word-level RobertaTokenizer, ClapTextModelWithProjection (64-d pooled,
         L2-normalised: AudioLDM's class-embedding conditioning), AutoencoderKL over 64-bin log-mel
         spectrograms (f = 4), UNet2DConditionModel with `class_embed_type="simple_projection"`
         and no attention, and `GriffinLimVocoder` (tools/world/vocoder.py) in the vocoder slot.

The tokenizers are byte-level BPE whose merges are learned (deterministically, in a second) on the
world's captions: every word of the world is one token and any other text still tokenizes. `Arch` holds every size; `SMOKE` is
the seconds-long variant CI trains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

EMBED_DIM = 64  # text-encoder width = UNet cross-attention / class-embedding input
MAX_LENGTH = 16  # tokenizer model_max_length: image/video prompt_embeds are (B, 16, 64)
SAMPLE_RATE = 16000
HOP = 256  # samples per mel frame
N_MELS = 64


@dataclass(frozen=True)
class Arch:
    """Every size of the world decoders (the trained recipe is `FULL`)."""

    embed_dim: int = EMBED_DIM
    max_length: int = MAX_LENGTH
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 128
    image_side: int = 64
    video_side: int = 32
    video_frames: int = 8
    vae_channels: tuple[int, ...] = (32, 32, 64)  # three blocks: latents are side / 4
    vae_latent: int = 4
    image_unet: tuple[int, ...] = (32, 64, 64)
    video_unet: tuple[int, ...] = (32, 64)
    audio_unet: tuple[int, ...] = (32, 64, 64)
    audio_vae_channels: tuple[int, ...] = (16, 32, 32)
    norm_groups: int = 8
    head_dim: int = 8
    mel_frames: int = 64  # training crop: 64 frames × 256 samples = 1.024 s


FULL = Arch()
SMOKE = Arch(
    text_layers=1,
    text_ffn=64,
    vae_channels=(8, 8, 16),
    audio_vae_channels=(8, 8, 16),
    image_unet=(16, 16, 32),
    video_unet=(16, 16),
    audio_unet=(16, 16, 32),
    norm_groups=4,
)


def arch_from_dict(d: dict) -> Arch:
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in Arch.__dataclass_fields__}
    return Arch(**d)


def arch_dict(arch: Arch) -> dict:
    return asdict(arch)


# ---- tokenizers ----------------------------------------------------------------------------------


def bpe_merges(tokenizer, texts: list[str], suffix: str = "") -> list[tuple[str, str]]:
    """Byte-level BPE merges learned on `texts` until every word is one symbol, deterministically
    (most frequent pair first, ties broken by the pair's spelling). Words are split by the
    tokenizer's own normaliser and pre-tokeniser; `suffix` ("</w>" for CLIP) marks a word's end."""
    from collections import Counter

    backend = tokenizer.backend_tokenizer
    counts: Counter = Counter()
    for text in texts:
        norm = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(norm):
            counts[word] += 1
    symbols = {w: list(w[:-1]) + [w[-1] + suffix] for w in counts if w}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for w, syms in symbols.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, syms in symbols.items():
            i, out = 0, []
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            symbols[w] = out


def _with_merges(base, merges: list[tuple[str, str]], max_length: int):
    vocab = dict(base.get_vocab())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return type(base)(vocab=vocab, merges=[(a, b) for a, b in merges], model_max_length=max_length)


def clip_tokenizer(max_length: int = MAX_LENGTH):
    """CLIPTokenizer (byte-level BPE, `</w>` word ends) whose merges make each world word a token;
    any other text still tokenizes (into pieces, down to bytes). Deterministic: same files every build."""
    from tools.tiny import clip_tokenizer as base_clip
    from training.decoders.data import corpus

    base = base_clip()
    return _with_merges(base, bpe_merges(base, corpus(), "</w>"), max_length)


def roberta_tokenizer(max_length: int = MAX_LENGTH):
    """RobertaTokenizer (CLAP's) built the same way."""
    from tools.tiny import roberta_tokenizer as base_roberta
    from training.decoders.data import corpus

    base = base_roberta()
    return _with_merges(base, bpe_merges(base, corpus()), max_length)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (16 hex) of a tokenizer's vocabulary and merges: stages trained on text record it."""
    import hashlib
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    blob = json.dumps([sorted(model["vocab"].items()), model.get("merges")], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- text encoders -------------------------------------------------------------------------------


def clip_text_encoder(tokenizer, arch: Arch = FULL):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=arch.embed_dim,
        intermediate_size=arch.text_ffn,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.max_length,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=arch.embed_dim,
    )
    return CLIPTextModel(config)


def clap_text_encoder(tokenizer, arch: Arch = FULL):
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    vocab = tokenizer.get_vocab()
    return ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=len(vocab),
            hidden_size=arch.embed_dim,
            intermediate_size=arch.text_ffn,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=arch.max_length + 4,  # RoBERTa positions start after pad_token_id
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            projection_dim=arch.embed_dim,
        )
    )


# ---- VAEs, UNets, schedulers ---------------------------------------------------------------------


def vae(arch: Arch = FULL, *, audio: bool = False):
    from diffusers import AutoencoderKL

    channels = arch.audio_vae_channels if audio else arch.vae_channels
    n = len(channels)
    return AutoencoderKL(
        in_channels=1 if audio else 3,
        out_channels=1 if audio else 3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=arch.vae_latent,
        norm_num_groups=arch.norm_groups,
        sample_size=arch.mel_frames if audio else arch.image_side,
        mid_block_add_attention=False,
    )


def image_unet(arch: Arch = FULL):
    from diffusers import UNet2DConditionModel

    n = len(arch.image_unet)
    return UNet2DConditionModel(
        sample_size=arch.image_side // 4,
        in_channels=arch.vae_latent,
        out_channels=arch.vae_latent,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=arch.image_unet,
        layers_per_block=1,
        norm_num_groups=arch.norm_groups,
        cross_attention_dim=arch.embed_dim,
        attention_head_dim=arch.head_dim,
    )


def video_unet(arch: Arch = FULL):
    from diffusers import UNet3DConditionModel

    n = len(arch.video_unet)
    unet = UNet3DConditionModel(
        sample_size=arch.video_side // 4,
        in_channels=arch.vae_latent,
        out_channels=arch.vae_latent,
        down_block_types=("DownBlock3D",) + ("CrossAttnDownBlock3D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock3D",) * (n - 1) + ("UpBlock3D",),
        block_out_channels=arch.video_unet,
        layers_per_block=1,
        norm_num_groups=arch.norm_groups,
        cross_attention_dim=arch.embed_dim,
        attention_head_dim=arch.head_dim,
    )
    no_dropout(unet)
    return unet


def audio_unet(arch: Arch = FULL):
    """AudioLDM's UNet: the pooled text embedding enters as a class embedding concatenated to the
    time embedding; no cross-attention (AudioLDM passes no encoder states). No attention at all:
    the world's sounds are steady tones, rows of a spectrogram, which convolutions draw."""
    from diffusers import UNet2DConditionModel

    n = len(arch.audio_unet)
    return UNet2DConditionModel(
        sample_size=arch.mel_frames // 4,
        in_channels=arch.vae_latent,
        out_channels=arch.vae_latent,
        down_block_types=("DownBlock2D",) * n,
        mid_block_type="UNetMidBlock2D",
        up_block_types=("UpBlock2D",) * n,
        block_out_channels=arch.audio_unet,
        layers_per_block=1,
        norm_num_groups=arch.norm_groups,
        cross_attention_dim=arch.audio_unet[-1],
        attention_head_dim=arch.head_dim,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=arch.embed_dim,
        class_embeddings_concat=True,
    )


def no_dropout(module: torch.nn.Module) -> None:
    """UNet3D's temporal convolutions carry dropout 0.1: off (tiny data, short training)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def vocoder():
    from tools.world.vocoder import GriffinLimVocoder

    return GriffinLimVocoder(model_in_dim=N_MELS, sampling_rate=SAMPLE_RATE, upsample_rates=(HOP,))


NOISE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction")


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NOISE, clip_sample=False)


def sample_scheduler():
    """DDIM with trailing spacing: the first step starts at t = 999 (pure noise, as trained)."""
    from diffusers import DDIMScheduler

    # steps_offset only shifts "leading" spacing; 1 because StableDiffusionPipeline rewrites any other value
    return DDIMScheduler(**NOISE, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=1)


# ---- pipelines -----------------------------------------------------------------------------------


@dataclass
class Parts:
    """What a pipeline is assembled from (any may be None until trained)."""

    tokenizer: object = None
    text_encoder: object = None
    vae: object = None
    unet: object = None
    vocoder: object = None
    extra: dict = field(default_factory=dict)


def pipeline(modality: str, parts: Parts):
    from diffusers import AudioLDMPipeline, StableDiffusionPipeline, TextToVideoSDPipeline

    for m in (parts.text_encoder, parts.vae, parts.unet):
        m.eval()
    if modality == "image":
        pipe = StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.unet,
            scheduler=sample_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    elif modality == "video":
        pipe = TextToVideoSDPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet, scheduler=sample_scheduler()
        )
    elif modality == "audio":
        pipe = AudioLDMPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.unet,
            scheduler=sample_scheduler(),
            vocoder=parts.vocoder if parts.vocoder is not None else vocoder(),
        )
    else:
        raise ValueError(f"modality must be image, video or audio, got {modality!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def half_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float16 copy (for saving: halves the files; `from_pretrained(torch_dtype=float32)` upcasts)."""
    import copy

    return copy.deepcopy(module).to(torch.float16)


__all__ = [
    "Arch",
    "EMBED_DIM",
    "FULL",
    "MAX_LENGTH",
    "Parts",
    "SMOKE",
    "audio_unet",
    "clap_text_encoder",
    "clip_text_encoder",
    "clip_tokenizer",
    "image_unet",
    "pipeline",
    "replace",
    "roberta_tokenizer",
    "sample_scheduler",
    "train_scheduler",
    "vae",
    "video_unet",
    "vocoder",
]
