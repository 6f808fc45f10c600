"""Pretrained text towers from local Hugging Face folders, without PyTorch and without downloads.

A BERT-family folder (what `save_pretrained` / sentence-transformers write) holds:
  config.json                 architecture, read into a `BertTower`: `model_type` "bert" (BERT,
                              MiniLM, BGE, E5, GTE, ...), "distilbert", "roberta" or
                              "xlm-roberta"; any other type is refused naming the file and key;
  model.safetensors           weights (or sharded: model.safetensors.index.json + shards), read
                              with `safetensors.numpy` and converted to the tower's parameters;
  tokenizer.json              the `tokenizers` pipeline (else vocab.txt + tokenizer_config.json
                              build the standard BERT WordPiece pipeline);
  modules.json, 1_Pooling/config.json, sentence_bert_config.json (optional, sentence-transformers)
                              the pooling mode and whether embeddings are L2-normalised.

One call does everything:
  vectors = encode_texts(folder, ["a sentence", ...])          # [N, D] float32
or, to keep the tower (e.g. to train it further or to embed under a mesh):
  pretrained = load_text_tower(folder)
  pretrained.tower.apply({"params": pretrained.params}, ids, mask=mask)

For a folder without sentence-transformers files the pooling defaults to the mean over tokens, not
normalised (pass `pool=` / `normalize=` to choose).

Under a mesh: `place_params(pretrained.params, mesh, "fsdp")` shards the weights by the same rules
as trained towers (`mmcl.parallel.sharding`); `encode(..., sharding=batch_sharding(mesh),
params=placed)` then runs every batch over all devices. `dtype="bfloat16"` computes in bf16 (the
weights stay float32, the outputs are float32).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from mmcl.models.bert import POOLS, BertTower
from mmcl.models.layers import Dtype
from mmcl.parallel import sharding as sharding_lib

PathLike = str | pathlib.Path
Params = dict[str, Any]

# Hugging Face `hidden_act` → `mmcl.models.layers.MLP_ACTIVATIONS`.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
# sentence-transformers pooling config keys → `BertTower.pool`.
ST_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                    "pooling_mode_max_tokens": "max",
                    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
ST_UNSUPPORTED_POOLING = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
# Sequence lengths are rounded up to a multiple of this, so a stream of batches compiles for a
# handful of shapes only; padding never changes a text's embedding (padding keys are masked).
LENGTH_BUCKET = 32


# --- files ----------------------------------------------------------------------------------------
def read_json(path: PathLike) -> Any:
  """Parses the JSON file at `path`, naming the file in any error."""
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"expected the file {path}; it does not exist") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_safetensors(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a safetensors state dict into numpy arrays.

  Args:
    path: a `.safetensors` file, or a folder holding `model.safetensors` or a sharded
      `model.safetensors.index.json` (whose `weight_map` names the shard of every tensor).

  Returns:
    {name: array} with the names and dtypes stored in the file(s).
  """
  from safetensors.numpy import load_file  # a dependency of this module only, not of the towers

  path = pathlib.Path(path)
  if path.is_dir():
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
      path = single
    elif index.is_file():
      shards = sorted(set(read_json(index)["weight_map"].values()))
      state: dict[str, np.ndarray] = {}
      for shard in shards:
        state.update(load_file(str(path / shard)))
      return state
    else:
      raise FileNotFoundError(
          f"{path}: expected model.safetensors or model.safetensors.index.json in the folder "
          f"(PyTorch .bin checkpoints are not read: convert them to safetensors first)")
  if not path.is_file():
    raise FileNotFoundError(f"expected a safetensors file at {path}; it does not exist")
  return load_file(str(path))


