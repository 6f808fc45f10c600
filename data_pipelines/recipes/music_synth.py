"""A procedural music dataset with exact key and tempo labels (for LOEV, arXiv:2412.18955).

Clip i of a set is a pure function of (seed, i): no files. Each clip has
  * a key: tonic 0..11 (C..B) and mode (major / natural minor): label = tonic + 12·minor, the
    `schemas.KEY_NAMES` convention (24 classes);
  * a tempo: BPM uniform in [`min_bpm`, `max_bpm`];
and holds one bar-per-chord progression of the key (I–IV–V–I, I–vi–IV–V, I–V–vi–IV, ii–V–I–I for
major; i–iv–v–i, i–VI–III–VII, i–iv–VII–III, i–VII–VI–VII for minor) as sustained triads, a
melody of scale notes on eighth notes, a bass on the chord roots, and percussion (kick on beats 1
and 3, snare on 2 and 4, hi-hat on eighth notes) that carries the tempo. Timbres (harmonic
amplitudes, decay, octave, levels) are drawn per clip, and the clip starts at a random phase of
the bar, so key and tempo are the only shared factors a model can rely on.

`synthesize(i, ...)` → (wave [T] float32 in [-1, 1], key, bpm); `MusicSet` describes a set.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from data_pipelines import locks

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)
# Progressions as scale degrees (0-based) of the chord roots, one chord per bar.
MAJOR_PROGRESSIONS = ((0, 3, 4, 0), (0, 5, 3, 4), (0, 4, 5, 3), (1, 4, 0, 0))
MINOR_PROGRESSIONS = ((0, 3, 4, 0), (0, 5, 2, 6), (0, 3, 6, 2), (0, 6, 5, 6))


@dataclasses.dataclass(frozen=True)
class MusicSet:
  """A procedural clip set: `num_clips` clips of `seconds` at `sample_rate`, keyed by `seed`."""
  num_clips: int = 2400
  seed: int = 0
  sample_rate: int = 16000
  seconds: float = 4.0
  min_bpm: float = 70.0
  max_bpm: float = 160.0

  def __len__(self) -> int:
    return self.num_clips

  def labels(self) -> tuple[np.ndarray, np.ndarray]:
    """(key [N] int32 0..23, bpm [N] float32) of every clip, without synthesising audio."""
    out = [_draw_labels(np.random.default_rng([self.seed, i]), self) for i in range(len(self))]
    return (np.asarray([k for k, _ in out], np.int32), np.asarray([b for _, b in out], np.float32))

  def clip(self, index: int) -> tuple[np.ndarray, int, float]:
    """(wave [T] float32, key, bpm) of clip `index`."""
    if not 0 <= index < self.num_clips:
      raise IndexError(f"clip {index} outside [0, {self.num_clips})")
    return synthesize(np.random.default_rng([self.seed, index]), self)


def _draw_labels(rng: np.random.Generator, s: MusicSet) -> tuple[int, float]:
  key = int(rng.integers(0, 24))
  bpm = float(rng.uniform(s.min_bpm, s.max_bpm))
  return key, bpm


def _tone(freq: np.ndarray | float, t: np.ndarray, harmonics: np.ndarray) -> np.ndarray:
  """Additive tone: Σ_h a_h sin(2π h f t); harmonics above Nyquist are dropped by the caller."""
  out = np.zeros_like(t)
  for h, a in enumerate(harmonics, 1):
    out += a * np.sin(2 * np.pi * h * freq * t)
  return out


def _midi_hz(note: float) -> float:
  return 440.0 * 2.0 ** ((note - 69) / 12)


def synthesize(rng: np.random.Generator, s: MusicSet) -> tuple[np.ndarray, int, float]:
  """One clip. Returns (wave [round(seconds · sample_rate)] float32 peak ≤ 0.9, key, bpm)."""
  key, bpm = _draw_labels(rng, s)
  sr = s.sample_rate
  n = int(round(s.seconds * sr))
  tonic, minor = key % 12, key >= 12
  scale = np.asarray(MINOR if minor else MAJOR)
  progs = MINOR_PROGRESSIONS if minor else MAJOR_PROGRESSIONS
  prog = progs[int(rng.integers(0, len(progs)))]
  beat = 60.0 / bpm
  offset = float(rng.uniform(0, 4 * beat))  # start at a random phase of the bar
  base = 48 + tonic + 12 * int(rng.integers(0, 2))  # C3..B4 region
  harm_pad = rng.uniform(0.1, 1.0, 4) / np.arange(1, 5)
  harm_mel = rng.uniform(0.1, 1.0, 5) / np.arange(1, 6) ** rng.uniform(0.5, 1.5)
  wave = np.zeros(n, np.float64)
  t_all = np.arange(n) / sr
  total_beats = int(np.ceil((s.seconds + offset) / beat)) + 1

  def add(start: float, dur: float, fn):
    a, b = int(max(0.0, start - offset) * sr), int(min(s.seconds, start - offset + dur) * sr)
    if b <= a:
      return
    local = t_all[a:b] - (start - offset)
    wave[a:b] += fn(local)

  # Chords (one per bar) and bass on the chord root.
  for bar in range(total_beats // 4 + 1):
    degree = prog[bar % 4]
    root = scale[degree] + base
    triad = [root, base + scale[(degree + 2) % 7] + 12 * ((degree + 2) // 7),
             base + scale[(degree + 4) % 7] + 12 * ((degree + 4) // 7)]
    start, dur = bar * 4 * beat, 4 * beat
    decay = rng.uniform(0.5, 2.0)
    for note in triad:
      f = _midi_hz(note)
      add(start, dur, lambda tt, f=f: 0.12 * np.exp(-tt / (decay * dur)) *
          np.minimum(1, tt * 50) * _tone(f, tt, harm_pad))
    fb = _midi_hz(root - 12)
    for b in range(4):
      add(start + b * beat, beat * 0.9, lambda tt, f=fb: 0.2 * np.exp(-tt * 4) *
          np.minimum(1, tt * 100) * _tone(f, tt, np.asarray([1.0, 0.3])))
  # Melody: scale notes on eighth notes (some rests), stepwise random walk.
  pos = int(rng.integers(0, 7))
  for e in range(total_beats * 2):
    pos = int(np.clip(pos + rng.integers(-2, 3), 0, 13))
    if rng.random() < 0.25:
      continue
    note = base + 12 + scale[pos % 7] + 12 * (pos // 7)
    f = _midi_hz(note)
    add(e * beat / 2, beat / 2, lambda tt, f=f: 0.15 * np.exp(-tt * 6) *
        np.minimum(1, tt * 200) * _tone(f, tt, harm_mel))
  # Percussion: kick (beats 1, 3), snare (2, 4), hi-hat (eighths).
  noise = rng.standard_normal(int(0.2 * sr))
  for b in range(total_beats):
    if b % 2 == 0:
      add(b * beat, 0.15, lambda tt: 0.6 * np.exp(-tt * 30) * np.sin(2 * np.pi * (50 + 80 *
                                                                                 np.exp(-tt * 40)) * tt))
    else:
      add(b * beat, 0.15, lambda tt: 0.25 * np.exp(-tt * 25) * noise[:tt.size])
  hat = np.diff(noise, prepend=0.0)  # high-passed noise
  for e in range(total_beats * 2):
    add(e * beat / 2, 0.05, lambda tt: 0.08 * np.exp(-tt * 80) * hat[:tt.size])
  peak = np.max(np.abs(wave))
  wave = wave / max(peak, 1e-6) * 0.9 * rng.uniform(0.5, 1.0)
  return wave.astype(np.float32), key, bpm


def transpose_key(key: np.ndarray | int, semitones: np.ndarray | int) -> np.ndarray:
  """The key label after a pitch shift by whole `semitones` (mode kept): [..] int."""
  key = np.asarray(key)
  return (key % 12 + np.asarray(semitones)) % 12 + 12 * (key >= 12)


def load_mirdata_fixtures(root) -> list[dict]:
  """The real annotated clips of `mirdata-audio-fixtures` (see its SOURCE.md), where present.

  Returns:
    [{"name", "wave" [T] float32 mono at its own rate, "sample_rate", "key" (int or -1),
      "bpm" (float or -1)}], for the clips whose label files exist.
  """
  import pathlib  # pylint: disable=g-import-not-at-top
  from data_pipelines import audio as audio_lib  # pylint: disable=g-import-not-at-top
  from data_pipelines import schemas  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root)
  names = {n.lower(): i for i, n in enumerate(schemas.KEY_NAMES)}
  flats = {"db": "c#", "eb": "d#", "gb": "f#", "ab": "g#", "bb": "a#"}
  out = []

  def key_of(text: str) -> int:
    tonic, mode = text.strip().lower().split()[:2]
    tonic = flats.get(tonic, tonic)
    return names.get(f"{tonic} {mode}", -1)

  def add(name, audio_path, key=-1, bpm=-1.0):
    if audio_path.is_file():
      wave, sr = audio_lib.decode_audio(audio_path.read_bytes())
      out.append({"name": name, "wave": wave.mean(0), "sample_rate": sr, "key": key,
                  "bpm": float(bpm)})

  for folder, keydir in (("giantsteps_key", "keys_gs+"), ("beatport_key", "keys")):
    for kf in sorted((root / folder / keydir).glob("*.txt")):
      add(f"{folder}/{kf.stem}", root / folder / "audio" / f"{kf.stem}.mp3",
          key=key_of(kf.read_text()))
  for bpm_file, audio in (
      ("gtzan_genre/gtzan_tempo_beat-main/tempo/gtzan_country_00000.bpm",
       "gtzan_genre/gtzan_genre/genres/country/country.00000.wav"),
      ("ballroom/B_1.0/annotations/tempo/Media-105901.bpm",
       "ballroom/B_1.0/audio/Waltz/Media-105901.wav")):
    if (root / bpm_file).is_file():
      add(audio, root / audio, bpm=float((root / bpm_file).read_text().split()[0]))
  return out


def render(music: MusicSet, path) -> dict:
  """Synthesises every clip of `music` once into `path` (a folder): `waves.npy` int16 [N, T]
  (PCM, peak ≤ 0.9 of full scale), `labels.npz` (key [N] int32, bpm [N] float32) and
  `music.json` (the set's parameters, written last: the folder is complete iff it exists and
  matches). Returns the parameters. Re-running with the same set returns at once; processes
  rendering the same folder at the same time take turns (`locks.build_lock`), the first renders."""
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  spec = dataclasses.asdict(music)
  done = path / "music.json"
  if done.is_file() and json.loads(done.read_text()) == spec:
    return spec
  with locks.build_lock(path):  # another process may be rendering the same set
    if done.is_file() and json.loads(done.read_text()) == spec:
      return spec
    _render_locked(music, path, done, spec)
  return spec


def _render_locked(music: MusicSet, path, done, spec: dict) -> None:
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if done.exists():
    done.unlink()
  n_samples = int(round(music.seconds * music.sample_rate))
  tmp = path / "waves.npy.tmp"
  waves = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16,
                                    shape=(music.num_clips, n_samples))
  keys = np.zeros(music.num_clips, np.int32)
  bpms = np.zeros(music.num_clips, np.float32)
  for i in range(music.num_clips):
    w, keys[i], bpms[i] = music.clip(i)
    waves[i] = np.round(w * 32767).astype(np.int16)
  waves.flush()
  del waves
  os.replace(tmp, path / "waves.npy")
  np.savez(path / "labels.npz", key=keys, bpm=bpms)
  done.write_text(json.dumps(spec))


def load_rendered(path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
  """(waves [N, T] int16 memmap, key [N] int32, bpm [N] float32, parameters) of `render`'s folder;
  divide the waves by 32767 for float audio."""
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not (path / "music.json").is_file():
    raise FileNotFoundError(f"{path}: no rendered music set (music.json missing); build it with "
                            "data_pipelines.recipes.music_synth.render(MusicSet(...), path)")
  labels = np.load(path / "labels.npz")
  return (np.load(path / "waves.npy", mmap_mode="r"), labels["key"], labels["bpm"],
          json.loads((path / "music.json").read_text()))


@dataclasses.dataclass(frozen=True)
class _ViewBatches:
  """grain map: global step t → this host's rows of batch t, each clip as `num_views` views."""
  path: str
  global_batch_size: int
  process_index: int
  process_count: int
  seed: int
  num_views: int
  augment: "object"  # audio_augment.AugmentConfig

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    from data_pipelines import audio_augment  # pylint: disable=g-import-not-at-top
    from data_pipelines import image_text  # pylint: disable=g-import-not-at-top
    waves, keys, bpms, _ = load_rendered(self.path)
    n = waves.shape[0]
    idx = image_text.global_batch_indices(n, self.global_batch_size, self.seed, step,
                                          process_index=self.process_index,
                                          process_count=self.process_count)
    epoch = int(step) // image_text.steps_per_epoch(n, self.global_batch_size)
    k = len(self.augment.tracked)
    b = len(idx)
    audio = np.zeros((b, self.num_views, self.augment.out_samples), np.float32)
    applied = np.zeros((b, self.num_views, k), bool)
    params = np.zeros((b, self.num_views, k), np.float32)
    for r, i in enumerate(idx.tolist()):
      wave = np.asarray(waves[i], np.float32) / 32767.0
      for v in range(self.num_views):
        rng = np.random.default_rng([self.seed, epoch, i, v])
        audio[r, v], applied[r, v], params[r, v] = audio_augment.augment_view(wave, self.augment,
                                                                              rng)
    return {"audio": audio, "applied": applied, "params": params,
            "key": keys[idx].astype(np.int32), "tempo": bpms[idx].astype(np.float32),
            "index": idx.astype(np.int64)}


