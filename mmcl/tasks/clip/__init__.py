"""CLIP (Radford et al. 2021): `task.py` the task (towers from `mmcl.models.tower_config`, the
symmetric InfoNCE or sigmoid loss of `mmcl.losses.sharded`, evaluation by `mmcl.eval.image_text`)."""
