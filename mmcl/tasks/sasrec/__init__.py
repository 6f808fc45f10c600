"""SASRec (Kang & McAuley, ICDM 2018): `task.py` the task, `loss.py` its BCE with sampled negatives;
the evaluation protocol is `mmcl.eval.seqrec`, the encoder `mmcl.models.seq_transformer`."""
