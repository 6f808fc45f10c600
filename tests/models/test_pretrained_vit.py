"""Parity of `mmcl.pretrained.vit` with PyTorch ViTs in the open_clip and timm layouts.

open_clip cannot be imported here (its torchvision dependency fails beside the CPU torch), and no
pretrained image weights can be fetched, so the references are small PyTorch modules written below
with the state-dict names and forward passes of open_clip's `VisionTransformer` and timm's
`VisionTransformer`, randomly initialised, saved as safetensors and loaded into the Flax `ViT`.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from mmcl.pretrained.vit import load_vit, vit_from_state_dict

torch = pytest.importorskip("torch", reason="torch (the test extra) is needed for ViT parity")
nn = torch.nn
safetensors_torch = pytest.importorskip("safetensors.torch")

IMAGE, PATCH, WIDTH, DEPTH, HEADS, MLP, OUT = 32, 8, 64, 3, 4, 128, 24


class QuickGELU(nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class OpenClipBlock(nn.Module):
  """open_clip `ResidualAttentionBlock` (names ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj)."""

  def __init__(self, act):
    super().__init__()
    self.ln_1 = nn.LayerNorm(WIDTH)
    self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
    self.ln_2 = nn.LayerNorm(WIDTH)
    self.mlp = nn.Sequential()
    self.mlp.add_module("c_fc", nn.Linear(WIDTH, MLP))
    self.mlp.add_module("gelu", act())
    self.mlp.add_module("c_proj", nn.Linear(MLP, WIDTH))

  def forward(self, x):
    h = self.ln_1(x)
    x = x + self.attn(h, h, h, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class OpenClipViT(nn.Module):
  """open_clip `VisionTransformer` with pool_type "tok" and a learnable position table."""

  def __init__(self, act=nn.GELU):
    super().__init__()
    grid = IMAGE // PATCH
    self.conv1 = nn.Conv2d(3, WIDTH, PATCH, stride=PATCH, bias=False)
    self.class_embedding = nn.Parameter(torch.randn(WIDTH) * WIDTH ** -0.5)
    self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, WIDTH) * WIDTH ** -0.5)
    self.ln_pre = nn.LayerNorm(WIDTH)
    self.transformer = nn.Module()
    self.transformer.resblocks = nn.ModuleList([OpenClipBlock(act) for _ in range(DEPTH)])
    self.ln_post = nn.LayerNorm(WIDTH)
    self.proj = nn.Parameter(torch.randn(WIDTH, OUT) * WIDTH ** -0.5)

  def forward(self, x):  # x: [B, 3, H, W]
    x = self.conv1(x).flatten(2).transpose(1, 2)
    cls = self.class_embedding.expand(x.shape[0], 1, WIDTH)
    x = torch.cat([cls, x], 1) + self.positional_embedding
    x = self.ln_pre(x)
    for block in self.transformer.resblocks:
      x = block(x)
    return self.ln_post(x)[:, 0] @ self.proj


class TimmBlock(nn.Module):
  """timm `Block` (names norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), eps 1e-6."""

  def __init__(self):
    super().__init__()
    self.norm1 = nn.LayerNorm(WIDTH, eps=1e-6)
    self.attn = nn.Module()
    self.attn.qkv = nn.Linear(WIDTH, 3 * WIDTH)
    self.attn.proj = nn.Linear(WIDTH, WIDTH)
    self.norm2 = nn.LayerNorm(WIDTH, eps=1e-6)
    self.mlp = nn.Module()
    self.mlp.fc1 = nn.Linear(WIDTH, MLP)
    self.mlp.fc2 = nn.Linear(MLP, WIDTH)

  def forward(self, x):
    b, n, _ = x.shape
    qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, HEADS, WIDTH // HEADS)
    qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, heads, N, Dh]
    h = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    x = x + self.attn.proj(h.transpose(1, 2).reshape(b, n, WIDTH))
    return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class TimmViT(nn.Module):
  """timm `VisionTransformer` (class token, global_pool "token", no pre-norm, a classifier head)."""

  def __init__(self):
    super().__init__()
    grid = IMAGE // PATCH
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, WIDTH, PATCH, stride=PATCH)
    self.cls_token = nn.Parameter(torch.randn(1, 1, WIDTH) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, WIDTH) * 0.02)
    self.blocks = nn.ModuleList([TimmBlock() for _ in range(DEPTH)])
    self.norm = nn.LayerNorm(WIDTH, eps=1e-6)
    self.head = nn.Linear(WIDTH, 10)

  def forward_pre_logits(self, x):  # x: [B, 3, H, W] → [B, WIDTH]
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    return self.norm(x)[:, 0]


def _randomise(model, seed):
  """Perturbs every parameter (LayerNorm scales and biases included) so none is trivial."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _images(seed=0):
  return np.random.default_rng(seed).normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)


