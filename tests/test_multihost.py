"""Many hosts: two local processes on the CPU train exactly like one process.

The same tiny run goes through the train CLI twice: once as 1 process × 4 CPU devices, once as
2 processes × 2 CPU devices joined by `jax.distributed` (coordinator on 127.0.0.1, gloo
collectives over loopback), started the way a hand launch on a cluster is: JAX_COORDINATOR_
ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID and config.parallel.distributed=True. Both runs see
the same 4-device mesh and the same global batches, so losses, parameters and the evaluation
must agree up to float summation order. Each process goes through tests/multihost_worker.py,
which records the rows it loaded. Also: the pure rule that decides when to initialise.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from facenet_jax import checkpoints, parallel
from facenet_jax.logs import read_metrics

from tiny import RUNLOCAL, xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
NUM_STEPS = 6
TINY = [f"--config.num_steps={NUM_STEPS}", "--config.log_every=1", "--config.eval_every=3",
        "--config.checkpoint_every=3"]  # on top of the runlocal preset
GLOBAL_BATCH = 8 * 2
TIMEOUT_S = 240  # for the three processes together; all are killed when it passes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir: pathlib.Path, record: pathlib.Path, *, local_devices: int,
           extra_env: dict[str, str], extra_flags: list[str]) -> subprocess.Popen:
    """Starts one worker; its output goes to RECORD.log (a pipe nobody drains while the test
    waits on another process could fill up and stall a process inside a collective)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", parallel.NUM_PROCESSES_VAR,
                        parallel.PROCESS_ID_VAR)}
    env.update(XLA_FLAGS=xla_flags(local_devices),
               JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **extra_env)
    cmd = [sys.executable, str(WORKER), str(record), "--config", RUNLOCAL,
           "--workdir", str(workdir), *TINY,
           *extra_flags]
    with record.with_suffix(".log").open("w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_all(procs: dict[str, subprocess.Popen], root: pathlib.Path) -> None:
    """Waits for every process; as soon as one fails (its peer would then wait in a collective
    until JAX's own timeouts) or the deadline passes, kills them all and shows their output."""
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    try:
        while failed is None and any(proc.poll() is None for proc in procs.values()):
            failed = next((f"{name} exited with {proc.returncode}"
                           for name, proc in procs.items() if proc.poll() not in (None, 0)),
                          None)
            if time.monotonic() > deadline:
                failed = f"timed out after {TIMEOUT_S} s"
            time.sleep(0.2)
        failed = failed or next((f"{name} exited with {proc.returncode}"
                                 for name, proc in procs.items() if proc.returncode), None)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failed:
        tails = "\n".join(
            f"--- {name} output (INFO lines left out) ---\n"
            f"{_without_info_lines((root / f'{name}.log').read_text())[-4000:]}"
            for name in procs)
        raise AssertionError(f"{failed}\n{tails}")


def _without_info_lines(stderr: str) -> str:
    """absl/orbax INFO lines (glog format, "I1129 02:57:01.1 ...") would hide the traceback."""
    return "\n".join(line for line in stderr.splitlines() if not re.match(r"I\d{4} ", line))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single, multi): workdir and per-process records of both runs, started together."""
    root = tmp_path_factory.mktemp("multihost")
    single_dir, multi_dir = root / "single", root / "multi"
    port = _free_port()
    procs = {"single": _start(single_dir, root / "single.json", local_devices=4, extra_env={},
                              extra_flags=[])}
    for i in range(2):
        procs[f"multi{i}"] = _start(
            multi_dir, root / f"multi{i}.json", local_devices=2,
            extra_env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                       parallel.NUM_PROCESSES_VAR: "2", parallel.PROCESS_ID_VAR: str(i)},
            extra_flags=["--config.parallel.distributed=True"])
    _wait_all(procs, root)
    records = {name: json.loads((root / f"{name}.json").read_text()) for name in procs}
    return single_dir, multi_dir, records


@pytest.mark.slow
def test_processes_form_one_mesh(runs):
    _, _, records = runs
    assert [records[n]["process_index"] for n in ("single", "multi0", "multi1")] == [0, 0, 1]
    for name, (count, local) in {"single": (1, 4), "multi0": (2, 2), "multi1": (2, 2)}.items():
        assert records[name]["process_count"] == count
        assert records[name]["local_device_count"] == local
        assert records[name]["device_count"] == 4


@pytest.mark.slow
def test_each_process_loads_only_its_half_of_each_batch(runs):
    _, _, records = runs
    whole = records["single"]["loaded"]
    assert [row["step"] for row in whole] == list(range(NUM_STEPS))
    for process in (0, 1):
        rows = records[f"multi{process}"]["loaded"]
        assert [row["step"] for row in rows] == list(range(NUM_STEPS))
        for row, full in zip(rows, whole):
            assert (row["process_index"], row["process_count"]) == (process, 2)
            assert row["images_shape"] == [GLOBAL_BATCH // 2, 16, 16, 3]
            half = slice(process * GLOBAL_BATCH // 2, (process + 1) * GLOBAL_BATCH // 2)
            assert row["labels"] == full["labels"][half]
    for full in whole:
        assert full["images_shape"] == [GLOBAL_BATCH, 16, 16, 3]
        # Whole identities per process: its half shares no identity with the other half.
        first, second = full["labels"][:GLOBAL_BATCH // 2], full["labels"][GLOBAL_BATCH // 2:]
        assert not set(first) & set(second)


@pytest.mark.slow
def test_losses_match_the_single_process_run(runs):
    single_dir, multi_dir, _ = runs
    single = [row for row in read_metrics(single_dir) if "loss" in row]
    multi = [row for row in read_metrics(multi_dir) if "loss" in row]
    # Each step logged once: only process 0 writes metrics.jsonl.
    assert [row["step"] for row in multi] == list(range(1, NUM_STEPS + 1))
    assert [row["step"] for row in single] == list(range(1, NUM_STEPS + 1))
    for key in ("loss", "grad_norm", "mean_d_ap", "mean_d_an", "num_active"):
        np.testing.assert_allclose([r[key] for r in multi], [r[key] for r in single],
                                   rtol=1e-5, atol=1e-6, err_msg=key)
    assert single[0]["loss"] != single[-1]["loss"]  # it trained: the comparison means something


def _saved_state(workdir: pathlib.Path) -> tuple[int, dict]:
    """The newest checkpoint as saved, onto one device (no target: nothing to compile).

    The 2-process run's saved shardings name devices this process does not have, hence the
    fallback sharding.
    """
    import orbax.checkpoint as ocp

    manager = checkpoints.make_manager(workdir, max_to_keep=1, read_only=True)
    step = manager.latest_step()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return step, manager.restore(step, args=ocp.args.StandardRestore(
        fallback_sharding=one_device))


@pytest.mark.slow
def test_saved_state_and_evaluation_match(runs):
    single_dir, multi_dir, _ = runs
    (single_step, single), (multi_step, multi) = _saved_state(single_dir), _saved_state(multi_dir)
    assert single_step == multi_step == NUM_STEPS
    assert jax.tree.structure(single) == jax.tree.structure(multi)
    # params, BN statistics, Adam moments, step and rng: the whole train state.
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(single), jax.tree.leaves(multi)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    single_eval = json.loads((single_dir / "eval.json").read_text())
    multi_eval = json.loads((multi_dir / "eval.json").read_text())
    for key in ("accuracy", "auc", "eer", "recall@1", "map@r", "oneshot_top1", "num_pairs"):
        assert multi_eval[key] == pytest.approx(single_eval[key], abs=1e-6), key


@pytest.mark.slow
def test_only_process_zero_writes_logs(runs):
    _, multi_dir, _ = runs
    events = list((multi_dir / "tensorboard").glob("events.*"))
    assert len(events) == 1, events
    assert json.loads((multi_dir / "config.json").read_text())["config"]["parallel"][
        "distributed"] is True


# --- when to initialise: the pure rule -------------------------------------------------------

COORD = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}
SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("distributed,environ,expected", [
    (False, {}, None),
    (True, {}, {}),  # JAX detects the rest (TPU slice, Kubernetes) or says what is missing
    (False, {**COORD, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}),
    (True, {"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     {"num_processes": 4, "process_id": 3}),
    (False, {**SLURM, "SLURM_NTASKS": "2"}, {}),
    (False, {**SLURM, "SLURM_NTASKS": "1"}, None),  # a one-task allocation stays one process
    (False, {"SLURM_JOB_ID": "7"}, None),  # salloc shell without srun: nothing to join
    (False, {**COORD, **SLURM, "SLURM_NTASKS": "2"}, {"coordinator_address": "10.0.0.1:1234"}),
    (False, {"OMPI_MCA_orte_hnp_uri": "1.2.3.4:5", "OMPI_COMM_WORLD_SIZE": "4"}, {}),
    (False, {"OMPI_MCA_orte_hnp_uri": "1.2.3.4:5", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    (False, {"TPU_WORKER_HOSTNAMES": "t0,t1"}, {}),
    (False, {"TPU_WORKER_HOSTNAMES": "t0"}, None),
])
def test_distributed_init_kwargs(distributed, environ, expected):
    assert parallel.distributed_init_kwargs(distributed, environ) == expected


@pytest.mark.parametrize("environ,named", [
    ({**COORD}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"),
    ({**COORD, "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not"),
    ({**COORD, "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "'two' is not an integer"),
])
def test_bad_hand_launch_names_the_missing_variable(environ, named):
    with pytest.raises(ValueError, match=named):
        parallel.distributed_init_kwargs(False, environ)


def test_host_device_flags_replace_the_count_and_keep_the_other_flags():
    flags = "--xla_cpu_use_fusion_emitters=false --xla_force_host_platform_device_count=8 --x=1"
    assert parallel.host_device_flags(flags, 2) == (
        "--xla_cpu_use_fusion_emitters=false --x=1 --xla_force_host_platform_device_count=2")
    assert parallel.host_device_flags("", 3) == "--xla_force_host_platform_device_count=3"
