"""Audio augmentations for LOEV (arXiv:2412.18955), on the host with numpy/scipy and librosa.

A view of a clip = tracked ("variant") chain, then a crop to the output length, then the base
chain. Every draw comes from `np.random.default_rng([seed, epoch, clip, view])`, so views are
reproducible, and each view records what was applied:

  tracked chain (applied with p = `chain_p`, 0.75), each augmentation k with p = `aug_p`, 0.5:
    pitch    `librosa.effects.pitch_shift` by n ∈ {−4..−1, 1..4} semitones (whole semitones, so
             the key label transposes exactly; `params[..., 0]` = n, 0 when not applied); its
             resampler is `AugmentConfig.res_type` (librosa's default "soxr_hq"; "soxr_mq" and
             "fft" are the alternatives — after the first call, which JIT-compiles librosa's phase
             vocoder for several seconds, the phase vocoder, not the resampler, dominates)
    stretch  `librosa.effects.time_stretch` at rate r ~ U(0.7, 1.3) (tempo × r;
             `params[..., 1]` = r, 1 when not applied)
  base chain (not tracked), each with its own probability:
    gain ±6 dB (0.5), polarity inversion (0.5), coloured noise 1/f^β, β ∈ {0, 1, 2}, at SNR
    U(15, 35) dB (0.5), a 2nd-order Butterworth low-pass at U(2, 7) kHz or high-pass at
    U(50, 500) Hz (0.5), a feedback-free delay of U(50, 300) ms at gain U(0.2, 0.5) (0.3);
    the result is clipped to [−1, 1].

`TRACKED = ("pitch", "stretch")`: the order of the flag / parameter columns.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.signal

TRACKED = ("pitch", "stretch")
# librosa resamplers for the non-integer ratio 2^(n/12) of a pitch shift ("polyphase" and the
# integer-ratio ones do not apply; "kaiser_*" would need resampy, not installed).
RES_TYPES = ("soxr_hq", "soxr_vhq", "soxr_mq", "soxr_lq", "fft", "scipy")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities and ranges of the augmentations (defaults: LOEV's, see docs/results/loev.md)."""
  sample_rate: int = 16000
  out_samples: int = 32000
  chain_p: float = 0.75
  aug_p: float = 0.5
  max_semitones: int = 4
  min_rate: float = 0.7
  max_rate: float = 1.3
  tracked: tuple[str, ...] = TRACKED
  base_chain: bool = True
  res_type: str = "soxr_hq"

  def __post_init__(self):
    if self.res_type not in RES_TYPES:
      raise ValueError(f"AugmentConfig.res_type = {self.res_type!r}: expected one of {RES_TYPES}")


def _crop(wave: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
  """wave [T] → [length]: a random window (zero-padded at the end when short)."""
  if wave.size >= length:
    start = int(rng.integers(0, wave.size - length + 1))
    return wave[start:start + length]
  return np.pad(wave, (0, length - wave.size))


def coloured_noise(n: int, beta: float, rng: np.random.Generator) -> np.ndarray:
  """[n] float64 noise with power spectrum ∝ 1/f^β (0 white, 1 pink, 2 brown), unit RMS."""
  spec = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
  f = np.arange(n // 2 + 1, dtype=np.float64)
  f[0] = 1.0
  x = np.fft.irfft(spec / f ** (beta / 2), n)
  return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def base_chain(wave: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
  """The untracked chain (see the module docstring): [T] float → [T] float32 in [−1, 1]."""
  x = wave.astype(np.float64)
  if rng.random() < 0.5:
    x = x * 10 ** (rng.uniform(-6, 6) / 20)
  if rng.random() < 0.5:
    x = -x
  if rng.random() < 0.5:
    sig = np.sqrt(np.mean(x ** 2)) + 1e-8
    snr = rng.uniform(15, 35)
    x = x + coloured_noise(x.size, float(rng.integers(0, 3)), rng) * sig * 10 ** (-snr / 20)
  if rng.random() < 0.5:
    if rng.random() < 0.5:
      sos = scipy.signal.butter(2, rng.uniform(2000, 7000), "lowpass", fs=sr, output="sos")
    else:
      sos = scipy.signal.butter(2, rng.uniform(50, 500), "highpass", fs=sr, output="sos")
    x = scipy.signal.sosfilt(sos, x)
  if rng.random() < 0.3:
    d = int(rng.uniform(0.05, 0.3) * sr)
    x = x + rng.uniform(0.2, 0.5) * np.pad(x, (d, 0))[:x.size]
  return np.clip(x, -1.0, 1.0).astype(np.float32)


def augment_view(wave: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One view of a clip.

  Args:
    wave: [T] float32 mono at cfg.sample_rate, T ≥ cfg.out_samples · max_rate (room to stretch).
    cfg: the augmentation settings. rng: this view's generator.

  Returns:
    (view [cfg.out_samples] float32, applied [K] bool, params [K] float32) with K =
    len(cfg.tracked): params are the semitones of "pitch" (0 when not applied) and the rate of
    "stretch" (1 when not applied).
  """
  import librosa  # pylint: disable=g-import-not-at-top  (heavy; only the audio pipeline needs it)
  k = len(cfg.tracked)
  applied = np.zeros(k, bool)
  params = np.asarray([1.0 if t == "stretch" else 0.0 for t in cfg.tracked], np.float32)
  x = np.asarray(wave, np.float32)
  if rng.random() < cfg.chain_p:
    for j, name in enumerate(cfg.tracked):
      if rng.random() >= cfg.aug_p:
        continue
      if name == "pitch":
        n = int(rng.integers(1, cfg.max_semitones + 1)) * (1 if rng.random() < 0.5 else -1)
        x = librosa.effects.pitch_shift(x, sr=cfg.sample_rate, n_steps=n, res_type=cfg.res_type)
        params[j] = n
      elif name == "stretch":
        r = float(rng.uniform(cfg.min_rate, cfg.max_rate))
        x = librosa.effects.time_stretch(x, rate=r)
        params[j] = r
      else:
        raise ValueError(f"unknown tracked augmentation {name!r} (known: {TRACKED})")
      applied[j] = True
  x = _crop(x, cfg.out_samples, rng)
  if cfg.base_chain:
    x = base_chain(x, cfg.sample_rate, rng)
  return x.astype(np.float32), applied, params


def fixed_view(wave: np.ndarray, cfg: AugmentConfig, *, semitones: int = 0, rate: float = 1.0,
               start: int = 0) -> np.ndarray:
  """A deterministic view for evaluation: pitch shift and/or stretch by the given amounts, no
  base chain, window [start, start + out_samples). Returns [out_samples] float32."""
  import librosa  # pylint: disable=g-import-not-at-top
  x = np.asarray(wave, np.float32)
  if semitones:
    x = librosa.effects.pitch_shift(x, sr=cfg.sample_rate, n_steps=semitones,
                                   res_type=cfg.res_type)
  if rate != 1.0:
    x = librosa.effects.time_stretch(x, rate=rate)
  x = x[start:start + cfg.out_samples]
  return np.pad(x, (0, cfg.out_samples - x.size)).astype(np.float32)
