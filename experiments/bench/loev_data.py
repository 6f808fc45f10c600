"""LOEV input pipeline on the CPU: pitch-shift resamplers, on-the-fly view batches, view bank.

  .venv/bin/python experiments/bench/loev_data.py --data workdirs/loev/music_train [--batches 3]

`--data` is a rendered procedural music set (`data_pipelines.recipes.music_synth.render`); the view bank
is read from `<data>/view_bank_m<--bank>_seed0` when it exists (`mmcl train` renders it for a
config with `data.view_bank` = M, e.g. `experiments/loev.py:long`).
Everything runs in this one thread, so the rates are per CPU core. Prints one JSON line each:
  * the first `librosa.effects.pitch_shift` call of the process (JIT compilation of librosa's
    phase vocoder) and the steady-state time of pitch_shift / its resampler / time_stretch per
    2.6-s clip for each resampler (`AugmentConfig.res_type`);
  * clips/s of a 32-clip × 2-view training batch augmented on the fly, per resampler;
  * clips/s of the same batch drawn from the view bank.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from data_pipelines import audio_augment  # noqa: E402
from data_pipelines.recipes import music_synth  # noqa: E402


def _ms(fn, repeats: int) -> float:
  t0 = time.perf_counter()
  for _ in range(repeats):
    fn()
  return 1e3 * (time.perf_counter() - t0) / repeats


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default="workdirs/loev/music_train")
  p.add_argument("--batches", type=int, default=3)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--bank", type=int, default=8, help="views per clip of the bank to read")
  args = p.parse_args()
  import librosa  # pylint: disable=g-import-not-at-top
  waves = music_synth.load_rendered(args.data)[0]
  wave = np.asarray(waves[0], np.float32) / 32767.0
  sr = 16000
  t0 = time.perf_counter()
  librosa.effects.pitch_shift(wave, sr=sr, n_steps=3)
  print(json.dumps({"what": "first pitch_shift call of the process", "ms": round(
      1e3 * (time.perf_counter() - t0), 1)}), flush=True)
  ratio = 2.0 ** (-3 / 12)
  stretched = librosa.effects.time_stretch(wave, rate=ratio)
  for res_type in ("soxr_hq", "soxr_mq", "fft"):
    row = {"res_type": res_type,
           "pitch_shift_ms": _ms(lambda: librosa.effects.pitch_shift(  # noqa: B023
               wave, sr=sr, n_steps=3, res_type=res_type), args.repeats),
           "resample_ms": _ms(lambda: librosa.resample(  # noqa: B023
               stretched, orig_sr=sr / ratio, target_sr=sr, res_type=res_type), args.repeats)}
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
          flush=True)
  print(json.dumps({"what": "time_stretch ms", "ms": round(_ms(
      lambda: librosa.effects.time_stretch(wave, rate=1.2), args.repeats), 2)}), flush=True)
  for res_type in ("soxr_hq", "soxr_mq", "fft"):
    cfg = dataclasses.replace(audio_augment.AugmentConfig(), res_type=res_type)
    fn = music_synth._ViewBatches(  # pylint: disable=protected-access
        args.data, 32, 0, 1, 0, 2, cfg)
    fn(0)
    t0 = time.perf_counter()
    for s in range(1, args.batches + 1):
      fn(s)
    rate = 32 * args.batches / (time.perf_counter() - t0)
    print(json.dumps({"what": "on-the-fly view batch [32 clips x 2 views x 2 s]",
                      "res_type": res_type, "clips_per_s": round(rate, 1)}), flush=True)
  bank = pathlib.Path(args.data) / f"view_bank_m{args.bank}_seed0"
  if (bank / "bank.json").is_file():
    fn = music_synth._BankBatches(  # pylint: disable=protected-access
        args.data, str(bank), 32, 0, 1, 0, 2)
    fn(0)
    t0 = time.perf_counter()
    for s in range(1, 10 * args.batches + 1):
      fn(s)
    rate = 32 * 10 * args.batches / (time.perf_counter() - t0)
    print(json.dumps({"what": "view-bank batch [32 clips x 2 views x 2 s]",
                      "clips_per_s": round(rate, 1)}), flush=True)


if __name__ == "__main__":
  main()