def overlay_params(params: Params, loaded: Mapping[str, Any], *, where: str = "params") -> Params:
  """Replaces the leaves of `params` that `loaded` has, checking shapes; returns a new tree.

  Use it to put pretrained weights into a freshly initialised tree that also holds new parts
  (e.g. a projection head): `overlay_params(tower.init(...)["params"], loaded)`.

  Args:
    params: nested dict of arrays (the full tree).
    loaded: nested dict whose every leaf path exists in `params` with the same shape.
    where: a name for error messages.

  Returns:
    A copy of `params` with loaded leaves (cast to the original leaf dtypes).
  """
  out = dict(params)
  for key, value in loaded.items():
    path = f"{where}/{key}"
    if key not in params:
      raise KeyError(f"overlay_params: '{path}' is not in the target tree; it has "
                     f"{sorted(params)}")
    if isinstance(value, Mapping):
      if not isinstance(params[key], Mapping):
        raise ValueError(f"overlay_params: '{path}' is a leaf in the target, a subtree in loaded")
      out[key] = overlay_params(params[key], value, where=path)
    else:
      target = params[key]
      if tuple(np.shape(value)) != tuple(np.shape(target)):
        raise ValueError(f"overlay_params: '{path}' has shape {tuple(np.shape(value))}, the "
                         f"target expects {tuple(np.shape(target))}")
      out[key] = jnp.asarray(value, dtype=target.dtype)
  return out


def check_params_match(module: Any, params: Params, *sample_args: Any, where: str) -> None:
  """Raises if `params` does not have exactly the paths and shapes `module.init` would create.

  Args:
    module: a Flax module.
    params: the candidate "params" collection.
    *sample_args: inputs for an abstract `module.init` (only shapes matter).
    where: the weights' source (file), for the message.
  """
  abstract = jax.eval_shape(module.init, jax.random.key(0), *sample_args)["params"]
  expected = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(v.shape)
              for p, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  found = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(v))
           for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  wrong = sorted(p for p in set(expected) & set(found) if expected[p] != found[p])
  if missing or extra or wrong:
    details = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "",
               ", ".join(f"{p}: expected {expected[p]}, converted {found[p]}" for p in wrong)]
    raise ValueError(f"{where}: converted parameters do not fit {type(module).__name__}: "
                     + "; ".join(d for d in details if d))


# --- BERT-family weights --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Family:
  """How one Hugging Face `model_type` maps onto `BertTower`.

  Attributes:
    config_keys: BertTower attribute → config.json key (the names differ in DistilBERT).
    layer: the prefix of block i's tensors; names: our sub-layer → the checkpoint's module name.
    token_types: whether the checkpoint has a token-type table.
    position_offset: "pad+1" for RoBERTa's numbering of positions from pad_token_id + 1.
  """
  config_keys: Mapping[str, str]
  layer: str
  names: Mapping[str, str]
  token_types: bool = True
  position_offset: str | None = None


_BERT_KEYS = {"width": "hidden_size", "depth": "num_hidden_layers",
              "num_heads": "num_attention_heads", "mlp_dim": "intermediate_size",
              "activation": "hidden_act"}
_BERT_NAMES = {"query": "attention.self.query", "key": "attention.self.key",
               "value": "attention.self.value", "out": "attention.output.dense",
               "ln_attn": "attention.output.LayerNorm", "fc1": "intermediate.dense",
               "fc2": "output.dense", "ln_mlp": "output.LayerNorm"}
FAMILIES: dict[str, _Family] = {
    "bert": _Family(_BERT_KEYS, "encoder.layer.{i}.", _BERT_NAMES),
    "roberta": _Family(_BERT_KEYS, "encoder.layer.{i}.", _BERT_NAMES, position_offset="pad+1"),
    "xlm-roberta": _Family(_BERT_KEYS, "encoder.layer.{i}.", _BERT_NAMES,
                           position_offset="pad+1"),
    "distilbert": _Family(
        {"width": "dim", "depth": "n_layers", "num_heads": "n_heads", "mlp_dim": "hidden_dim",
         "activation": "activation"},
        "transformer.layer.{i}.",
        {"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
         "out": "attention.out_lin", "ln_attn": "sa_layer_norm", "fc1": "ffn.lin1",
         "fc2": "ffn.lin2", "ln_mlp": "output_layer_norm"},
        token_types=False),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def model_family(config: Mapping[str, Any], *, where: str = "config.json") -> str:
  """The `model_type` of a config.json if this loader reads it; a clear error otherwise."""
  model_type = config.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"{where}: key 'model_type' is {model_type!r}, which this loader does not "
                     f"read; supported: {SUPPORTED_MODEL_TYPES} (BERT, MiniLM, BGE, E5, GTE, "
                     "DistilBERT, RoBERTa, XLM-R, ...)")
  return model_type


