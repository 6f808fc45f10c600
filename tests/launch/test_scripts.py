"""What `mmcl launch` / `mmcl sweep --launcher slurm` write, the sweep tables, and bad input; no
cluster needed (tests/launch/test_slurm.py runs the jobs)."""
import csv
import json
import math
import pathlib
import subprocess

import pytest

from mmcl import cli
from mmcl import sweep as sweep_lib
from mmcl.launch import slurm
from mmcl.launch.common import load_config_json, resolve_config
from mmcl.parallel.mesh import launched_by_cluster

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "experiments/clip_shapes.py") + ":tiny"


def test_dry_run_writes_a_self_contained_training_script(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  wd = tmp_path / "run"
  rc = cli.main(["launch", "--launcher", "slurm", "--config", TINY, "--workdir", str(wd),
                 "--nodes", "2", "--tasks-per-node", "2", "--gpus-per-node", "8",
                 "--partition", "gpu", "--time", "01:00:00", "--sbatch-arg=--exclusive",
                 "--setup", "module load cuda", "--set", "optim.lr=0.01", "--eval",
                 "--eval-gpus", "1", "--dry-run"])
  assert rc == 0
  assert "not submitted" in capsys.readouterr().out
  text = (wd / "slurm" / "train.sbatch").read_text()
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00", "#SBATCH --requeue",
               "#SBATCH --signal=B:TERM@120", "#SBATCH --exclusive", "module load cuda",
               "export XLA_FLAGS=--xla_force_host_platform_device_count=2",
               "scontrol requeue", "JAX_LOCAL_DEVICE_IDS=$(seq -s, $((SLURM_LOCALID * 4))"):
    assert line in text, line
  assert subprocess.run(["bash", "-n", str(wd / "slurm" / "train.sbatch")]).returncode == 0
  # The embedded config is the resolved one: the --config file with every --set applied.
  embedded = text.split("<<'MMCL_CONFIG_EOF'\n", 1)[1].split("\nMMCL_CONFIG_EOF", 1)[0]
  (tmp_path / "c.json").write_text(embedded)
  assert load_config_json(tmp_path / "c.json").to_dict() == \
      resolve_config(TINY, ["optim.lr=0.01"]).to_dict()
  ev = (wd / "slurm" / "eval.sbatch").read_text()
  assert "--watch" in ev and "#SBATCH --gpus-per-node=1" in ev and "#SBATCH --ntasks=1" in ev


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-node", "3", "--tasks-per-node", "2"], "--gpus-per-node 3 is not a multiple"),
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--sbatch-arg", "exclusive"], "is not an sbatch option"),
    (["--set", "optim.lr=fast"], "optim.lr"),
    (["--env", "1X=2"], "NAME=VALUE"),
])
def test_bad_launch_input_is_one_line_exit_2(tmp_path, capsys, args, message):
  rc = cli.main(["launch", "--launcher", "slurm", "--config", TINY, "--workdir",
                 str(tmp_path / "w"), "--dry-run", *args])
  err = capsys.readouterr().err
  assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_missing_sbatch_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))
  rc = cli.main(["launch", "--launcher", "slurm", "--config", TINY,
                 "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err
  assert rc == 2 and "sbatch not found" in err and len(err.strip().splitlines()) == 1


def test_sweep_array_script_lists_only_unfinished_elements(tmp_path):
  elements = sweep_lib.plan(TINY, tmp_path, grids=["optim.lr=0.001,0.002"], overrides=[],
                            seeds=[0, 1, 2])
  assert len(elements) == 6 and elements[4]["workdir"].endswith("optim.lr=0.002/seed1")
  assert elements[4]["overrides"] == ["optim.lr=0.002", "seed=1"]
  text = slurm.array_script(root=tmp_path, elements=elements, indices=[0, 1, 2, 4],
                            config_spec=TINY, evaluate=True, res=slurm.Resources(),
                            chdir=str(REPO), max_parallel=2)
  assert "#SBATCH --array=0-2,4%2" in text and 'case "$SLURM_ARRAY_TASK_ID" in' in text
  assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
  # One task: the training process evaluates its final checkpoint itself.
  assert '"${sets[@]}" --eval' in text and " eval --workdir" not in text
  two = slurm.array_script(root=tmp_path, elements=elements, indices=[0], config_spec=TINY,
                           evaluate=True, res=slurm.Resources(nodes=2), chdir=str(REPO),
                           max_parallel=None)
  assert "--eval" not in two and " eval --workdir" in two  # several tasks: a process of its own
  assert slurm.compress_indices([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"


def test_sweep_options_are_checked(tmp_path, capsys):
  assert cli.main(["sweep", "--config", TINY, "--workdir", str(tmp_path), "--grid", "optim.lr=1",
                   "--seeds", "0,x"]) == 2
  assert "--seeds '0,x'" in capsys.readouterr().err
  assert cli.main(["sweep", "--workdir", str(tmp_path)]) == 2
  assert "--config and --grid are required" in capsys.readouterr().err
  assert cli.main(["sweep", "--config", TINY, "--workdir", str(tmp_path), "--grid", "optim.lr=1",
                   "--max-parallel", "2"]) == 2
  assert "--max-parallel is not an option of --launcher local" in capsys.readouterr().err


def _fake_element(workdir: pathlib.Path, loss: float, recall: float) -> None:
  """What a finished and evaluated element leaves in its workdir."""
  workdir.mkdir(parents=True)
  (workdir / "FINISHED").write_text(json.dumps({"step": 8, "checkpoint": 8, "total_steps": 8}))
  (workdir / "train_summary.json").write_text(json.dumps({"step": 8, "loss": loss}))
  (workdir / "config.json").write_text(json.dumps({"train": {"best_metric": "val/loss",
                                                             "best_mode": "min"}}))
  (workdir / "metrics.jsonl").write_text(json.dumps({"step": 8, "val/loss": loss + 0.5}) + "\n")
  (workdir / "eval").mkdir()
  (workdir / "eval" / "latest.json").write_text(json.dumps({"step": 8, "t2i/recall@1": recall}))


def test_collect_tables_mean_se_seeds_and_unfinished_elements(tmp_path):
  elements = sweep_lib.plan(TINY, tmp_path, grids=["optim.lr=0.001,0.002"], overrides=[],
                            seeds=[0, 1, 2])
  numbers = {0: (1.0, 0.1), 1: (2.0, 0.2), 2: (4.0, 0.6), 3: (3.0, 0.3), 4: (5.0, 0.5)}
  for e in elements:
    if e["index"] in numbers:
      _fake_element(pathlib.Path(e["workdir"]), *numbers[e["index"]])
  elements[5]["log"] = str(tmp_path / "logs" / "sweep-9_5.out")
  sweep_lib.write_manifest(tmp_path, {"config": TINY, "grid": ["optim.lr=0.001,0.002"],
                                      "seeds": [0, 1, 2], "evaluate": True, "elements": elements})
  sweep_lib.collect(tmp_path)
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  a, b = rows
  assert (a["status"], a["seeds"], a["not finished"]) == ("ok", "3", "")
  assert math.isclose(float(a["final/loss"]), 7 / 3)
  sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
  assert math.isclose(float(a["final/loss se"]), sd / math.sqrt(3))
  assert math.isclose(float(a["eval/t2i/recall@1"]), 0.3)
  assert math.isclose(float(a["best_value"]), 7 / 3 + 0.5)
  assert (b["status"], b["seeds"]) == ("1 of 3 not finished", "2")
  assert b["not finished"] == f"seed 2: {tmp_path / 'logs' / 'sweep-9_5.out'}"
  assert math.isclose(float(b["final/loss se"]), 1.0)  # values 3 and 5: sd √2, se 1
  md = (tmp_path / "results.md").read_text()
  assert "| 2.333 ± 0.88 |" in md and "1 of 3 not finished" in md
  assert len(list(csv.DictReader(open(tmp_path / "runs.csv")))) == 6


def test_only_a_slurm_job_step_starts_jax_distributed():
  assert not launched_by_cluster({})
  # sbatch script / salloc shell: an allocation but no step → one process.
  assert not launched_by_cluster({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0"})
  assert not launched_by_cluster({"SLURM_JOB_ID": "7", "JAX_COORDINATOR_ADDRESS": "a:1"})
  assert launched_by_cluster({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]"})
  assert launched_by_cluster({"JAX_COORDINATOR_ADDRESS": "a:1"})
  assert launched_by_cluster({"OMPI_COMM_WORLD_SIZE": "2"})
