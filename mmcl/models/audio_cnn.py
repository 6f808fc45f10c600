"""Audio encoder for LOEV (arXiv:2412.18955): a librosa-compatible log-mel front end and a small CNN
trunk whose last stage can be replicated into parallel branches (LOEV++).

Front end (`LogMelFrontend`), the definition of `librosa.feature.melspectrogram` followed by
`librosa.power_to_db(S, ref=1.0, amin=1e-10, top_db=80)`, per example:
  frames centred (the signal zero-padded by n_fft/2 on both sides), 1 + T // hop of them;
  a periodic Hann window of `win_length` samples zero-padded (centred) to n_fft;
  P = |rfft(frame · window)|²; M = F P with F the Slaney-scale, Slaney-normalised mel filterbank
  [n_mels, n_fft/2 + 1] (`slaney_mel_filterbank`, librosa's default `htk=False, norm="slaney"`);
  dB = 10 log10(max(M, amin)), then floored at max(dB) − top_db.
Defaults: 16 kHz, n_fft 2048, win 400, hop 160, 96 bands over 0–8 kHz.

Trunk (`AudioCNN`): [B, frames, mels] → stages of (3×3 conv → LayerNorm over channels → ReLU) ×
`convs_per_stage`, then 2×2 max-pool; global mean + max pooling over time and frequency. With
`num_branches` = K + 1 > 1 the last stage is replicated (separate weights) and the output is
[B, num_branches, 2·C_last]; otherwise [B, 1, 2·C_last].
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _hz_to_slaney_mel(f: np.ndarray) -> np.ndarray:
  """Slaney (Auditory Toolbox) mel scale: linear below 1 kHz, logarithmic above."""
  f = np.asarray(f, np.float64)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
  mel = f / f_sp
  return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz)
                  / logstep, mel)


def _slaney_mel_to_hz(m: np.ndarray) -> np.ndarray:
  m = np.asarray(m, np.float64)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
  return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                          fmax: float | None = None) -> np.ndarray:
  """librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax) (htk=False, norm="slaney").

  Returns:
    [n_mels, n_fft // 2 + 1] float64.
  """
  fmax = sample_rate / 2 if fmax is None else fmax
  fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
  mel_f = _slaney_mel_to_hz(np.linspace(_hz_to_slaney_mel(fmin), _hz_to_slaney_mel(fmax),
                                        n_mels + 2))
  fdiff = np.diff(mel_f)
  ramps = mel_f[:, None] - fft_freqs[None, :]
  lower = -ramps[:-2] / fdiff[:-1, None]
  upper = ramps[2:] / fdiff[1:, None]
  weights = np.maximum(0.0, np.minimum(lower, upper))
  return weights * (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]


class LogMelFrontend:
  """Waveforms → log-mel (dB), librosa's definition (module docstring), as a JAX function."""

  def __init__(self, sample_rate: int = 16000, n_fft: int = 2048, win_length: int = 400,
               hop_length: int = 160, n_mels: int = 96, fmin: float = 0.0,
               fmax: float | None = 8000.0, amin: float = 1e-10, top_db: float | None = 80.0):
    if win_length > n_fft:
      raise ValueError(f"win_length {win_length} > n_fft {n_fft}")
    self.sample_rate, self.n_fft, self.hop, self.n_mels = sample_rate, n_fft, hop_length, n_mels
    self.amin, self.top_db = amin, top_db
    self.filterbank = slaney_mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
    n = np.arange(win_length)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / win_length)  # periodic (fftbins=True)
    left = (n_fft - win_length) // 2
    self.window = np.zeros(n_fft)
    self.window[left:left + win_length] = hann

  def num_frames(self, num_samples: int) -> int:
    return 1 + num_samples // self.hop

  def __call__(self, wave: jax.Array) -> jax.Array:
    """wave: [B, T] float32 → [B, 1 + T // hop, n_mels] float32 (dB)."""
    if wave.ndim != 2:
      raise ValueError(f"LogMelFrontend: expected waves [B, T], got shape {tuple(wave.shape)}")
    pad = self.n_fft // 2
    x = jnp.pad(wave.astype(jnp.float32), ((0, 0), (pad, pad)))
    frames = self.num_frames(wave.shape[1])
    idx = np.arange(frames)[:, None] * self.hop + np.arange(self.n_fft)[None, :]
    spec = jnp.fft.rfft(x[:, idx] * jnp.asarray(self.window, jnp.float32), axis=-1)
    power = spec.real ** 2 + spec.imag ** 2  # [B, frames, n_fft/2 + 1]
    mel = power @ jnp.asarray(self.filterbank.T, jnp.float32)
    db = 10.0 * jnp.log10(jnp.maximum(mel, self.amin))
    if self.top_db is not None:
      db = jnp.maximum(db, jnp.max(db, axis=(1, 2), keepdims=True) - self.top_db)
    return db


class _Stage(nn.Module):
  channels: int
  convs: int
  pool: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.convs):
      x = nn.Conv(self.channels, (3, 3), name=f"conv_{i}")(x)
      x = nn.LayerNorm(name=f"ln_{i}")(x)
      x = nn.relu(x)
    if self.pool:
      # window_shape by keyword: the ONNX converter's max_pool takes it only so.
      x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    return x


class AudioCNN(nn.Module):
  """Small CNN trunk over log-mel frames.

  Attributes:
    channels: channels of each stage (the last one is replicated `num_branches` times).
    convs_per_stage: 3×3 convolutions per stage.
    num_branches: copies of the last stage (LOEV++: K + 1; otherwise 1).
  """
  channels: Sequence[int] = (16, 32, 64, 128)
  convs_per_stage: int = 1
  num_branches: int = 1

  @nn.compact
  def __call__(self, logmel: jax.Array) -> jax.Array:
    """logmel: [B, frames, mels] float32 (dB) → [B, num_branches, 2·channels[-1]] float32."""
    if logmel.ndim != 3:
      raise ValueError(f"AudioCNN: expected log-mel [B, frames, mels], got {tuple(logmel.shape)}")
    # dB values span ~[-80, 40]; a fixed affine map keeps the first conv well scaled.
    x = ((logmel + 40.0) / 40.0)[..., None]
    for s, c in enumerate(self.channels[:-1]):
      x = _Stage(c, self.convs_per_stage, name=f"stage_{s}")(x)
    outs = []
    for b in range(self.num_branches):
      h = _Stage(self.channels[-1], self.convs_per_stage, pool=False,
                 name=f"last_stage_branch_{b}")(x)
      outs.append(jnp.concatenate([h.mean(axis=(1, 2)), h.max(axis=(1, 2))], axis=-1))
    return jnp.stack(outs, axis=1).astype(jnp.float32)


def audio_cnn_flops(model: AudioCNN, frames: int, mels: int) -> float:
  """Forward multiply-add FLOPs (×2) of the convolutions for one example."""
  total, h, w, cin = 0.0, frames, mels, 1
  for i, c in enumerate(model.channels):
    reps = model.num_branches if i == len(model.channels) - 1 else 1
    for j in range(model.convs_per_stage):
      total += reps * 2 * h * w * 9 * (cin if j == 0 else c) * c
    cin = c
    if i < len(model.channels) - 1:
      h, w = h // 2, w // 2
  return total