def bert_tower_from_hf_config(config: Mapping[str, Any], *, pool: str = "mean",
                              normalize: bool = False, embed_dim: int | None = None,
                              dtype: Dtype | str = jnp.float32, where: str = "config.json",
                              **overrides: Any) -> BertTower:
  """Builds the `BertTower` that a Hugging Face BERT-family config.json describes.

  Args:
    config: the parsed config.json (`model_type` one of `SUPPORTED_MODEL_TYPES`).
    pool: pooling mode, one of `mmcl.models.bert.POOLS`.
    normalize: L2-normalise the output.
    embed_dim: optional new projection width (its weights are not in the checkpoint).
    dtype: compute dtype (jnp dtype, or "float32" / "bfloat16").
    where: the file, for error messages.
    **overrides: further `BertTower` attributes (dropout, remat, attention_implementation, ...).

  Raises:
    ValueError: for a model type or an option this tower does not implement, naming the key.
  """
  family = FAMILIES[model_family(config, where=where)]
  position = config.get("position_embedding_type", "absolute")
  if position != "absolute":
    raise ValueError(f"{where}: key 'position_embedding_type' is {position!r}; only 'absolute' "
                     "is supported")
  act_key = family.config_keys["activation"]
  act = config.get(act_key, "gelu")
  if act not in HF_ACTIVATIONS:
    raise ValueError(f"{where}: key {act_key!r} is {act!r}, not supported; known: "
                     f"{sorted(HF_ACTIVATIONS)}")
  if pool not in POOLS:
    raise ValueError(f"pooling {pool!r} is not supported; expected one of {POOLS}")
  keys = family.config_keys
  try:
    pad_id = int(config.get("pad_token_id", 0) or 0)
    return BertTower(
        vocab_size=int(config["vocab_size"]), max_position=int(config["max_position_embeddings"]),
        type_vocab_size=int(config.get("type_vocab_size", 2)) if family.token_types else 0,
        width=int(config[keys["width"]]), depth=int(config[keys["depth"]]),
        num_heads=int(config[keys["num_heads"]]), mlp_dim=int(config[keys["mlp_dim"]]),
        activation=HF_ACTIVATIONS[act],
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)), pad_id=pad_id,
        position_offset=pad_id + 1 if family.position_offset == "pad+1" else 0, pool=pool,
        embed_dim=embed_dim, normalize=normalize, dtype=as_dtype(dtype), **overrides)
  except KeyError as e:
    raise ValueError(f"{where}: missing key {e.args[0]!r} needed to build the "
                     f"{config['model_type']} tower") from None


def as_dtype(dtype: Dtype | str) -> Dtype:
  """"float32" / "bfloat16" (config and command-line spelling) or a jnp dtype → the jnp dtype."""
  if isinstance(dtype, str):
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"compute dtype {dtype!r}: expected 'float32' or 'bfloat16'")
    return jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  return dtype


def _find_prefix(state: Mapping[str, np.ndarray], suffix: str, where: str) -> str:
  """The common prefix (e.g. "", "bert.") of the keys, found from the key ending with `suffix`."""
  hits = [k[: -len(suffix)] for k in state if k.endswith(suffix)]
  if len(hits) != 1:
    raise ValueError(f"{where}: expected exactly one tensor named '*{suffix}', found {len(hits)} "
                     f"({hits[:4]}); is this a checkpoint of the expected architecture?")
  return hits[0]


