"""mmcl: multimodal contrastive learning in JAX/Flax."""
