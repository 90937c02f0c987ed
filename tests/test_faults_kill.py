"""Real faults on the train CLI: SIGKILLs at random moments (some mid-save), a disk that fills
during the run, a resumed run whose model shape changed.

The kill loop is benchmarks/kill_resume.py's (that script runs 20+ kills; here 3). All train
processes share the session's JAX persistent compilation cache, so at most the first compiles.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from facenet_jax import checkpoints, train
from facenet_jax import config as cfg

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "kill_resume", REPO_ROOT / "benchmarks" / "kill_resume.py")
kill_resume = sys.modules.setdefault("kill_resume", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(kill_resume)

NUM_STEPS = 16


@pytest.fixture(scope="module")
def env():
    """The benchmark's environment with the session's compilation cache (conftest): its
    programs are the runlocal preset's on 2 devices, which other CLI tests compile too."""
    return kill_resume.train_env(os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """An uninterrupted run (it also fills the compilation cache for the others)."""
    workdir = tmp_path_factory.mktemp("reference")
    subprocess.run(kill_resume.train_command(workdir, NUM_STEPS), cwd=REPO_ROOT, env=env,
                   check=True, capture_output=True, timeout=400)
    return workdir


def _assert_same_final_state(workdir, reference):
    """Bit for bit: parameters, BN statistics, optimiser state, step and key."""
    compared, differing = kill_resume.differing_arrays(workdir, reference, NUM_STEPS)
    assert compared > 10 and differing == []


@pytest.mark.slow
def test_random_sigkills_some_mid_save_resume_to_the_same_state(reference, env, tmp_path):
    workdir = tmp_path / "run"
    result = kill_resume.run_with_kills(
        workdir, ("after_save", "mid_save", "in_loop"), num_steps=NUM_STEPS, env=env, seed=0,
        logs=tmp_path / "logs", loop_max_delay=0.3)
    summary = kill_resume.check(result, workdir, reference, NUM_STEPS)
    assert summary["kills"] == 3 and summary["final_returncode"] == 0, result
    assert summary["kills_mid_save"] >= 1, result  # the mid_save kill left a torn save
    assert summary["resumes"] >= 1, result  # at least one restart restored a checkpoint
    # Every start restored the newest complete checkpoint, never a torn one.
    assert summary["resumed_from_newest_complete"], result
    assert summary["torn_saves_left_at_end"] == []  # cleaned by the restarts
    assert summary["every_step_logged_once"]  # torn metrics lines and repeats dropped
    assert summary["final_equal_to_uninterrupted"], summary["arrays_differing"]
    assert json.loads((workdir / "eval.json").read_text())["step"] == NUM_STEPS


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount (2 MiB) the test can grow; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_filling_mid_run_keeps_checkpoints_then_resumes_to_the_same_state(
        reference, env, small_disk):
    workdir = small_disk / "run"
    command = kill_resume.train_command(workdir, NUM_STEPS)
    full = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert full.returncode != 0
    assert "CheckpointSaveError: could not write the checkpoint of step" in full.stderr
    assert "Free space or fix permissions there, then re-run" in full.stderr
    intact = kill_resume.complete_steps(workdir)
    assert intact and f"still intact: {intact}" in full.stderr
    assert kill_resume.torn_saves(workdir) == []  # the free-space check stopped it before writing
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    resumed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert kill_resume.restored_step(resumed.stderr) == intact[-1]
    _assert_same_final_state(workdir, reference)


def test_write_failing_on_a_full_disk_keeps_the_intact_checkpoints(small_disk, monkeypatch):
    """The write itself failing (the disk filled after the free-space check, e.g. by another
    process): orbax's real error becomes the save error, and the complete steps restore."""
    monkeypatch.setattr(checkpoints, "_shortage", lambda directory, state: None)
    manager = checkpoints.make_manager(small_disk, max_to_keep=5)
    noise = np.random.default_rng(0).random((3, 300, 300), np.float32)  # zstd cannot shrink it
    states = [{"w": jnp.asarray(noise[step])} for step in range(3)]
    checkpoints.save(manager, 1, states[1])  # ~360 KiB each on a 2 MiB disk
    checkpoints.save(manager, 2, states[2])
    with pytest.raises(checkpoints.CheckpointSaveError,
                       match=r"step \d+ .*still intact: \[1, 2(, \d+)*\].*re-run") as error:
        for step in range(3, 10):
            checkpoints.save(manager, step, states[0])
    assert "RESOURCE_EXHAUSTED" in str(error.value)  # orbax's own error, not a stand-in
    reopened = checkpoints.make_manager(small_disk, max_to_keep=5)
    state, step = checkpoints.restore_latest(reopened, states[0])
    assert step >= 2
    np.testing.assert_array_equal(state["w"], noise[2] if step == 2 else noise[0])


def test_full_disk_at_start_is_clear_before_data(small_disk):
    subprocess.run(["mount", "-o", "remount,size=64k", str(small_disk)], check=True)
    config = cfg.load_config(REPO_ROOT / "experiments" / "default.py",
                             {"model.embedding_dim": 16, "data.image_size": 16,
                              "batch.identities": 8, "eval.batch_size": 64})
    with pytest.raises(OSError, match=r"MiB free but one checkpoint needs about"):
        train.train_and_evaluate(config, small_disk / "run")


@pytest.mark.slow
def test_resume_with_another_model_shape_says_what_differs(reference):
    saved = json.loads((reference / "config.json").read_text())["config"]
    config = cfg.load_config(REPO_ROOT / "experiments" / "default.py")
    for key, value in cfg.flatten(saved).items():
        cfg.set_dotted(config, key, tuple(value) if isinstance(value, list) else value)
    config.model.embedding_dim = 8
    before = sorted(p.name for p in (reference / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"\(model\.embedding_dim: 16 -> 8\)"):
        train.train_and_evaluate(config, reference)
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == before