class _StateReader:
  """Pops tensors from a state dict by name, so that left-over tensors can be reported."""

  def __init__(self, state: Mapping[str, np.ndarray], prefix: str, where: str):
    self.state, self.prefix, self.where = state, prefix, where
    self.used: set[str] = set()

  def has(self, name: str) -> bool:
    return self.prefix + name in self.state

  def get(self, name: str, *alternatives: str) -> np.ndarray:
    for candidate in (name, *alternatives):
      key = self.prefix + candidate
      if key in self.state:
        self.used.add(key)
        return np.asarray(self.state[key], dtype=np.float32)
    raise KeyError(f"{self.where}: tensor '{self.prefix}{name}' not found")

  def layer_norm(self, name: str) -> dict[str, np.ndarray]:
    # Old (TF-converted) checkpoints call LayerNorm parameters gamma / beta.
    return {"scale": self.get(f"{name}.weight", f"{name}.gamma"),
            "bias": self.get(f"{name}.bias", f"{name}.beta")}

  def linear(self, name: str) -> dict[str, np.ndarray]:
    """torch Linear weight [out, in] → Flax Dense kernel [in, out]."""
    return {"kernel": self.get(f"{name}.weight").T, "bias": self.get(f"{name}.bias")}

  def unused(self) -> list[str]:
    return sorted(k for k in self.state if k.startswith(self.prefix) and k not in self.used)


def bert_params_from_state_dict(state: Mapping[str, np.ndarray], tower: BertTower, *,
                                where: str = "model.safetensors",
                                model_type: str = "bert") -> Params:
  """Converts a Hugging Face BERT-family state dict to `tower`'s parameters (without `head`).

  Accepts the bare model names and prefixed ones ("bert.", "roberta.", "distilbert." of the task
  models); the HF pooler and task heads are ignored. Linear weights are transposed ([out, in] →
  [in, out]); the query/key/value weights are fused into the `[W, 3, heads, head_dim]` kernel of
  `MultiHeadSelfAttention` (head h owns columns h·Dh … (h+1)·Dh − 1 in both layouts).

  Args:
    state: {name: array} as read by `load_safetensors`.
    tower: the module the parameters are for (its width, depth and heads).
    where: the weights' file, for error messages.
    model_type: the config.json `model_type` (one of `SUPPORTED_MODEL_TYPES`): the tensor names.

  Returns:
    {"embeddings": ..., "encoder": ...} float32 numpy arrays, shaped like `tower.init`'s.

  Raises:
    KeyError / ValueError: for a missing tensor, a tensor of the wrong shape, or unexpected
      encoder tensors (an architecture variant this tower does not implement).
  """
  family = FAMILIES[model_family({"model_type": model_type}, where=where)]
  prefix = _find_prefix(state, "embeddings.word_embeddings.weight", where)
  r = _StateReader(state, prefix, where)
  width, heads = tower.width, tower.num_heads
  head_dim = width // heads
  embeddings = {"word": {"embedding": r.get("embeddings.word_embeddings.weight")},
                "position": {"embedding": r.get("embeddings.position_embeddings.weight")},
                "ln": r.layer_norm("embeddings.LayerNorm")}
  if tower.type_vocab_size:
    embeddings["token_type"] = {"embedding": r.get("embeddings.token_type_embeddings.weight")}
  params: Params = {"embeddings": embeddings, "encoder": {}}
  n = family.names
  for i in range(tower.depth):
    p = family.layer.format(i=i)
    qkv = [r.linear(p + n[name]) for name in ("query", "key", "value")]
    out = r.linear(p + n["out"])
    params["encoder"][f"block_{i}"] = {
        "attn": {
            "qkv": {"kernel": np.stack([t["kernel"] for t in qkv], 1).reshape(
                        width, 3, heads, head_dim),
                    "bias": np.stack([t["bias"] for t in qkv]).reshape(3, heads, head_dim)},
            "out": {"kernel": out["kernel"].reshape(heads, head_dim, width), "bias": out["bias"]},
        },
        "ln_attn": r.layer_norm(p + n["ln_attn"]),
        "fc1": r.linear(p + n["fc1"]),
        "fc2": r.linear(p + n["fc2"]),
        "ln_mlp": r.layer_norm(p + n["ln_mlp"]),
    }
  # Not part of the tower: the HF pooler, the position-id buffers, task heads outside the prefix.
  unused = [k for k in r.unused() if not k.startswith((prefix + "pooler.",
                                                       prefix + "embeddings.position_ids",
                                                       prefix + "embeddings.token_type_ids"))]
  if unused:
    raise ValueError(f"{where}: tensors the {model_type} tower does not use: {unused[:8]}"
                     f"{' ...' if len(unused) > 8 else ''} (an architecture variant, or a "
                     f"layer count below the checkpoint's)")
  return params


