"""Cross-modal artist retrieval (Ferraro et al. 2023): `task.py` the task, `model.py` the projectors'
residual path, `loss.py` the multi-positive InfoNCE, `evaluate.py` catalogue ranking, baselines and
bias tables. Data: `data_pipelines.recipes.artists` (`mmcl data build artists`)."""
