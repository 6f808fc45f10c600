"""LOEV's data: the procedural music sets (rendered on first use) and the fixed evaluation views
(clean, pitch-shifted and time-stretched copies of each evaluation clip, cached on disk)."""

from __future__ import annotations

import pathlib

import numpy as np

from data_pipelines import audio_augment
from data_pipelines import locks
from data_pipelines.recipes import music_synth


def render_music(path: str, num_clips: int, seed: int, *, sample_rate: int,
                 seconds: float) -> str:
  """Renders (or finds) the procedural music set at `path`; returns `path`."""
  music_synth.render(music_synth.MusicSet(num_clips=num_clips, seed=seed,
                                          sample_rate=sample_rate, seconds=seconds), path)
  return path


def evaluation_views(path: str, augment: audio_augment.AugmentConfig, seed: int = 1234
                     ) -> dict[str, np.ndarray]:
  """Deterministic clean / pitch / stretch views [N, S] of the rendered clips at `path`, with
  semitones [N], rate [N], key [N] and bpm [N].

  They depend only on the evaluation set, `seed` and the view settings, so they are cached in
  `path` (`eval_views_*.npz`) for the next evaluation (e.g. of every checkpoint)."""
  a = augment
  cache = pathlib.Path(path) / (f"eval_views_s{seed}_{a.out_samples}_{a.sample_rate}_"
                                f"{a.res_type}.npz")
  if not cache.is_file():
    with locks.build_lock(cache.parent):  # evaluations of runs side by side share the cache
      if not cache.is_file():
        _write_evaluation_views(path, cache, augment, seed)
  with np.load(cache) as f:
    return {k: f[k] for k in f.files}


def _write_evaluation_views(path: str, cache: pathlib.Path, a: audio_augment.AugmentConfig,
                            seed: int) -> None:
  waves, keys, bpms, _ = music_synth.load_rendered(path)
  rng = np.random.default_rng(seed)
  n = waves.shape[0]
  semis = rng.integers(1, 5, n) * rng.choice([-1, 1], n)
  rates = rng.uniform(0.7, 1.3, n)
  clean, pitched, stretched = [], [], []
  for i in range(n):
    w = np.asarray(waves[i], np.float32) / 32767.0
    clean.append(audio_augment.fixed_view(w, a))
    pitched.append(audio_augment.fixed_view(w, a, semitones=int(semis[i])))
    stretched.append(audio_augment.fixed_view(w, a, rate=float(rates[i])))
  out = {"clean": np.stack(clean), "pitch": np.stack(pitched), "stretch": np.stack(stretched),
         "semitones": semis.astype(np.float32), "rate": rates.astype(np.float32),
         "key": np.asarray(keys), "bpm": np.asarray(bpms)}
  tmp = cache.with_suffix(".tmp.npz")
  np.savez(tmp, **out)
  tmp.replace(cache)
