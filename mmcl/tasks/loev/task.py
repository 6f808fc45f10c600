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

from typing import Any

import jax
import numpy as np

from data_pipelines import audio_augment
from data_pipelines.recipes import music_synth
from mmcl.config import Config
from mmcl.eval import finite as finite_lib
from mmcl.models.audio_cnn import AudioCNN, LogMelFrontend, audio_cnn_flops
from mmcl.models.mlp import MLP
from mmcl.tasks.loev import evaluate, export
from mmcl.tasks.loev.data import evaluation_views, render_music
from mmcl.tasks.loev.loss import loev_loss
from mmcl.tasks.loev.model import LOEVNet
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
    frontend = LogMelFrontend(sample_rate=d.sample_rate, n_fft=m.n_fft,
                              win_length=m.win_length, hop_length=m.hop_length,
                              n_mels=m.n_mels, fmax=m.fmax)
    trunk = AudioCNN(channels=tuple(m.channels), convs_per_stage=m.convs_per_stage,
                     num_branches=self.num_heads if t.variant == "loev++" else 1)
    if m.head_dim == 0 and t.variant == "loev" and self.num_heads > 1:
      raise ValueError("config key 'model.head_dim' = 0 (no projection head) needs task.variant "
                       "loev++ or simclr: loev's heads all read the one trunk output, so without "
                       "heads they would be one space")
    hidden = (m.head_hidden,) if m.head_hidden else ()
    heads = tuple(MLP(hidden_dims=hidden, out_dim=m.head_dim, activation="relu")
                  for _ in range(self.num_heads)) if m.head_dim else ()
    self.net = LOEVNet(frontend, trunk, heads,
                       ("invariant",) + self.tracked[:self.num_heads - 1], t.variant == "loev++")
    self.out_samples = int(round(d.clip_seconds * d.sample_rate))
    self.augment = audio_augment.AugmentConfig(
        sample_rate=d.sample_rate, out_samples=self.out_samples, chain_p=d.chain_p,
        aug_p=d.aug_p, tracked=self.tracked, base_chain=d.base_chain, res_type=d.res_type)

  def head_names(self) -> list[str]:
    return list(self.net.head_names)

  # --- data ---------------------------------------------------------------------------------------
  def _music(self, path: str, num_clips: int, seed: int) -> str:
    d = self.config.data
    return render_music(path, num_clips, seed, sample_rate=d.sample_rate,
                        seconds=d.source_seconds)

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
    m = self.config.model
    return self.net.init(rng, self.out_samples, m.n_mels, 2 * m.channels[-1])

  def loss(self, params, batch, rng, *, train: bool):
    del rng, train  # no dropout
    t = self.config.task
    return loev_loss(self.net, params, batch, self.mesh, temperature=t.temperature,
                     loss_impl=t.loss_impl)

  def flops_per_example(self) -> float | None:
    frames = self.net.frontend.num_frames(self.out_samples)
    return float(self.config.data.num_views * audio_cnn_flops(self.net.trunk, frames,
                                                               self.config.model.n_mels))

  # --- evaluation ---------------------------------------------------------------------------------
  def evaluation_views(self, seed: int = 1234) -> dict[str, np.ndarray]:
    """`data.evaluation_views` of the evaluation set (rendered on first use)."""
    c = self.config
    return evaluation_views(self._music(c.data.eval_dir, c.data.num_eval_clips, seed=1),
                            self.augment, seed)

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    views = self.evaluation_views()
    emb = {v: self.net.embed(params, views[v]) for v in ("clean", "pitch", "stretch")}
    finite_lib.require_scorable({f"{s} embedding ({v} clips)": x for v, spaces in emb.items()
                                 for s, x in spaces.items()})
    out, items = evaluate.evaluation_metrics(emb, views, self.config.task)
    evaluate.write_evaluation(out_dir, out, items)
    return out

  # --- export to serving --------------------------------------------------------------------------
  def export_towers(self, params) -> dict[str, TowerExport]:
    return export.export_towers(self.net, self.config.data, self.config.model, self.out_samples)