def _assert_close(out, ref):
  out, ref = np.asarray(out), np.asarray(ref)
  assert out.shape == ref.shape
  assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(out - ref).max()


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_open_clip_layout_matches_torch(tmp_path, act):
  torch.manual_seed(0)
  model = _randomise(OpenClipViT(nn.GELU if act == "gelu" else QuickGELU), 1)
  safetensors_torch.save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
  (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
      "quick_gelu": act == "quick_gelu",
      "vision_cfg": {"width": WIDTH, "head_width": WIDTH // HEADS, "layers": DEPTH}}}))
  loaded = load_vit(tmp_path / "vit.safetensors")  # heads and activation from the config file
  assert (loaded.format, loaded.image_size) == ("open_clip", IMAGE)
  assert loaded.tower.num_heads == HEADS and loaded.tower.activation == act
  assert loaded.tower.pre_norm and loaded.tower.layer_norm_eps == 1e-5
  x = _images()
  with torch.no_grad():
    ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  out = loaded.tower.apply({"params": loaded.params}, jnp.asarray(x))
  assert out.shape == (3, OUT)
  _assert_close(out, ref)


def test_full_clip_checkpoint_uses_the_visual_tensors():
  torch.manual_seed(0)
  model = _randomise(OpenClipViT(), 2)
  state = {f"visual.{k}": v.numpy() for k, v in model.state_dict().items()}
  # A full CLIP checkpoint also holds a text tower and the logit scale, outside "visual.".
  state.update({"token_embedding.weight": np.zeros((10, WIDTH), np.float32),
                "transformer.resblocks.0.ln_1.weight": np.ones(WIDTH, np.float32),
                "logit_scale": np.zeros((), np.float32)})
  loaded = vit_from_state_dict(state, num_heads=HEADS)
  x = _images(1)
  with torch.no_grad():
    ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  _assert_close(loaded.tower.apply({"params": loaded.params}, jnp.asarray(x)), ref)


def test_timm_layout_matches_torch(tmp_path):
  torch.manual_seed(0)
  model = _randomise(TimmViT(), 3)
  safetensors_torch.save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="num_heads"):
    load_vit(tmp_path)
  loaded = load_vit(tmp_path, num_heads=HEADS)
  assert loaded.format == "timm" and not loaded.tower.pre_norm
  assert loaded.tower.embed_dim == WIDTH  # the classifier is dropped: pre-logits features
  x = _images(2)
  with torch.no_grad():
    ref = model.forward_pre_logits(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  _assert_close(loaded.tower.apply({"params": loaded.params}, jnp.asarray(x)), ref)


def test_unsupported_variants_are_refused():
  torch.manual_seed(0)
  state = {k: v.numpy() for k, v in OpenClipViT().state_dict().items()}
  with_layer_scale = dict(state, **{"transformer.resblocks.0.ls_1.gamma": np.ones(WIDTH)})
  with pytest.raises(ValueError, match="ls_1"):
    vit_from_state_dict(with_layer_scale, num_heads=HEADS)
  with pytest.raises(ValueError, match="not divisible"):
    vit_from_state_dict(state, num_heads=5)
  with pytest.raises(ValueError, match="patch-embedding"):
    vit_from_state_dict({"foo.weight": np.zeros(3)}, num_heads=HEADS)


def test_open_clip_folder_under_the_mesh_in_bf16_and_as_a_features_tower(tmp_path, shapes_dir):
  """An open_clip folder embeds a dataset's image field like torch; fsdp-sharded weights on 8
  devices give the unsharded outputs; bf16 compute stays close to float32."""
  import jax

  from data_pipelines import image_text as data_lib
  from mmcl.pretrained.features import compute_features, read_features
  from mmcl.pretrained.text import place_params
  from mmcl.parallel.mesh import batch_sharding, make_mesh

  torch.manual_seed(0)
  model = _randomise(OpenClipViT(), 3)
  folder = tmp_path / "vit"
  folder.mkdir()
  safetensors_torch.save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
  mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
  (folder / "open_clip_config.json").write_text(json.dumps({
      "model_cfg": {"vision_cfg": {"width": WIDTH, "head_width": WIDTH // HEADS}},
      "preprocess_cfg": {"mean": mean, "std": std}}))
  loaded = load_vit(folder)

  # `mmcl features` on the shapes set's 32 px images (no resize needed) with the weights
  # fsdp-sharded over the 8 devices = the unsharded tower = torch, on the same pixels normalised
  # with the folder's mean / std.
  source = data_lib.open_source(shapes_dir, "test")
  pixels = np.stack([r["image"] for r in source.read_many(list(range(len(source))))])
  images = ((pixels / 255.0 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
  unsharded = np.asarray(jax.jit(loaded.tower.apply)({"params": loaded.params}, images))
  with torch.no_grad():
    _assert_close(unsharded, model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy())
  sharded = place_params(loaded.params, make_mesh(), "fsdp", min_fsdp_size=1)
  qkv = sharded["encoder"]["block_0"]["attn"]["qkv"]["kernel"]
  assert len(qkv.sharding.device_set) == 8 and not qkv.sharding.is_fully_replicated
  result = compute_features(folder, shapes_dir, "image", tmp_path / "emb", split="test",
                            batch_size=64, param_sharding="fsdp", progress=False)
  assert result.manifest["tower"]["layout"] == "open_clip"
  np.testing.assert_allclose(read_features(tmp_path / "emb").vectors, unsharded, atol=1e-5)
  out = jax.jit(loaded.tower.apply)({"params": sharded},
                                    jax.device_put(images, batch_sharding(make_mesh())))
  np.testing.assert_allclose(out, unsharded, atol=1e-5)

  bf16 = load_vit(folder, dtype=jnp.bfloat16)
  low = np.asarray(jax.jit(bf16.tower.apply)({"params": bf16.params}, images))
  assert low.dtype == np.float32
  cosine = np.sum(low * unsharded, 1) / (np.linalg.norm(low, axis=1)
                                         * np.linalg.norm(unsharded, axis=1))
  assert cosine.min() > 0.99
