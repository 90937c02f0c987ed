"""Checkpoints under faults: torn saves, unreadable checkpoints, failed saves, nothing lost.

A SIGKILL during a save leaves orbax's temporary folder `STEP.orbax-checkpoint-tmp` (writes go
there and are renamed when complete); these tests build each on-disk state a fault leaves and
check what the next start restores and what it keeps. test_faults_kill.py does the same with
real kills of the train CLI.
"""

import errno
import shutil
import types
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from facenet_jax import checkpoints


def _state(value: float) -> dict:
    return {"w": jnp.full((3, 4), value, jnp.float32), "step": jnp.asarray(int(value))}


def _manager(workdir):
    return checkpoints.make_manager(workdir, max_to_keep=3)


def _saved(workdir, steps):
    manager = _manager(workdir)
    for step in steps:
        checkpoints.save(manager, step, _state(step))
    return manager


def _restore(workdir):
    return checkpoints.restore_latest(_manager(workdir), _state(0.0))


def _ckpt(workdir):
    return checkpoints.checkpoint_dir(workdir)


def test_torn_save_is_ignored_and_cleaned_at_the_next_start(tmp_path):
    _saved(tmp_path, [1, 2])
    # What a kill mid-save leaves: a complete-looking copy under the temporary name.
    shutil.copytree(_ckpt(tmp_path) / "2", _ckpt(tmp_path) / "3.orbax-checkpoint-tmp")
    assert checkpoints.latest_step(tmp_path) == 2  # read-only look: leaves the folder alone
    assert (_ckpt(tmp_path) / "3.orbax-checkpoint-tmp").exists()
    state, step = _restore(tmp_path)
    assert step == 2 and float(state["w"][0, 0]) == 2.0
    assert sorted(p.name for p in _ckpt(tmp_path).iterdir()) == ["1", "2"]


def _corrupt(step_dir):
    """Overwrites every data file of a finalized checkpoint with garbage of the same size."""
    for path in step_dir.rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"\0" * path.stat().st_size)


def test_unreadable_newest_checkpoint_falls_back_then_is_set_aside_not_deleted(tmp_path):
    _saved(tmp_path, [1, 2, 3])
    _corrupt(_ckpt(tmp_path) / "3")
    with pytest.warns(RuntimeWarning, match=r"step 3 .* failed to restore .*previous one"):
        state, step = _restore(tmp_path)
    assert step == 2 and float(state["w"][0, 0]) == 2.0
    manager = _manager(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fresh save of step 3 raises no warning
        checkpoints.save(manager, 3, _state(30.0))
    aside = list((tmp_path / checkpoints.UNREADABLE_DIR).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("3-")
    assert sorted(int(p.name) for p in _ckpt(tmp_path).iterdir()) == [1, 2, 3]
    state, step = _restore(tmp_path)
    assert step == 3 and float(state["w"][0, 0]) == 30.0


def test_no_restorable_checkpoint_is_an_error_that_says_what_to_do(tmp_path):
    _saved(tmp_path, [1])
    _corrupt(_ckpt(tmp_path) / "1")
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError,
                                                     match=r"none of .*\[1\].*move the folder"):
        _restore(tmp_path)
    assert (_ckpt(tmp_path) / "1").is_dir()  # kept for inspection


def test_restore_into_another_shape_is_reported_not_silently_reshaped(tmp_path):
    _saved(tmp_path, [1])
    target = {"w": jnp.zeros((3, 5), jnp.float32), "step": jnp.asarray(0)}
    with pytest.warns(RuntimeWarning, match=r"step 1 .*\(3, 5\).*stored shape: \(3, 4\)"), \
            pytest.raises(RuntimeError, match="none of"):
        checkpoints.restore_latest(_manager(tmp_path), target)


def test_failed_save_names_the_step_and_what_is_intact(tmp_path, monkeypatch):
    manager = _saved(tmp_path, [1, 2])

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manager, "save", disk_full)
    with pytest.raises(checkpoints.CheckpointSaveError,
                       match=r"step 3 .*No space left.*still intact: \[1, 2\].*re-run"):
        checkpoints.save(manager, 3, _state(3.0))
    state, step = _restore(tmp_path)
    assert step == 2 and float(state["w"][0, 0]) == 2.0


