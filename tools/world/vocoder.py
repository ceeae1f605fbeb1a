"""A Griffin-Lim "vocoder" with the interface AudioLDMPipeline expects of `SpeechT5HifiGan`.

AudioLDMPipeline turns its VAE's output, a log-mel spectrogram (B, T, model_in_dim), into sound
with `self.vocoder(mel)`, and reads `vocoder.config.model_in_dim`, `.sampling_rate` and
`.upsample_rates` (their product is the hop length: samples per mel frame). This module does the
same with no learned weights: the mel spectrogram is un-normalised, mapped back to a linear
magnitude spectrogram by the filterbank's pseudo-inverse (band-width compensated, clamped at 0),
and given a phase by
fast Griffin-Lim (momentum 0.99, a fixed-seed initial phase, so the output is deterministic).

Why Griffin-Lim rather than a trained HiFi-GAN: the shapes world's sounds are steady sines and
square waves, whose pitch and harmonics Griffin-Lim recovers exactly from a magnitude
spectrogram, with no training time (a HiFi-GAN small enough to train here in minutes renders
pitch less reliably) and no weights beyond the filterbank.

The same module defines the representation the audio VAE and UNet are trained on:
`GriffinLimVocoder.mel(waveform)` → normalised log-mel (B, T, n_mels) in about [-1, 1].

It is a diffusers `ModelMixin`, so `save_pretrained` / `from_pretrained` store it like any
component; the pipeline's `model_index.json` names it `["tools.world.vocoder", "GriffinLimVocoder"]`,
so loading such a pipeline needs this repository importable (it is: `tools` is a package of it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular HTK-mel filters, each peaking at 1."""
    freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / np.maximum(mid - lo, 1e-9)
    down = (hi - freqs[None]) / np.maximum(hi - mid, 1e-9)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


class GriffinLimVocoder(ModelMixin, ConfigMixin):
    """log-mel (B, T, model_in_dim) or (T, model_in_dim) → waveform (B, T · hop) / (T · hop,)."""

    config_name = "config.json"
    # one phase draw covers the whole batch, so row i of a batch is not what that row alone gives
    # (see DecoderTool.rows_independent: such a decoder is never handed several requests at once)
    rows_independent = False

    @register_to_config
    def __init__(
        self,
        model_in_dim: int = 64,
        sampling_rate: int = 16000,
        upsample_rates: tuple[int, ...] = (256,),
        n_fft: int = 1024,
        fmin: float = 0.0,
        fmax: float = 8000.0,
        log_floor: float = 1e-5,
        n_iter: int = 32,
        momentum: float = 0.99,
        peak: float = 0.8,
        seed: int = 0,
    ):
        super().__init__()
        basis = torch.from_numpy(mel_filterbank(sampling_rate, n_fft, model_in_dim, fmin, fmax))
        self.register_buffer("mel_basis", basis)  # (n_mels, n_freq)
        # pseudo-inverse, each linear bin scaled by the width (in bins) of the mel bands covering it:
        # the pinv spreads a band's energy over its width, which lowers a high harmonic's peak
        # relative to the fundamental (a buzz would sound, and analyse, like a beep); the gain
        # restores the peaks' relative heights
        b = basis.double()
        widths = (b > 0).sum(dim=1).double()
        gain = (b * widths[:, None]).sum(0) / b.sum(0).clamp_min(1e-9)
        inverse = torch.linalg.pinv(b) * gain[:, None]
        self.register_buffer("inverse_basis", inverse.float())  # (n_freq, n_mels)

    @property
    def hop_length(self) -> int:
        return int(math.prod(self.config.upsample_rates))

    # ---- the representation ------------------------------------------------------------------

    def _log_scale(self) -> tuple[float, float]:
        """normalised = (log10(mel) - offset) / scale: the floor maps to -1, magnitude 1 to +1."""
        lf = math.log10(self.config.log_floor)
        return lf / 2.0, -lf / 2.0  # offset, scale

    def _window(self, device) -> torch.Tensor:
        return torch.hann_window(self.config.n_fft, periodic=True, dtype=torch.float32, device=device)

    def _stft(self, wave: torch.Tensor) -> torch.Tensor:
        w = self._window(wave.device)
        return torch.stft(wave, self.config.n_fft, self.hop_length, window=w, center=True, return_complex=True)

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        w = self._window(spec.device)
        return torch.istft(spec, self.config.n_fft, self.hop_length, window=w, center=True, length=length)

    @torch.no_grad()
    def mel(self, wave) -> torch.Tensor:
        """Waveform (B, N) or (N,) → normalised log-mel (B, 1 + N // hop, n_mels), about [-1, 1]."""
        x = torch.as_tensor(np.asarray(wave) if not torch.is_tensor(wave) else wave, dtype=torch.float32)
        squeeze = x.ndim == 1
        x = x.reshape(-1, x.shape[-1]).to(self.mel_basis.device)
        mag = self._stft(x).abs() * (2.0 / self._window(x.device).sum())  # sine of amplitude A → A
        mel = torch.einsum("mf,bft->btm", self.mel_basis.float(), mag)
        offset, scale = self._log_scale()
        out = ((torch.log10(mel.clamp_min(self.config.log_floor)) - offset) / scale).clamp(-1.0, 1.5)
        return out[0] if squeeze else out

    # ---- vocoding ----------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        dtype = spectrogram.dtype
        x = spectrogram.float()
        squeeze = x.ndim == 2
        if squeeze:
            x = x[None]
        offset, scale = self._log_scale()
        mel = 10.0 ** (x.clamp(-1.0, 1.5) * scale + offset)  # (B, T, n_mels)
        mel = torch.where(x <= -0.999, torch.zeros_like(mel), mel)  # the floor is silence
        mag = torch.einsum("fm,btm->bft", self.inverse_basis.float(), mel).clamp_min(0.0)  # (B, F, T)
        n_frames = mag.shape[-1]
        length = n_frames * self.hop_length
        gen = torch.Generator("cpu").manual_seed(int(self.config.seed))
        phase = torch.rand(mag.shape, generator=gen, dtype=torch.float32).to(mag.device)
        angles = torch.polar(torch.ones_like(mag), 2 * math.pi * phase)
        previous = torch.zeros_like(angles)
        m = float(self.config.momentum)
        for _ in range(int(self.config.n_iter)):
            rebuilt = self._stft(self._istft(mag * angles, length))[..., :n_frames]
            angles = rebuilt - previous * (m / (1.0 + m)) if m else rebuilt
            angles = angles / angles.abs().clamp_min(1e-16)
            previous = rebuilt
        wave = self._istft(mag * angles, length)
        peak = wave.abs().amax(dim=-1, keepdim=True)
        wave = torch.where(peak > 1e-6, wave * (float(self.config.peak) / peak.clamp_min(1e-6)), wave)
        wave = wave.to(dtype)
        return wave[0] if squeeze else wave
