"""LOEV / LOEV++ (Guinot et al. 2025) and the SimCLR baseline: `task.py` the task (audio CNN trunk,
SupCon heads, the evaluation), `probes.py` the probes on frozen features it reports (ridge, kernel
ridge, logistic, k-NN, bootstrap standard errors). Data: `data_pipelines.recipes.music_synth`."""
