"""Submitting mmcl runs to a cluster scheduler: `mmcl launch` and `mmcl sweep --launcher slurm`.

  common.py   resolved configs, the environment a job inherits, shell quoting
  slurm.py    sbatch scripts (training, the evaluator, sweep arrays and their collector), submission
"""