def _bank_views(path: str, augment, seed: int, views_per_clip: int, clips: list[int]):
  """Views [len(clips), M, S] int16, applied [.., M, K] bool, params [.., M, K] of some clips."""
  from data_pipelines import audio_augment  # pylint: disable=g-import-not-at-top
  waves = load_rendered(path)[0]
  k = len(augment.tracked)
  out = np.zeros((len(clips), views_per_clip, augment.out_samples), np.int16)
  applied = np.zeros((len(clips), views_per_clip, k), bool)
  params = np.zeros((len(clips), views_per_clip, k), np.float32)
  for r, i in enumerate(clips):
    wave = np.asarray(waves[i], np.float32) / 32767.0
    for j in range(views_per_clip):
      # Stream 2**20 + j keeps bank draws apart from on-the-fly views ([seed, epoch, clip, view]).
      rng = np.random.default_rng([seed, 2 ** 20 + j, i])
      x, applied[r, j], params[r, j] = audio_augment.augment_view(wave, augment, rng)
      out[r, j] = np.round(x * 32767).astype(np.int16)
  return out, applied, params


def render_view_bank(path, bank_path, *, augment, views_per_clip: int, seed: int = 0,
                     workers: int = 1) -> dict:
  """Augments every clip of `render`'s folder `path` `views_per_clip` times, once, into
  `bank_path`: `views.npy` int16 [N, M, S] (PCM of each view), `applied.npy` bool [N, M, K],
  `params.npy` float32 [N, M, K] and `bank.json` (written last, with the augmentation settings
  and the source set's parameters: the bank is complete iff it exists and matches). View j of
  clip i uses `np.random.default_rng([seed, 2**20 + j, i])`. Re-running returns at once.

  Why: the tracked chain (librosa's phase vocoder) costs ~15–30 ms per view on one core, as much
  as a training step of the small CNN; with a bank, training draws `num_views` distinct views of
  each clip from its M banked ones (M(M−1)/2 pairs per clip), so every run of a comparison pays the
  augmentation once and sees exactly the same views. Runs started side by side on one bank take
  turns (`locks.build_lock`): the first builds it, the others wait and then read it.
  """
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  if views_per_clip < 2:
    raise ValueError(f"views_per_clip = {views_per_clip}: a bank needs at least 2 views per clip")
  bank_path = pathlib.Path(bank_path)
  _, _, _, music = load_rendered(path)
  spec = {"music": music, "augment": dataclasses.asdict(augment),
          "views_per_clip": views_per_clip, "seed": seed}
  spec = json.loads(json.dumps(spec))  # tuples → lists, as read back
  done = bank_path / "bank.json"
  if done.is_file() and json.loads(done.read_text()) == spec:
    return spec
  with locks.build_lock(bank_path):  # another process (a run beside this one) may be building it
    if done.is_file() and json.loads(done.read_text()) == spec:
      return spec
    _render_view_bank_locked(path, bank_path, augment, views_per_clip, seed, workers, music,
                             done, spec)
  return spec


