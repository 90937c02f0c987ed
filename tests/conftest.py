"""Test setup, set before jax is imported: 8 host CPU devices, highest matmul precision, most XLA
optimisations and the CPU fusion emitters off, and a persistent compilation cache and a folder
cache (data.cache_dir's default) that pytest-xdist's workers and the subprocesses the tests
start share (through the environment), both removed at the end.

Meshes: `parallel.make_mesh()` builds a 1-device mesh in a test unless the test asks for the
`eight_devices` fixture (the device count itself is fixed when jax is imported, so the 8 devices
always exist: tests about sharding take them explicitly). Fixtures for new tests: `tiny_config`
(experiments/default.py:runlocal), `trained_run` (one CLI-trained run shared by the session),
`eight_devices`, `cli_env`. See CONTRIBUTING.md.
"""

import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

NUM_DEVICES = 8
_DEVICE_FLAG = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
# XLA's CPU fusion emitters compile the tests' tiny programs 2-3x slower than the loop emitters
# (measured: tests/test_large_batch_mining.py 79 s -> 33 s; the programs' results are the tests'
# to check either way). Off where this jaxlib knows the flag: XLA aborts on one it does not.
_FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _xla_knows(flag: str) -> bool:
    """Whether a process with XLA_FLAGS=flag starts (a second's probe, once per session)."""
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1)"],
                           env={**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"},
                           capture_output=True)
    return probe.returncode == 0


if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", "").split():  # a worker inherits both
    wanted = [_DEVICE_FLAG] + ([_FAST_COMPILE_FLAG] if _xla_knows(_FAST_COMPILE_FLAG) else [])
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *wanted]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# flax's train_test pattern: the tests' programs are tiny and run a few times, so compiling
# dominates; without most XLA optimisations it takes about half the CPU time. Every process
# the tests start inherits it (tiny.cli_env).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# One compilation cache for the session and every process it starts (pytest-xdist's workers, the
# train CLI, sweeps, notebooks): the same tiny programs are compiled by dozens of them.
# FACENET_JAX_TEST_CACHE=DIR keeps it across sessions; by default it is a fresh folder, removed
# at the end, so a run's timing does not depend on an earlier one. A process started with
# JAX_COMPILATION_CACHE_DIR set (a worker: its controller set it) uses that folder as it is.
_OWN_CACHE = not ({"FACENET_JAX_TEST_CACHE", "JAX_COMPILATION_CACHE_DIR"} & set(os.environ))
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = (os.environ.get("FACENET_JAX_TEST_CACHE")
                                               or tempfile.mkdtemp(prefix="jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Decoded image folders (data.cache_dir's default) go to a session folder as well, removed at the
# end: in the user's ~/.cache/facenet_jax every test folder would leave an entry behind.
_OWN_FOLDER_CACHE = "FACENET_JAX_CACHE_DIR" not in os.environ
if _OWN_FOLDER_CACHE:
    os.environ["FACENET_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="facenet_jax_folders_")

import jax  # noqa: E402
import pytest  # noqa: E402

from tiny import cli_env, train_cli  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


# pytest-xdist's loadfile hands whole files to the workers, by default the files with the most
# tests first; a long file of few tests started last leaves one worker idle at the end (~20 s of
# the full suite's 6 minutes). pyproject.toml turns that reordering off
# (--no-loadscope-reorder) and these files, the full suite's longest (measured, longest first),
# start first: the short files then fill in at the end and both workers end together. A stale
# order costs balance only.
LONGEST_FILES = (
    "test_train_cli.py", "test_notebooks.py", "test_pretrained.py", "test_losses.py",
    "test_faults_kill.py", "test_large_batch_mining.py", "test_benchmarks.py", "test_cli.py",
    "test_pretrained_tf.py", "test_models.py", "test_backbones.py",
    "test_objectives_classification.py", "test_train_step.py", "test_crossval.py",
    "test_features_cache.py", "test_extras.py", "test_sweep.py", "test_multihost.py",
    "test_run_records.py", "test_evaluate_benchmarks.py", "test_classification_losses.py",
    "test_memory.py", "test_sweep_cluster.py", "test_data_rec.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    if _OWN_FOLDER_CACHE:
        shutil.rmtree(os.environ["FACENET_JAX_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The shared real-face data folder; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared face data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _one_device_meshes():
    """`parallel.make_mesh()` (all devices) builds a 1-device mesh for the whole session,
    module and session fixtures included, unless a test asks for `eight_devices`: most tests
    are not about devices, and 8 shards only add compile time (and per-device copies)."""
    from facenet_jax import parallel

    every_device = parallel.make_mesh
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel, "make_mesh",
                      lambda num_devices=None: every_device(num_devices or 1))
        yield every_device


@pytest.fixture
def eight_devices(_one_device_meshes, monkeypatch):
    """The 8-device mesh; in its tests `parallel.make_mesh()` spans all 8 devices again."""
    from facenet_jax import parallel

    assert jax.device_count() == NUM_DEVICES, "tests/conftest.py forces 8 CPU devices"
    monkeypatch.setattr(parallel, "make_mesh", _one_device_meshes)
    return parallel.make_mesh(NUM_DEVICES)


@pytest.fixture
def tiny_config():
    """tiny_config(**{"loss.margin": 0.3}): experiments/default.py:runlocal with overrides."""
    from tiny import tiny_config as make

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(workdir, CompletedProcess) of one run of the train CLI on the runlocal preset (8 steps,
    2 devices, checkpoints at 4 and 8), shared by the tests that read a finished run (evaluate,
    embed, verify, the CLI's outputs). Read it, never write it: copy it to change it.

    Under pytest-xdist the first worker to ask trains it, under a file lock in the session's
    shared temporary folder; the others wait and read the same folder."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's basetemp is in the session's
        shared = shared.parent
    workdir, record = shared / "trained_run", shared / "trained_run.json"
    with open(shared / "trained_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            workdir.mkdir()
            result = train_cli(workdir, env=cli_env(devices=2))
            record.write_text(json.dumps({"args": result.args, "returncode": result.returncode,
                                          "stdout": result.stdout, "stderr": result.stderr}))
    return workdir, subprocess.CompletedProcess(**json.loads(record.read_text()))