def place_params(params: Params, mesh: jax.sharding.Mesh,
                 rules: str | Sequence[Any] = "replicate", *,
                 min_fsdp_size: int = 2**14) -> Params:
  """Puts a (pretrained) tower's parameters on `mesh` by the trainer's sharding rules.

  Args:
    params: the "params" collection (host or device arrays).
    mesh: the device mesh.
    rules: a strategy of `mmcl.parallel.sharding.STRATEGIES` ("replicate", "fsdp": the config key
      `mesh.param_sharding` of trained towers) or a rule list [(regex, spec), ...].
    min_fsdp_size: parameters with fewer elements stay replicated under "fsdp".

  Returns:
    The same tree of jax arrays with `NamedSharding`s (`sharding.spec_for` per leaf).
  """
  if isinstance(rules, str):
    if rules not in sharding_lib.STRATEGIES:
      raise ValueError(f"param sharding {rules!r}: expected one of "
                       f"{sorted(sharding_lib.STRATEGIES)} or a rule list")
    rules = sharding_lib.STRATEGIES[rules]
  leaves, treedef = jax.tree.flatten(params)
  paths = sharding_lib.tree_paths(params)
  shardings = [jax.sharding.NamedSharding(
      mesh, sharding_lib.spec_for(path, np.shape(x), rules, mesh, min_fsdp_size))
      for path, x in zip(paths, leaves)]
  return jax.tree.unflatten(treedef, [jax.device_put(x, s) for x, s in zip(leaves, shardings)])


# --- pooling and tokenizer ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SentencePooling:
  """How token features become a sentence embedding (sentence-transformers' modules).

  Attributes:
    pool: one of `mmcl.models.bert.POOLS`.
    normalize: L2-normalise the pooled vector.
    max_seq_length: the folder's own token limit (sentence_bert_config.json), if it states one.
  """
  pool: str = "mean"
  normalize: bool = False
  max_seq_length: int | None = None


def _pool_from_st_config(config: Mapping[str, Any], where: str) -> str:
  if "pooling_mode" in config and isinstance(config["pooling_mode"], str):
    # Newer sentence-transformers write one string ("mean", "cls", "max", "mean_sqrt_len_tokens").
    mode = {"mean_sqrt_len_tokens": "mean_sqrt_len"}.get(config["pooling_mode"],
                                                          config["pooling_mode"])
    if mode not in POOLS:
      raise ValueError(f"{where}: pooling_mode {config['pooling_mode']!r} is not supported; "
                       f"supported: {POOLS}")
    return mode
  for key in ST_UNSUPPORTED_POOLING:
    if config.get(key):
      raise ValueError(f"{where}: {key} is not supported; supported: {sorted(ST_POOLING_FLAGS)}")
  modes = [mode for key, mode in ST_POOLING_FLAGS.items() if config.get(key)]
  if len(modes) != 1:
    raise ValueError(f"{where}: expected exactly one pooling mode set to true among "
                     f"{sorted(ST_POOLING_FLAGS)}, found {modes} (concatenated poolings are not "
                     "supported)")
  return modes[0]


