"""Flax (Linen) towers and heads. Importing this package registers every model by name."""
from mmcl.models import bert, mlp, text_transformer, vit  # noqa: F401  (registration side effect)
from mmcl.models.registry import get_model, get_model_class, list_models, register_model

__all__ = ["get_model", "get_model_class", "list_models", "register_model"]
