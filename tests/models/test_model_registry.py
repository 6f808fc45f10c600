"""Tests for the model registry."""
import flax.linen as nn
import pytest

from mmcl.models import get_model, get_model_class, list_models, register_model
from mmcl.models.mlp import MLP
from mmcl.models.text_transformer import TextTransformer
from mmcl.models.vit import ViT


def test_builtin_models_are_registered():
  assert {"vit", "text_transformer", "mlp"} <= set(list_models())
  assert get_model_class("vit") is ViT
  assert get_model_class("text_transformer") is TextTransformer
  model = get_model("mlp", hidden_dims=(4,), out_dim=2, name="artist_proj")
  assert isinstance(model, MLP) and model.out_dim == 2 and model.name == "artist_proj"


def test_unknown_name_lists_known_models():
  with pytest.raises(KeyError, match="Unknown model 'vitt'.*mlp, text_transformer, vit"):
    get_model("vitt")


def test_unknown_argument_lists_fields():
  with pytest.raises(TypeError, match=r"got unknown argument\(s\) \['widht'\].*'width'"):
    get_model("vit", widht=32)


def test_duplicate_registration_is_rejected():
  with pytest.raises(ValueError, match="'vit' is already registered"):
    @register_model("vit")
    class Other(nn.Module):  # noqa: F841
      pass