def test_failed_save_still_names_what_is_intact_when_the_manager_breaks_too(tmp_path,
                                                                          monkeypatch, caplog):
    """After a failed write orbax's manager can fail as well (CI saw "Event loop is closed"
    from reload()); the error must still be the save error, with the intact steps read from
    disk, and a failing close is only logged."""
    manager = _saved(tmp_path, [1, 2])
    (_ckpt(tmp_path) / "3.orbax-checkpoint-tmp").mkdir()  # the torn write: not intact

    def broken(*args, **kwargs):
        raise RuntimeError("Event loop is closed")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manager, "save", disk_full)
    for method in ("reload", "all_steps", "close"):
        monkeypatch.setattr(manager, method, broken if method != "all_steps" else lambda: [1, 2])
    with caplog.at_level("WARNING"), pytest.raises(
            checkpoints.CheckpointSaveError,
            match=r"step 3 .*No space left.*still intact: \[1, 2\].*re-run"):
        checkpoints.save(manager, 3, _state(3.0))
    assert "closing the checkpoint manager after a failed save: Event loop" in caplog.text
    assert checkpoints.complete_steps(_ckpt(tmp_path)) == [1, 2]


def test_save_without_room_stops_before_writing_anything(tmp_path, monkeypatch):
    manager = _saved(tmp_path, [1])
    free = checkpoints.checkpoint_bytes(_state(2.0)) - 1
    monkeypatch.setattr(checkpoints.shutil, "disk_usage",
                        lambda path: types.SimpleNamespace(free=free))

    def must_not_write(*args, **kwargs):
        raise AssertionError("orbax was asked to write although the disk has no room")

    monkeypatch.setattr(manager, "save", must_not_write)
    with pytest.raises(checkpoints.CheckpointSaveError,
                       match=r"step 2 .*MiB free but one checkpoint needs about .*"
                             r"still intact: \[1\].*Free space"):
        checkpoints.save(manager, 2, _state(2.0))
    assert sorted(p.name for p in _ckpt(tmp_path).iterdir()) == ["1"]  # no torn folder


def test_complete_steps_reads_only_finished_step_folders(tmp_path):
    assert checkpoints.complete_steps(tmp_path / "missing") == []
    for name in ("10", "2", "3.orbax-checkpoint-tmp", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a checkpoint")
    assert checkpoints.complete_steps(tmp_path) == [2, 10]


def test_latest_step_and_checkpoint_bytes(tmp_path):
    assert checkpoints.latest_step(tmp_path) is None  # no checkpoints folder: nothing created
    assert not _ckpt(tmp_path).exists()
    _saved(tmp_path, [4, 8])
    assert checkpoints.latest_step(tmp_path) == 8
    # 12 float32 + one int32 (4 bytes each) plus the fixed metadata allowance.
    assert checkpoints.checkpoint_bytes(_state(1.0)) == 13 * 4 + (1 << 16)
    sizes = [p.stat().st_size for p in (_ckpt(tmp_path) / "8").rglob("*") if p.is_file()]
    assert sum(sizes) <= checkpoints.checkpoint_bytes(_state(1.0))  # the estimate is enough


def test_read_arrays_returns_every_leaf_by_path(tmp_path):
    _saved(tmp_path, [5])
    arrays = checkpoints.read_arrays(tmp_path, 5)
    assert sorted(arrays) == ["step", "w"]
    assert arrays["w"].shape == (3, 4) and (arrays["w"] == 5.0).all() and arrays["step"] == 5
    with pytest.raises(FileNotFoundError, match="step 6"):
        checkpoints.read_arrays(tmp_path, 6)


def test_read_arrays_reads_only_the_subtrees_asked_for(tmp_path):
    """fields: top-level fields or paths below them ("params/encoder": an encoder without the
    class centres beside it); an absent path is skipped."""
    state = {"params": {"encoder": {"w": jnp.ones(2)}, "head": {"centres": jnp.zeros((4, 2))}},
             "batch_stats": {"mean": jnp.full(2, 3.0)}, "step": jnp.asarray(1)}
    checkpoints.save(_manager(tmp_path), 1, state)
    arrays = checkpoints.read_arrays(tmp_path, 1, fields=("params/encoder", "batch_stats",
                                                          "params/missing", "extra"))
    assert sorted(arrays) == ["batch_stats/mean", "params/encoder/w"]
    np.testing.assert_array_equal(arrays["batch_stats/mean"], [3.0, 3.0])
