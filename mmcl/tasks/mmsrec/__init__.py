"""MMSRec (Song et al., arXiv:2304.13277): `task.py` the task (combinatorial pretraining, cloze
fine-tuning), `data.py` the cold-start split; item features are `data_pipelines.featurize`, the
protocol `mmcl.eval.seqrec`."""
