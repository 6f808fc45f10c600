"""GCL, generalized contrastive learning for multi-field retrieval (Zhu et al., arXiv:2404.08535):
`task.py` the task, `model.py` the field fusion, `loss.py` the score-to-weight, `evaluate.py` the
reference evaluation. Data: `data_pipelines.recipes.products` / `fashion_search`, marqo-gs."""