def _render_view_bank_locked(path, bank_path, augment, views_per_clip, seed, workers, music, done,
                             spec) -> None:
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if done.exists():
    done.unlink()
  n, k = music["num_clips"], len(augment.tracked)
  tmp = bank_path / "views.npy.tmp"
  views = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16,
                                    shape=(n, views_per_clip, augment.out_samples))
  applied = np.zeros((n, views_per_clip, k), bool)
  params = np.zeros((n, views_per_clip, k), np.float32)
  chunks = [list(range(a, min(n, a + 64))) for a in range(0, n, 64)]
  args = (str(path), augment, seed, views_per_clip)
  if workers > 1:
    import multiprocessing  # pylint: disable=g-import-not-at-top
    # "spawn": the caller may hold JAX's threads, which fork() would copy mid-flight.
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")) as pool:
      results = pool.map(_bank_views, *zip(*[args + (c,) for c in chunks]))
      for c, (v, a, p) in zip(chunks, results):
        views[c[0]:c[-1] + 1], applied[c[0]:c[-1] + 1], params[c[0]:c[-1] + 1] = v, a, p
  else:
    for c in chunks:
      views[c[0]:c[-1] + 1], applied[c[0]:c[-1] + 1], params[c[0]:c[-1] + 1] = _bank_views(
          *args, c)
  views.flush()
  del views
  os.replace(tmp, bank_path / "views.npy")
  np.save(bank_path / "applied.npy", applied)
  np.save(bank_path / "params.npy", params)
  done.write_text(json.dumps(spec))


