"""Audio transforms: decode (WAV/FLAC/OGG/MP3 via `soundfile`), mix to mono, resample, crop, and
log-mel spectrograms — on the host in numpy, or on the device as a jitted JAX function.

`soundfile` wheels bundle libsndfile >= 1.1, which decodes MP3 as well, so no system library or
ffmpeg is needed. Resampling is polyphase (`scipy.signal.resample_poly`, Kaiser-windowed FIR).

Log-mel (the same definition in both backends, checked equal in tests):
  frames t = 0 .. 1 + (T - n_fft) // hop - 1 (no centring/padding), periodic Hann window,
  power spectrum P = |rfft(w · x_t)|², mel energies M = P @ F with F the triangular HTK-mel
  filterbank [n_fft/2 + 1, n_mels] (`mel_filterbank`), output log(M + eps).
Which backend is faster is measured by `experiments/bench/data.py` (see BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math

import numpy as np
import soundfile

from data_pipelines import permutation

_CROP_STREAM = 0x41756469


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
  """Encoded audio → (waveform [C, T] float32 in [-1, 1], sample rate); ValueError if undecodable."""
  try:
    wave, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
  except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
    raise ValueError(f"audio decode failed ({type(e).__name__}: {e})") from None
  if wave.shape[0] == 0:
    raise ValueError("audio decode failed (no samples)")
  return np.ascontiguousarray(wave.T), int(sr)


def resample(wave: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
  """wave: [..., T] float32 at sr_in → [..., ceil(T · sr_out / sr_in)] float32 at sr_out."""
  if sr_in == sr_out:
    return wave
  g = math.gcd(sr_in, sr_out)
  import scipy.signal  # pylint: disable=g-import-not-at-top  (~1 s to import; only audio needs it)
  return scipy.signal.resample_poly(wave, sr_out // g, sr_in // g, axis=-1).astype(np.float32)


def crop_or_pad(wave: np.ndarray, length: int, start: int) -> np.ndarray:
  """wave: [T] → [length]: wave[start:start + length], zero-padded at the end when short."""
  out = np.zeros(length, np.float32)
  piece = wave[start:start + length]
  out[:len(piece)] = piece
  return out


def random_starts(lengths: np.ndarray, crop: int, *, seed: int, epoch: int,
                  indices: np.ndarray) -> np.ndarray:
  """[b] crop starts, uniform in [0, max(T_b - crop, 0)], keyed by (seed, epoch, index)."""
  u = permutation.uniform(seed, _CROP_STREAM, epoch, np.asarray(indices, np.int64))
  room = np.maximum(np.asarray(lengths, np.int64) - crop, 0)
  return np.floor(u * (room + 1)).astype(np.int64)


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
  """HTK mel scale: 2595 · log10(1 + f / 700)."""
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
  """Triangular filters equally spaced on the HTK mel scale, peak 1.

  Returns:
    [n_fft // 2 + 1, n_mels] float32.
  """
  fmax = sample_rate / 2 if fmax is None else fmax
  if not 0 <= fmin < fmax <= sample_rate / 2:
    raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}, "
                     f"sample_rate={sample_rate}")
  freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
  edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  up = (freqs[:, None] - lower[None, :]) / (center - lower)[None, :]
  down = (upper[None, :] - freqs[:, None]) / (upper - center)[None, :]
  return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LogMel:
  """Log-mel front end. Defaults: 16 kHz, 25 ms window (400), 10 ms hop (160), 64 mels."""
  sample_rate: int = 16000
  n_fft: int = 400
  hop: int = 160
  n_mels: int = 64
  fmin: float = 0.0
  fmax: float | None = None
  eps: float = 1e-6

  def num_frames(self, num_samples: int) -> int:
    return 1 + (num_samples - self.n_fft) // self.hop if num_samples >= self.n_fft else 0

  @functools.cached_property
  def filterbank(self) -> np.ndarray:
    return mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.fmax)

  @functools.cached_property
  def window(self) -> np.ndarray:
    import scipy.signal  # pylint: disable=g-import-not-at-top
    return scipy.signal.get_window("hann", self.n_fft, fftbins=True).astype(np.float32)

  def _check(self, wave_shape: tuple[int, ...]) -> int:
    if len(wave_shape) != 2 or wave_shape[1] < self.n_fft:
      raise ValueError(f"log-mel input must be [B, T] with T >= n_fft={self.n_fft}, got "
                       f"{list(wave_shape)}")
    return self.num_frames(wave_shape[1])

  def numpy(self, wave: np.ndarray) -> np.ndarray:
    """Host version. wave: [B, T] float32 → [B, frames, n_mels] float32."""
    frames = self._check(wave.shape)
    idx = np.arange(frames)[:, None] * self.hop + np.arange(self.n_fft)[None, :]
    x = wave[:, idx] * self.window  # [B, frames, n_fft]
    power = np.abs(np.fft.rfft(x, axis=-1)) ** 2
    return np.log(power.astype(np.float32) @ self.filterbank + self.eps).astype(np.float32)

  @functools.cached_property
  def jax(self):
    """Device version: a jitted function [B, T] float32 → [B, frames, n_mels] float32."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    fb = jnp.asarray(self.filterbank)
    window = jnp.asarray(self.window)
    n_fft, hop, eps = self.n_fft, self.hop, self.eps

    def log_mel(wave):
      frames = 1 + (wave.shape[1] - n_fft) // hop
      idx = jnp.arange(frames)[:, None] * hop + jnp.arange(n_fft)[None, :]
      x = wave[:, idx] * window
      spec = jnp.fft.rfft(x, axis=-1)
      power = spec.real ** 2 + spec.imag ** 2
      return jnp.log(power @ fb + eps)

    return jax.jit(log_mel)
