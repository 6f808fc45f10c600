"""Demure (Yao et al., arXiv:2305.01915): `task.py` the task, `model.py` the multi-modal SASRec,
`loss.py` the noise flags, `data.py` planted noise, `evaluate.py` noise-detection statistics,
`__main__.py` the item-score tools (`python -m mmcl.tasks.demure ...`). Item features are
`data_pipelines.featurize`, the protocol `mmcl.eval.seqrec`."""