@dataclasses.dataclass(frozen=True)
class _BankBatches:
  """grain map: global step t → this host's rows of batch t, `num_views` distinct banked views of
  each clip (chosen by `np.random.default_rng([seed, epoch, clip])`)."""
  path: str
  bank_path: str
  global_batch_size: int
  process_index: int
  process_count: int
  seed: int
  num_views: int

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    from data_pipelines import image_text  # pylint: disable=g-import-not-at-top
    _, keys, bpms, _ = load_rendered(self.path)
    bank = np.load(f"{self.bank_path}/views.npy", mmap_mode="r")
    applied = np.load(f"{self.bank_path}/applied.npy")
    params = np.load(f"{self.bank_path}/params.npy")
    n, m = bank.shape[0], bank.shape[1]
    idx = image_text.global_batch_indices(n, self.global_batch_size, self.seed, step,
                                          process_index=self.process_index,
                                          process_count=self.process_count)
    epoch = int(step) // image_text.steps_per_epoch(n, self.global_batch_size)
    pick = np.stack([np.random.default_rng([self.seed, epoch, i]).permutation(m)[:self.num_views]
                     for i in idx.tolist()])  # [b, V]
    rows = idx[:, None]
    return {"audio": bank[idx][np.arange(len(idx))[:, None], pick].astype(np.float32) / 32767.0,
            "applied": applied[rows, pick], "params": params[rows, pick],
            "key": keys[idx].astype(np.int32), "tempo": bpms[idx].astype(np.float32),
            "index": idx.astype(np.int64)}


