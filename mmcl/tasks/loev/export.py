"""LOEV's serving towers: a waveform → log-mel → trunk → each representation the evaluator
reads."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmcl.train.task import TowerExport


def export_towers(net, d, m, out_samples: int) -> dict[str, TowerExport]:
  """A waveform [b, S] (mono, data.sample_rate, S = clip_seconds · sample_rate samples) →
  log-mel → trunk → each representation of `LOEVNet.embed`, named: "whole" (the trunk output,
  branches concatenated), one tower per subspace ("invariant", "pitch_shift", "time_stretch":
  head h's output, or branch h for loev++) and, for loev++, "head_<name>" (head h on branch h).
  net: `model.LOEVNet`; d, m: the `data` and `model` configs."""
  pre = {"input": "waveform", "sample_rate": int(d.sample_rate), "samples": out_samples,
         "channels": "mono (mean of the channels)", "dtype": "float32 in [-1, 1]",
         "source": f"an audio clip resampled to sample_rate, its first {out_samples} "
                   "samples, zero-padded when shorter",
         "frontend": {"inside the tower": "log-mel (librosa's definition)", "n_fft": m.n_fft,
                      "win_length": m.win_length, "hop_length": m.hop_length,
                      "n_mels": m.n_mels, "fmax": m.fmax}}
  spec = jax.ShapeDtypeStruct((1, out_samples), jnp.float32)
  towers = {"whole": TowerExport(fn=lambda p, x: net.representation(p, x, "whole"),
                                 input_spec=spec,
                                 preprocessing={**pre, "representation": "whole"},
                                 l2_normalized=False)}
  for h, name in enumerate(net.head_names):
    towers[name] = TowerExport(
        fn=lambda p, x, h=h: net.representation(p, x, "sub", h), input_spec=spec,
        preprocessing={**pre, "representation": f"sub/{name}"}, l2_normalized=False)
    if net.branched:
      towers[f"head_{name}"] = TowerExport(
          fn=lambda p, x, h=h: net.representation(p, x, "head", h), input_spec=spec,
          preprocessing={**pre, "representation": f"head/{name}"}, l2_normalized=False)
  return towers