def read_sentence_pooling(folder: PathLike) -> SentencePooling:
  """Reads the pooling of a sentence-transformers folder.

  modules.json lists the pipeline: a Transformer, a Pooling (its config.json in the module's
  folder) and optionally Normalize. Without modules.json, `1_Pooling/config.json` alone is used
  (no normalisation); without either, mean pooling without normalisation.

  Raises:
    ValueError: for modules this loader does not implement (e.g. Dense, LayerNorm after pooling).
  """
  folder = pathlib.Path(folder)
  max_seq = None
  if (folder / "sentence_bert_config.json").is_file():
    max_seq = read_json(folder / "sentence_bert_config.json").get("max_seq_length")
  modules_file = folder / "modules.json"
  if modules_file.is_file():
    pool, normalize = None, False
    for module in read_json(modules_file):
      kind = str(module.get("type", "")).rsplit(".", 1)[-1]
      if kind == "Transformer":
        continue
      if kind == "Pooling":
        config_file = folder / module.get("path", "") / "config.json"
        pool = _pool_from_st_config(read_json(config_file), str(config_file))
      elif kind == "Normalize":
        normalize = True
      else:
        raise ValueError(f"{modules_file}: module type {module.get('type')!r} is not supported "
                         "(supported: Transformer, Pooling, Normalize)")
    if pool is None:
      raise ValueError(f"{modules_file}: no Pooling module listed")
    return SentencePooling(pool, normalize, max_seq)
  pooling_file = folder / "1_Pooling" / "config.json"
  if pooling_file.is_file():
    return SentencePooling(_pool_from_st_config(read_json(pooling_file), str(pooling_file)),
                           False, max_seq)
  return SentencePooling("mean", False, max_seq)


def load_tokenizer(folder: PathLike, *, max_length: int) -> Tokenizer:
  """The folder's tokenizer, truncating to `max_length` tokens (special tokens included), unpadded.

  tokenizer.json is used when present; otherwise vocab.txt builds the standard BERT WordPiece
  pipeline (BertNormalizer with tokenizer_config.json's `do_lower_case`, default True; BERT
  pre-tokenizer; [CLS] … [SEP]).
  """
  folder = pathlib.Path(folder)
  if (folder / "tokenizer.json").is_file():
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
  elif (folder / "vocab.txt").is_file():
    tokenizer = _wordpiece_tokenizer(folder)
  else:
    raise FileNotFoundError(f"{folder}: expected tokenizer.json or vocab.txt")
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length)
  return tokenizer