def train_iterator(path, *, global_batch_size: int, seed: int, augment, num_views: int = 2,
                   process_index: int = 0, process_count: int = 1,
                   num_epochs: int | None = None, worker_count: int = 0,
                   view_bank: str | None = None):
  """Checkpointable grain iterator of augmented view batches over a rendered music set.

  Views are augmented on the fly (`audio_augment.augment_view`), or, with `view_bank` (a folder of
  `render_view_bank` for this set), drawn from the bank: `num_views` distinct banked views per clip.

  Batches (this host's b = B / P rows): audio [b, V, S] float32, applied [b, V, K] bool (tracked
  augmentation k applied to the view), params [b, V, K] float32 (semitones, stretch rate), key [b]
  int32, tempo [b] float32 (the clean clip's labels), index [b] int64.
  """
  import grain  # pylint: disable=g-import-not-at-top
  from data_pipelines import image_text  # pylint: disable=g-import-not-at-top
  waves, _, _, _ = load_rendered(path)
  n = waves.shape[0]
  image_text._check_batch(n, global_batch_size, process_index, process_count)  # pylint: disable=protected-access
  steps = image_text.steps_per_epoch(n, global_batch_size)
  ds = grain.MapDataset.range(steps * num_epochs if num_epochs else sys.maxsize)
  if view_bank:
    bank = np.load(f"{view_bank}/views.npy", mmap_mode="r")
    if bank.shape[0] != n or bank.shape[1] < num_views or bank.shape[2] != augment.out_samples:
      raise ValueError(f"{view_bank}: view bank of shape {bank.shape} does not fit the set {path} "
                       f"({n} clips, {num_views} views of {augment.out_samples} samples)")
    ds = ds.map(_BankBatches(str(path), str(view_bank), global_batch_size, process_index,
                             process_count, seed, num_views))
  else:
    ds = ds.map(_ViewBatches(str(path), global_batch_size, process_index, process_count, seed,
                             num_views, augment))
  return image_text.to_iterator(ds, worker_count=worker_count)


def main(argv=None) -> None:
  """`mmcl data build music --output DIR [--num-clips N] [--seed S] [--seconds T]`: renders a set
  (as LOEV does on its first run: data.dir with seed 0, data.eval_dir with seed 1)."""
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="mmcl data build music", description=main.__doc__)
  p.add_argument("--output", required=True)
  p.add_argument("--num-clips", type=int, default=MusicSet.num_clips)
  p.add_argument("--seed", type=int, default=MusicSet.seed)
  p.add_argument("--sample-rate", type=int, default=MusicSet.sample_rate)
  p.add_argument("--seconds", type=float, default=MusicSet.seconds)
  a = p.parse_args(argv)
  spec = render(MusicSet(num_clips=a.num_clips, seed=a.seed, sample_rate=a.sample_rate,
                         seconds=a.seconds), a.output)
  print(f"music set in {a.output}: {spec}")


if __name__ == "__main__":
  main()
