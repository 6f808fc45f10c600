"""LOEV's model: log-mel front end → CNN trunk (K + 1 branches of its last stage for loev++) →
one MLP head per space, and the representations the evaluator and the export read."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LOEVNet:
  """The encoder and its heads.

  Attributes:
    frontend: `mmcl.models.audio_cnn.LogMelFrontend`.
    trunk: `mmcl.models.audio_cnn.AudioCNN` (num_branches = the heads for loev++, else 1).
    heads: one `MLP` per head, or () without projection heads (model.head_dim = 0).
    head_names: "invariant", then the tracked augmentations that have a head.
    branched: loev++ (head h reads trunk branch h).
  """
  frontend: Any
  trunk: Any
  heads: tuple[Any, ...]
  head_names: tuple[str, ...]
  branched: bool

  @property
  def num_heads(self) -> int:
    return len(self.head_names)

  def init(self, rng: jax.Array, out_samples: int, n_mels: int, feature_dim: int
           ) -> dict[str, Any]:
    keys = jax.random.split(rng, 1 + self.num_heads)
    frames = self.frontend.num_frames(out_samples)
    trunk = self.trunk.init(keys[0], jnp.zeros((1, frames, n_mels)))["params"]
    heads = {f"head_{h}": head.init(keys[1 + h], jnp.zeros((1, feature_dim)))["params"]
             for h, head in enumerate(self.heads)}
    return {"trunk": trunk, "heads": heads}

  def features(self, params, audio: jax.Array) -> jax.Array:
    """audio: [N, S] float32 → trunk features [N, branches, F] float32."""
    return self.trunk.apply({"params": params["trunk"]}, self.frontend(audio))

  def head_outputs(self, params, feats: jax.Array) -> list[jax.Array]:
    """feats: [N, branches, F] → per head [N, head_dim] (not normalised); without projection
    heads (model.head_dim = 0) the branch itself, [N, F]."""
    outs = []
    for h in range(self.num_heads):
      branch = feats[:, h] if feats.shape[1] > 1 else feats[:, 0]
      outs.append(self.heads[h].apply({"params": params["heads"][f"head_{h}"]}, branch)
                  if self.heads else branch)
    return outs

  def representation(self, params, x: jax.Array, kind: str, h: int = 0) -> jax.Array:
    """x: [N, S] → one representation [N, ·]: kind "whole" (the trunk output, branches
    concatenated), "sub" (subspace h: branch h for loev++, else head h's output) or "head"
    (head h's output)."""
    feats = self.features(params, x)
    if kind == "whole":
      return feats.reshape(feats.shape[0], -1)
    if kind == "sub" and self.branched:
      return feats[:, h]
    return self.head_outputs(params, feats)[h]

  def embed(self, params, audio: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """audio: [N, S] → {"whole": [N, F·branches], "sub/<head>": [N, ·]} float32 numpy.

    For loev++ also "head/<head>": the projection head's output on its branch (the space the
    loss makes invariant), next to the branch itself (the representation, "sub/<head>").
    """
    fn = jax.jit(lambda p, x: (self.features(p, x), self.head_outputs(p, self.features(p, x))))
    whole, subs = [], [[] for _ in range(self.num_heads)]
    projected = [[] for _ in range(self.num_heads)]  # loev++ only
    for i in range(0, len(audio), batch_size):
      chunk = audio[i:i + batch_size]
      pad = batch_size - len(chunk)
      x = np.pad(chunk, ((0, pad), (0, 0)))
      feats, heads = fn(params, jnp.asarray(x))
      feats = np.asarray(feats)[:len(chunk)]
      whole.append(feats.reshape(len(chunk), -1))
      for h in range(self.num_heads):
        subs[h].append(feats[:, h] if feats.shape[1] > 1 else np.asarray(heads[h])[:len(chunk)])
        if self.branched:
          projected[h].append(np.asarray(heads[h])[:len(chunk)])
    out = {"whole": np.concatenate(whole)}
    for h, name in enumerate(self.head_names):
      out[f"sub/{name}"] = np.concatenate(subs[h])
      if self.branched:
        out[f"head/{name}"] = np.concatenate(projected[h])
    return out