def _wordpiece_tokenizer(folder: pathlib.Path) -> Tokenizer:
  """The BERT tokenizer built from vocab.txt (as transformers' BertTokenizerFast does)."""
  from tokenizers import models, normalizers, pre_tokenizers, processors

  config_file = folder / "tokenizer_config.json"
  config = read_json(config_file) if config_file.is_file() else {}
  tokenizer = Tokenizer(models.WordPiece.from_file(
      str(folder / "vocab.txt"), unk_token=config.get("unk_token", "[UNK]")))
  tokenizer.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
      strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  cls, sep = config.get("cls_token", "[CLS]"), config.get("sep_token", "[SEP]")
  ids = {t: tokenizer.token_to_id(t) for t in (cls, sep)}
  if None in ids.values():
    raise ValueError(f"{folder / 'vocab.txt'}: special tokens {cls!r} / {sep!r} not in the vocab")
  tokenizer.post_processor = processors.BertProcessing((sep, ids[sep]), (cls, ids[cls]))
  return tokenizer


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], *, pad_id: int,
             length_bucket: int = LENGTH_BUCKET) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises `texts` into a right-padded id matrix and its attention mask.

  Args:
    tokenizer: from `load_tokenizer` (its truncation bounds the length).
    texts: N strings (empty strings give [CLS] [SEP]).
    pad_id: id written into padding positions.
    length_bucket: L is the longest row rounded up to a multiple of this (fewer distinct shapes
      to compile; the extra padding does not change the embeddings).

  Returns:
    ids: [N, L] int32; mask: [N, L] bool, True for real tokens.
  """
  return _pack([e.ids for e in _encode(tokenizer, texts)], pad_id=pad_id,
               max_length=(tokenizer.truncation or {}).get("max_length"),
               length_bucket=length_bucket)


def _encode(tokenizer: Tokenizer, texts: Sequence[str]) -> list[Any]:
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"tokenize: text {i} is a {type(text).__name__}, expected str")
  return tokenizer.encode_batch(list(texts))


def _pack(sequences: Sequence[Sequence[int]], *, pad_id: int, max_length: int | None,
          length_bucket: int = LENGTH_BUCKET) -> tuple[np.ndarray, np.ndarray]:
  """N id lists → (ids [N, L] int32 right-padded with pad_id, mask [N, L] bool); L is the longest
  row rounded up to a multiple of `length_bucket`, but not beyond `max_length`."""
  longest = max((len(s) for s in sequences), default=1)
  length = -(-longest // length_bucket) * length_bucket
  if max_length is not None:
    length = min(length, max(max_length, longest))
  ids = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), bool)
  for row, seq in enumerate(sequences):
    ids[row, :len(seq)] = seq
    mask[row, :len(seq)] = True
  return ids, mask


@functools.partial(jax.jit, static_argnums=0)
def _embed(tower: BertTower, params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """ids, mask: [B, L] → [B, D] float32. The module is static (hashable by its attributes), so
  every load of the same architecture reuses the compiled function."""
  return tower.apply({"params": params}, ids, mask=mask)


# --- the one-call entry points --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PretrainedTextTower:
  """A loaded text tower: module, parameters, tokenizer and token limit.

  Attributes:
    folder: the folder it was loaded from.
    tower: the `BertTower` (with the folder's pooling and normalisation).
    params: its "params" collection (jax arrays).
    tokenizer: truncating to `max_length` tokens.
    max_length: tokens per text, special tokens included.
  """
  folder: pathlib.Path
  tower: BertTower
  params: Params
  tokenizer: Tokenizer
  max_length: int

  @property
  def dim(self) -> int:
    """Output width D."""
    return self.tower.embed_dim or self.tower.width

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """texts: N strings → (ids [N, L] int32, mask [N, L] bool), L ≤ max_length."""
    return tokenize(self.tokenizer, texts, pad_id=self.tower.pad_id)

  def encode(self, texts: Sequence[str], *, batch_size: int = 64,
             sharding: jax.sharding.Sharding | None = None, params: Params | None = None
             ) -> np.ndarray:
    """Embeds texts in batches, longest first (so each batch carries little padding).

    Args:
      texts: N strings.
      batch_size: texts per forward pass.
      sharding: optional sharding of the [B, L] inputs (e.g. `mmcl.parallel.mesh.batch_sharding`);
        batches are padded to a multiple of its device count.
      params: parameters to use instead of `self.params` (e.g. sharded ones).

    Returns:
      [N, D] float32, in the order of `texts`.
    """
    if batch_size < 1:
      raise ValueError(f"encode: batch_size must be ≥ 1, found {batch_size}")
    texts = list(texts)
    params = self.params if params is None else params
    out = np.zeros((len(texts), self.dim), np.float32)
    if not texts:
      return out
    sequences = [e.ids for e in _encode(self.tokenizer, texts)]
    order = np.argsort(-np.array([len(s) for s in sequences]), kind="stable")
    multiple = 8 if sharding is None else math.lcm(8, len(sharding.device_set))
    for start in range(0, len(texts), batch_size):
      rows = order[start:start + batch_size]
      ids, mask = _pack([sequences[i] for i in rows], pad_id=self.tower.pad_id,
                        max_length=self.max_length)
      # Pad the batch to a multiple of `multiple` rows (shape reuse, even sharding); padding rows
      # hold one valid token so that no attention row is fully masked.
      padded = -(-len(rows) // multiple) * multiple
      ids = np.pad(ids, ((0, padded - len(rows)), (0, 0)), constant_values=self.tower.pad_id)
      mask = np.pad(mask, ((0, padded - len(rows)), (0, 0)))
      mask[len(rows):, 0] = True
      if sharding is not None:
        ids, mask = jax.device_put(ids, sharding), jax.device_put(mask, sharding)
      out[rows] = np.asarray(_embed(self.tower, params, ids, mask))[:len(rows)]
    return out


def load_text_params(folder: PathLike, *, pool: str | None = None,
                     normalize: bool | None = None, dtype: Dtype | str = jnp.float32,
                     **overrides: Any) -> tuple[BertTower, Params]:
  """The `BertTower` of a BERT-family folder and its parameters (no tokenizer needed).

  Args:
    folder: a folder with config.json (`model_type` one of `SUPPORTED_MODEL_TYPES`) and
      model.safetensors (or a sharded index); pooling from the sentence-transformers files.
    pool, normalize: override the folder's pooling / normalisation.
    dtype: compute dtype (parameters stay float32).
    **overrides: further `BertTower` attributes.

  Returns:
    (tower, params): params are float32 numpy arrays shaped like `tower.init`'s.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"expected a Hugging Face model folder at {folder}; not a directory")
  if overrides.pop("embed_dim", None) is not None:
    raise ValueError("load_text_tower: embed_dim adds a new head, absent from the checkpoint; "
                     "build it with bert_tower_from_hf_config and overlay_params")
  config_file = folder / "config.json"
  config = read_json(config_file)
  model_type = model_family(config, where=str(config_file))
  pooling = read_sentence_pooling(folder)
  tower = bert_tower_from_hf_config(
      config, pool=pooling.pool if pool is None else pool,
      normalize=pooling.normalize if normalize is None else normalize, dtype=dtype,
      where=str(config_file), **overrides)
  state = load_safetensors(folder)
  params = bert_params_from_state_dict(state, tower, where=str(folder), model_type=model_type)
  check_params_match(tower, params, jnp.zeros((1, 2), jnp.int32), where=str(folder))
  return tower, params


def load_text_tower(folder: PathLike, *, max_length: int = 256, pool: str | None = None,
                    normalize: bool | None = None, dtype: Dtype | str = jnp.float32,
                    **overrides: Any) -> PretrainedTextTower:
  """Loads a BERT-family Hugging Face folder into a `BertTower`, its parameters and tokenizer.

  Args:
    folder: the model folder (config.json, model.safetensors, tokenizer.json or vocab.txt, and
      optionally the sentence-transformers pooling files).
    max_length: tokens per text including [CLS] and [SEP]; capped at the model's
      `max_position_embeddings` (less RoBERTa's position offset). Longer texts are truncated
      (as sentence-transformers does).
    pool: override the folder's pooling (one of `mmcl.models.bert.POOLS`).
    normalize: override the folder's normalisation.
    dtype: compute dtype, jnp.float32 / jnp.bfloat16 or "float32" / "bfloat16" (parameters stay
      float32; outputs are float32).
    **overrides: further `BertTower` attributes (dropout, remat, attention_implementation, ...).

  Returns:
    The `PretrainedTextTower`.
  """
  if max_length < 2:
    raise ValueError(f"load_text_tower: max_length must be ≥ 2 ([CLS] and [SEP]), found "
                     f"{max_length}")
  tower, params = load_text_params(folder, pool=pool, normalize=normalize, dtype=dtype,
                                   **overrides)
  folder = pathlib.Path(folder)
  max_length = min(max_length, tower.max_position - tower.position_offset)
  tokenizer = load_tokenizer(folder, max_length=max_length)
  if tokenizer.get_vocab_size() > tower.vocab_size:
    raise ValueError(f"{folder}: the tokenizer has {tokenizer.get_vocab_size()} ids but "
                     f"config.json vocab_size is {tower.vocab_size}")
  return PretrainedTextTower(folder, tower, jax.tree.map(jnp.asarray, params), tokenizer,
                             max_length)


def encode_texts(folder: PathLike, texts: Sequence[str], *, max_length: int = 256,
                 batch_size: int = 64, dtype: Dtype | str = jnp.float32) -> np.ndarray:
  """Sentence embeddings of `texts` with the BERT-family model in `folder`.

  Tokenises (truncating to `max_length` tokens), runs the tower and applies the folder's pooling
  and normalisation, as sentence-transformers' `SentenceTransformer(folder).encode(texts)` does.

  Args:
    folder: a local Hugging Face / sentence-transformers folder (see the module docstring).
    texts: N strings; empty strings and texts longer than `max_length` tokens are fine.
    max_length: tokens per text including [CLS] and [SEP].
    batch_size: texts per forward pass.
    dtype: compute dtype ("float32" or "bfloat16"); the output is float32 either way.

  Returns:
    [N, D] float32.
  """
  return load_text_tower(folder, max_length=max_length, dtype=dtype).encode(
      texts, batch_size=batch_size)
