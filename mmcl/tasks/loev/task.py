"""LOEV / LOEV++ — Leave-One-EquiVariant contrastive music representations (Guinot et al. 2025,
arXiv:2412.18955), and the SimCLR-style all-invariant baseline.

Batch: audio [B, V, S] float32 (V views of each clip, `data_pipelines.recipes.music_synth.train_iterator`),
applied [B, V, K] bool (tracked augmentation k applied to the view: pitch shift, time stretch),
params [B, V, K], key [B], tempo [B].
Encoder: log-mel front end (librosa's definition, `mmcl.models.audio_cnn.LogMelFrontend`) → CNN
trunk (`AudioCNN`). Heads: MLP in → 512 → 128 (ReLU), outputs L2-normalised.
  simclr:  one invariant head (head 0) on the trunk output.
  loev:    head 0 invariant + head k per tracked augmentation, all on the trunk output.
  loev++:  the trunk's last stage is replicated into K + 1 branches; head h reads branch h.
Loss: per head h, SupCon "all" form over the B·V views with τ = 0.1 and positives = views of the
same clip (`mmcl.losses.supcon`); head k excludes the views that received augmentation k (P^k_ij =
P^0_ij [a_i^k = 0][a_j^k = 0]), so its space stays sensitive to k. Total = mean over heads.
Negatives are gathered across devices (`supcon_over_mesh`).

Representations for evaluation: "whole" = the trunk output (all branches concatenated for
loev++); subspace h = branch h (loev++) or the output of head h (loev / simclr); for loev++ also
"head/h" = head h's output on branch h (the projected space the loss acts on), as a diagnosis.
Evaluation (`evaluate`, on a held-out procedural set): key / tempo linear probes on the whole
embedding; the equivariance probe (R² of the applied semitones / stretch rate predicted from
[z(transformed), z(clean)]) per subspace: linear on a 70/30 split ("equivariance/..."), and
cross-fitted over all clips (5 folds), linear ("equivariance_cf/...") and RBF kernel ridge
("equivariance_rbf_cf/...", a nonlinear probe); kNN retrieval of transformed queries against
clean clips with labels that transform (key transposed by the shift, tempo × rate) per subspace
and whole; invariance = share of transformed views whose nearest clean clip is their own, per subspace.
Each metric comes with its standard error ("<metric>/se"), and the per-test-item outcomes go to
loev_eval_items.npz for paired comparisons between runs.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import audio_augment
from data_pipelines import locks
from data_pipelines.recipes import music_synth
from mmcl.config import Config
from mmcl.eval import finite as finite_lib
from mmcl.losses import sharded as sharded_losses
from mmcl.models.audio_cnn import AudioCNN, LogMelFrontend, audio_cnn_flops
from mmcl.models.layers import l2_normalize
from mmcl.models.mlp import MLP
from mmcl.tasks.loev import probes
from mmcl.train.task import Task, TowerExport

VARIANTS = ("simclr", "loev", "loev++")


class LOEVTask(Task):
  """Multi-head SupCon with per-augmentation exclusion masks."""

  primary_metric = "probe/key_accuracy"

  @classmethod
  def declare_config(cls, c: Config) -> None:
    t = c.task
    t.define("variant", "loev", "simclr (one invariant head) | loev | loev++ (replicated last "
             "stage)", choices=VARIANTS)
    t.define("tracked", ("pitch", "stretch"), "tracked augmentations, one head each "
             f"(subset of {audio_augment.TRACKED})")
    t.define("temperature", 0.1, "SupCon temperature τ")
    t.define("loss_impl", "auto", "loss implementation (see mmcl.losses): auto, dense, tiled, "
             "fused (Pallas kernels)", choices=("auto", "dense", "tiled", "fused"))
    t.define("eval_probe_train_fraction", 0.7, "share of the evaluation clips that train the "
             "probes (the rest test them)")
    t.define("eval_knn_k", 10, "neighbours of the kNN retrieval evaluation")
    t.define("eval_tempo_tolerance", 0.08, "relative BPM tolerance of a tempo match in kNN")

    m = c.model
    m.define("channels", (16, 32, 64, 128), "CNN stage channels (the last stage is replicated "
             "in loev++)")
    m.define("convs_per_stage", 1, "3×3 convolutions per CNN stage")
    m.define("head_hidden", 512, "hidden width of each projection head (0: a linear head, so "
             "whatever the head's output keeps apart, its input (the LOEV++ branch) keeps apart "
             "linearly too)")
    m.define("head_dim", 128, "output width of each projection head (0: no projection head, the "
             "loss acts on the representation itself; loev++ and simclr only, since loev's heads "
             "all read the one trunk output)")
    m.define("n_mels", 96, "mel bands of the front end")
    m.define("n_fft", 2048, "FFT size of the front end")
    m.define("win_length", 400, "window length (samples) of the front end")
    m.define("hop_length", 160, "hop (samples) of the front end")
    m.define("fmax", 8000.0, "highest mel frequency (Hz)")

    d = c.data
    d.define("eval_dir", "data/music_eval", "rendered held-out music set (evaluation)")
    d.define("num_clips", 2400, "clips of the procedural training set (rendered into data.dir)")
    d.define("num_eval_clips", 400, "clips of the procedural evaluation set (data.eval_dir)")
    d.define("sample_rate", 16000, "audio sample rate (Hz)")
    d.define("clip_seconds", 2.0, "seconds per view (the model's input)")
    d.define("source_seconds", 2.6, "seconds synthesised per clip (room to stretch by 1.3)")
    d.define("num_views", 2, "views per clip")
    d.define("chain_p", 0.75, "probability of applying the tracked chain to a view")
    d.define("aug_p", 0.5, "probability of each tracked augmentation inside the chain")
    d.define("base_chain", True, "apply the untracked base chain (gain, polarity, noise, ...)")
    d.define("res_type", "soxr_hq", "librosa resampler of the pitch shift",
             choices=audio_augment.RES_TYPES)
    d.define("view_bank", 0, "0: augment every view on the fly; M ≥ 2: augment each training clip "
             "M times once (data.dir/view_bank_m<M>_seed<seed>, "
             "`music_synth.render_view_bank`) and draw num_views distinct banked views per clip")
    d.define("view_bank_workers", 1, "processes that render the view bank")

  def __init__(self, config: Config, mesh):
    super().__init__(config, mesh)
    t, m, d = config.task, config.model, config.data
    unknown = [a for a in t.tracked if a not in audio_augment.TRACKED]
    if unknown or not t.tracked:
      raise ValueError(f"config key 'task.tracked' = {t.tracked}: expected a non-empty subset "
                       f"of {audio_augment.TRACKED}")
    self.tracked = tuple(t.tracked)
    self.num_heads = 1 if t.variant == "simclr" else 1 + len(self.tracked)
    self.frontend = LogMelFrontend(sample_rate=d.sample_rate, n_fft=m.n_fft,
                                   win_length=m.win_length, hop_length=m.hop_length,
                                   n_mels=m.n_mels, fmax=m.fmax)
    self.trunk = AudioCNN(channels=tuple(m.channels), convs_per_stage=m.convs_per_stage,
                          num_branches=self.num_heads if t.variant == "loev++" else 1)
    if m.head_dim == 0 and t.variant == "loev" and self.num_heads > 1:
      raise ValueError("config key 'model.head_dim' = 0 (no projection head) needs task.variant "
                       "loev++ or simclr: loev's heads all read the one trunk output, so without "
                       "heads they would be one space")
    hidden = (m.head_hidden,) if m.head_hidden else ()
    self.heads = [MLP(hidden_dims=hidden, out_dim=m.head_dim, activation="relu")
                  for _ in range(self.num_heads)] if m.head_dim else []
    self.out_samples = int(round(d.clip_seconds * d.sample_rate))
    self.augment = audio_augment.AugmentConfig(
        sample_rate=d.sample_rate, out_samples=self.out_samples, chain_p=d.chain_p,
        aug_p=d.aug_p, tracked=self.tracked, base_chain=d.base_chain, res_type=d.res_type)

  def head_names(self) -> list[str]:
    return ["invariant"] + list(self.tracked[:self.num_heads - 1])

  # --- data ---------------------------------------------------------------------------------------
  def _music(self, path: str, num_clips: int, seed: int) -> str:
    d = self.config.data
    music_synth.render(music_synth.MusicSet(num_clips=num_clips, seed=seed,
                                            sample_rate=d.sample_rate,
                                            seconds=d.source_seconds), path)
    return path

  def train_iterator(self, process_index: int, process_count: int):
    c = self.config
    path = self._music(c.data.dir, c.data.num_clips, seed=0)
    bank = None
    if c.data.view_bank:
      if c.data.view_bank < c.data.num_views:
        raise ValueError(f"config key 'data.view_bank' = {c.data.view_bank}: needs at least "
                         f"data.num_views = {c.data.num_views} views per clip (or 0 for none)")
      bank = f"{path}/view_bank_m{c.data.view_bank}_seed{c.seed}"
      music_synth.render_view_bank(path, bank, augment=self.augment,
                                   views_per_clip=c.data.view_bank, seed=c.seed,
                                   workers=c.data.view_bank_workers)
    return music_synth.train_iterator(path, global_batch_size=c.data.global_batch_size,
                                      seed=c.seed, augment=self.augment,
                                      num_views=c.data.num_views, process_index=process_index,
                                      process_count=process_count, num_epochs=c.data.num_epochs,
                                      worker_count=c.data.worker_count, view_bank=bank)

  # --- model --------------------------------------------------------------------------------------
  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    keys = jax.random.split(rng, 1 + self.num_heads)
    frames = self.frontend.num_frames(self.out_samples)
    trunk = self.trunk.init(keys[0], jnp.zeros((1, frames, self.config.model.n_mels)))["params"]
    feat = 2 * self.config.model.channels[-1]
    heads = {f"head_{h}": head.init(keys[1 + h], jnp.zeros((1, feat)))["params"]
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

  def loss(self, params, batch, rng, *, train: bool):
    del rng, train  # no dropout
    audio = batch["audio"]
    b, v = audio.shape[0], audio.shape[1]
    feats = self.features(params, audio.reshape(b * v, -1))
    clip_ids = jnp.repeat(jnp.arange(b, dtype=jnp.int32), v)
    applied = batch["applied"].reshape(b * v, -1)
    scale = 1.0 / self.config.task.temperature
    losses = []
    metrics = {}
    for h, z in enumerate(self.head_outputs(params, feats)):
      # Head 0: views of a clip are positives. Head k: only if neither view received augmentation k.
      exclude = None if h == 0 else applied[:, h - 1]
      lh = sharded_losses.supcon_over_mesh(l2_normalize(z), self.mesh, logit_scale=scale,
                                           clip_ids=clip_ids, exclude=exclude,
                                           impl=self.config.task.loss_impl)
      metrics[f"loss/{self.head_names()[h]}"] = lh
      losses.append(lh)
    return jnp.mean(jnp.stack(losses)), metrics

  def flops_per_example(self) -> float | None:
    frames = self.frontend.num_frames(self.out_samples)
    return float(self.config.data.num_views * audio_cnn_flops(self.trunk, frames,
                                                               self.config.model.n_mels))

  # --- evaluation ---------------------------------------------------------------------------------
  def embed(self, params, audio: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """audio: [N, S] → {"whole": [N, F·branches], "sub/<head>": [N, ·]} float32 numpy.

    For loev++ also "head/<head>": the projection head's output on its branch (the space the
    loss makes invariant), next to the branch itself (the representation, "sub/<head>").
    """
    fn = jax.jit(lambda p, x: (self.features(p, x), self.head_outputs(p, self.features(p, x))))
    whole, subs = [], [[] for _ in range(self.num_heads)]
    branched = self.config.task.variant == "loev++"
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
        if branched:
          projected[h].append(np.asarray(heads[h])[:len(chunk)])
    out = {"whole": np.concatenate(whole)}
    for h, name in enumerate(self.head_names()):
      out[f"sub/{name}"] = np.concatenate(subs[h])
      if branched:
        out[f"head/{name}"] = np.concatenate(projected[h])
    return out

  def evaluation_views(self, seed: int = 1234) -> dict[str, np.ndarray]:
    """Deterministic clean / pitch-shifted / stretched views of the evaluation clips.

    They depend only on the evaluation set, `seed` and the view settings, so they are cached in
    data.eval_dir (`eval_views_*.npz`) for the next evaluation (e.g. of every checkpoint)."""
    c = self.config
    path = self._music(c.data.eval_dir, c.data.num_eval_clips, seed=1)
    a = self.augment
    cache = pathlib.Path(path) / (f"eval_views_s{seed}_{a.out_samples}_{a.sample_rate}_"
                                  f"{a.res_type}.npz")
    if not cache.is_file():
      with locks.build_lock(cache.parent):  # evaluations of runs side by side share the cache
        if not cache.is_file():
          self._write_evaluation_views(path, cache, seed)
    with np.load(cache) as f:
      return {k: f[k] for k in f.files}

  def _write_evaluation_views(self, path: str, cache: pathlib.Path, seed: int) -> None:
    a = self.augment
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

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    t = self.config.task
    views = self.evaluation_views()
    emb = {v: self.embed(params, views[v]) for v in ("clean", "pitch", "stretch")}
    finite_lib.require_scorable({f"{s} embedding ({v} clips)": x for v, spaces in emb.items()
                                 for s, x in spaces.items()})
    n = len(views["key"])
    n_train = int(round(t.eval_probe_train_fraction * n))
    tr, te = np.arange(n_train), np.arange(n_train, n)
    key, bpm = views["key"], views["bpm"]
    out: dict[str, float] = {}
    items: dict[str, np.ndarray] = {}  # per test item, for standard errors and paired comparisons
    whole = emb["clean"]["whole"]
    keyp = probes.logistic_probe(whole[tr], key[tr], whole[te], key[te], num_classes=24)
    out["probe/key_accuracy"] = keyp["accuracy"]
    items["probe/key_correct"] = (keyp["pred"] == key[te]).astype(np.float64)
    tempo = probes.ridge_probe(whole[tr], np.log2(bpm[tr]), whole[te], np.log2(bpm[te]))
    out["probe/tempo_r2"] = tempo["r2"]
    out["probe/tempo_acc1"] = float(np.mean(np.abs(2 ** tempo["pred"] / bpm[te] - 1) <= 0.04))
    items["probe/tempo_target"], items["probe/tempo_pred"] = np.log2(bpm[te]), tempo["pred"]
    items["probe/tempo_acc1"] = (np.abs(2 ** tempo["pred"] / bpm[te] - 1) <= 0.04).astype(float)
    targets = {"pitch": views["semitones"], "stretch": np.log2(views["rate"])}
    spaces = list(emb["clean"])  # whole, sub/<head> (and head/<head> for loev++)
    # Key and tempo probes on every space, cross-fitted over all n clean clips: which subspace
    # holds key / tempo (e.g. whether the stretch head keeps tempo), and the whole embedding's
    # probes with all n clips as test clips (about half the SE of the 70/30 split).
    key_probe = functools.partial(probes.logistic_probe, num_classes=24)
    log_bpm = np.log2(bpm)
    items["probe_cf/tempo/target"] = log_bpm
    for s in spaces:
      x = emb["clean"][s]
      tempo_cf = probes.cross_fitted(probes.ridge_probe, x, log_bpm)
      pred_t = tempo_cf["pred"]
      out[f"probe_cf/tempo/{s}/r2"] = tempo_cf["r2"]
      out[f"probe_cf/tempo/{s}/r2/se"] = probes.bootstrap_se(
          lambda i: probes.r2_score(log_bpm[i], pred_t[i]), n)  # pylint: disable=cell-var-from-loop
      items[f"probe_cf/tempo/{s}/pred"] = pred_t
      key_correct = (probes.out_of_fold(key_probe, x, key) == key).astype(np.float64)
      out[f"probe_cf/key/{s}/accuracy"] = float(np.mean(key_correct))
      out[f"probe_cf/key/{s}/accuracy/se"] = float(np.std(key_correct, ddof=1) / np.sqrt(n))
      items[f"probe_cf/key/{s}/correct"] = key_correct
    k = t.eval_knn_k
    tol = t.eval_tempo_tolerance
    for aug in ("pitch", "stretch"):
      for s in spaces:
        x = np.concatenate([emb[aug][s], emb["clean"][s]], 1)
        eq = probes.ridge_probe(x[tr], targets[aug][tr], x[te], targets[aug][te])
        out[f"equivariance/{aug}/{s}/r2"] = eq["r2"]
        items[f"equivariance/{aug}/target"] = targets[aug][te]
        items[f"equivariance/{aug}/{s}/pred"] = eq["pred"]
        # Cross-fitted over all n clips (each predicted by a probe fitted on the other folds),
        # linear and RBF kernel ridge: the nonlinear probe reads a separation that is not linear
        # in the parameter (e.g. cyclic in semitones); all n clips are test clips (smaller SE).
        for name, fn in (("equivariance_cf", probes.ridge_probe),
                         ("equivariance_rbf_cf", probes.kernel_ridge_probe)):
          cf = probes.cross_fitted(fn, x, targets[aug])
          out[f"{name}/{aug}/{s}/r2"] = cf["r2"]
          items[f"{name}/{aug}/{s}/pred"] = cf["pred"]
        items[f"equivariance_cf/{aug}/target"] = targets[aug]
    # kNN: transformed queries against the other clips' clean views; labels transform.
    key_after = music_synth.transpose_key(key, views["semitones"].astype(int))
    bpm_after = bpm * views["rate"]
    own = np.arange(n)
    for s in spaces:
      items[f"knn/key/{s}/hit@{k}"] = probes.knn_hits(
          emb["pitch"][s], emb["clean"][s], lambda top: key[top] == key_after[:, None], k=k,
          exclude=own)
      items[f"knn/tempo/{s}/hit@{k}"] = probes.knn_hits(
          emb["stretch"][s], emb["clean"][s],
          lambda top: np.abs(bpm[top] / bpm_after[:, None] - 1) <= tol, k=k, exclude=own)
      for task_ in ("key", "tempo"):
        hits = items[f"knn/{task_}/{s}/hit@{k}"]
        out[f"knn/{task_}/{s}/hit@{k}"] = float(np.mean(hits))
        out[f"knn/{task_}/{s}/hit@{k}/se"] = float(np.std(hits, ddof=1) / np.sqrt(n))
    # Invariance: share of transformed views whose nearest clean clip (cosine) is their own clip.
    # An invariant space → 1; a space that keeps augmentation k apart → lower for k.
    for aug in ("pitch", "stretch"):
      for s in spaces:
        own_hit = probes.knn_hits(emb[aug][s], emb["clean"][s], lambda top: top == own[:, None],
                                  k=1)
        out[f"invariance/{aug}/{s}/own_top1"] = float(np.mean(own_hit))
        out[f"invariance/{aug}/{s}/own_top1/se"] = float(np.std(own_hit, ddof=1) / np.sqrt(n))
        items[f"invariance/{aug}/{s}/own_top1"] = own_hit
    # Chance levels of the kNN hits (a random neighbour).
    out["knn/key/chance"] = float(np.mean(key[None, :] == key_after[:, None]))
    out["knn/tempo/chance"] = float(np.mean(np.abs(bpm[None, :] / bpm_after[:, None] - 1) <= tol))
    out["num_eval_clips"] = float(n)
    # Bootstrap standard errors over the test clips of the probe metrics (the kNN ones above are
    # means over all n queries).
    nt = len(te)
    out["probe/key_accuracy/se"] = float(np.std(items["probe/key_correct"], ddof=1) / np.sqrt(nt))
    out["probe/tempo_r2/se"] = probes.bootstrap_se(
        lambda i: probes.r2_score(items["probe/tempo_target"][i], items["probe/tempo_pred"][i]), nt)
    for aug in ("pitch", "stretch"):
      y = items[f"equivariance/{aug}/target"]
      for s in spaces:
        pred = items[f"equivariance/{aug}/{s}/pred"]
        out[f"equivariance/{aug}/{s}/r2/se"] = probes.bootstrap_se(
            lambda i: probes.r2_score(y[i], pred[i]), nt)  # pylint: disable=cell-var-from-loop
        y_all = items[f"equivariance_cf/{aug}/target"]
        for name in ("equivariance_cf", "equivariance_rbf_cf"):
          pred_cf = items[f"{name}/{aug}/{s}/pred"]
          out[f"{name}/{aug}/{s}/r2/se"] = probes.bootstrap_se(
              lambda i: probes.r2_score(y_all[i], pred_cf[i]),  # pylint: disable=cell-var-from-loop
              n)
    path = pathlib.Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "loev_eval_items.npz", **items)
    (path / "loev_eval.json").write_text(json.dumps(out, indent=1, sort_keys=True))
    return out

  # --- export to serving --------------------------------------------------------------------------
  def export_towers(self, params) -> dict[str, TowerExport]:
    """A waveform [b, S] (mono, data.sample_rate, S = clip_seconds · sample_rate samples) →
    log-mel → trunk → each representation of `embed`, named: "whole" (the trunk output, branches
    concatenated), one tower per subspace ("invariant", "pitch_shift", "time_stretch": head h's
    output, or branch h for loev++) and, for loev++, "head_<name>" (head h on branch h)."""
    d, m = self.config.data, self.config.model
    branched = self.config.task.variant == "loev++"
    pre = {"input": "waveform", "sample_rate": int(d.sample_rate), "samples": self.out_samples,
           "channels": "mono (mean of the channels)", "dtype": "float32 in [-1, 1]",
           "source": f"an audio clip resampled to sample_rate, its first {self.out_samples} "
                     "samples, zero-padded when shorter",
           "frontend": {"inside the tower": "log-mel (librosa's definition)", "n_fft": m.n_fft,
                        "win_length": m.win_length, "hop_length": m.hop_length,
                        "n_mels": m.n_mels, "fmax": m.fmax}}
    spec = jax.ShapeDtypeStruct((1, self.out_samples), jnp.float32)

    def representation(p, x, kind: str, h: int = 0):
      feats = self.features(p, x)
      if kind == "whole":
        return feats.reshape(feats.shape[0], -1)
      if kind == "sub" and branched:
        return feats[:, h]
      return self.head_outputs(p, feats)[h]

    towers = {"whole": TowerExport(fn=lambda p, x: representation(p, x, "whole"),
                                   input_spec=spec, preprocessing={**pre, "representation":
                                                                   "whole"},
                                   l2_normalized=False)}
    for h, name in enumerate(self.head_names()):
      towers[name] = TowerExport(
          fn=lambda p, x, h=h: representation(p, x, "sub", h), input_spec=spec,
          preprocessing={**pre, "representation": f"sub/{name}"}, l2_normalized=False)
      if branched:
        towers[f"head_{name}"] = TowerExport(
            fn=lambda p, x, h=h: representation(p, x, "head", h), input_spec=spec,
            preprocessing={**pre, "representation": f"head/{name}"}, l2_normalized=False)
    return towers
