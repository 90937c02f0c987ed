"""Training: the per-device train step with global mining, the loop, checkpoints, logs, CLI.

    python -m facenet_jax.train --config experiments/default.py --workdir DIR [--config.K=V ...]

Re-running the same command on the same DIR resumes from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from facenet_jax import (checkpoints, collapse, data, evaluate, finetune, losses, optim,
                         parallel, plots, runfiles, verification_sets)
from facenet_jax.config import (RESUMABLE_KEYS, changed_keys, provenance, to_plain,
                                validate_config)
from facenet_jax.embed import make_embedder
from facenet_jax.logs import (MetricsWriter, cli_logging, one_line_user_errors, read_metrics,
                              truncate_metrics)
from facenet_jax.losses import memory as xbm
from facenet_jax.state import TrainState, build_model, build_optimizer, create_train_state

AXIS = parallel.AXIS
LOCK_FILE = ".lock"  # held by the training process; see _exclusive_workdir
TRAINING_CURVES_FILE = "training_curves.png"  # written after the last step
# Training-line keys averaged over the steps since the previous log line.
LOGGED_STATS = ("loss", "active_fraction", "mean_d_ap", "mean_d_an", "num_triplets",
                "num_active", "semihard_found_fraction", "embedding_spread", "learning_rate",
                "grad_norm", "memory_loss", "memory_active_fraction", "memory_fill")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The loss settings, hashable so they can be static arguments of the compiled step."""

    strategy: str
    margin: float
    distance: str
    soft: bool
    options: tuple[tuple[str, Any], ...] = ()
    memory: xbm.MemorySpec | None = None  # cross-batch memory; None: off

    @classmethod
    def from_config(cls, loss_config: ml_collections.ConfigDict, *,
                    warmup: bool = False) -> "LossSpec":
        """The step's loss from `config.loss`; warmup=True: the loss of the first
        loss.warmup_steps steps, loss.warmup_strategy with its default options (loss.options
        belong to loss.strategy). Semi-hard needs no max_positives hint: it takes its sort-free
        path by itself for P×K batches (mining.semihard_skips_sort), and a K − 1 hint would
        send the cross-batch memory's loss, whose anchors have many positives, to the sort."""
        strategy = loss_config.warmup_strategy if warmup else loss_config.strategy
        options = {} if warmup else dict(loss_config.options)
        return cls(strategy=strategy, margin=float(loss_config.margin),
                   distance=loss_config.distance, soft=bool(loss_config.soft),
                   options=tuple(sorted(options.items())),
                   memory=xbm.MemorySpec.from_config(loss_config))


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step and the last good
    checkpoint."""


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, *, model: Any,
               tx: optax.GradientTransformation, schedule: optax.Schedule, loss: LossSpec,
               mining: str, freeze_backbone_stats: bool = False
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update, per device, with pmap semantics over the axis `AXIS`.

    images: this device's shard, uint8 [b, H, W, 3] holding whole identities; labels: int [b].
    With mining="global" the embeddings and labels are all-gathered and this device's b anchors
    are mined against the whole global batch (`triplet_loss_sums`); the loss sums and counts are
    psum'd so the mean is exactly the one-device mean. The per-device objective is its own loss
    sum divided by the global count; gradients of the replicated parameters are the psum of the
    per-device gradients (the all_gather's transpose routes each anchor's gradient back to the
    device that embedded the candidate). With mining="local" each device mines in its shard.
    freeze_backbone_stats (backbone_lr_multiplier = 0): only the head's BN statistics update.

    With `loss.memory`, the objective adds weight × the loss of the same anchors mined against
    the cross-batch memory in `state.memory` (losses/memory.py); "loss" stays the batch's own
    triplet loss and "memory_loss" is the other term. The global batch's embeddings are then
    enqueued (from start_step on), the same on every device.
    """
    b = images.shape[0]
    device = lax.axis_index(AXIS)
    key = jax.random.fold_in(state.rng, state.step)
    x = images.astype(jnp.float32) / 255.0

    def objective(params: Any) -> tuple[jax.Array, tuple[dict, Any]]:
        embeddings, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            mutable=["batch_stats"])
        if mining == "global":
            candidates = lax.all_gather(embeddings, AXIS, tiled=True)
            candidate_labels = lax.all_gather(labels, AXIS, tiled=True)
            anchor_start, mining_key = device * b, key
        else:
            candidates, candidate_labels = embeddings, labels
            anchor_start, mining_key = 0, jax.random.fold_in(key, device)
        loss_kwargs = dict(margin=loss.margin, strategy=loss.strategy, distance=loss.distance,
                           soft=loss.soft, **dict(loss.options))
        sums = losses.triplet_loss_sums(
            candidates, candidate_labels, anchor_start=anchor_start, num_anchors=b,
            key=mining_key, **loss_kwargs)
        global_count = lax.psum(lax.stop_gradient(sums["count"]), AXIS)
        value = sums["loss_sum"] / jnp.maximum(global_count, 1.0)
        memory_sums = None
        if loss.memory is not None:
            memory_sums = xbm.memory_loss_sums(
                candidates, candidate_labels, state.memory, anchor_start=anchor_start,
                num_anchors=b, key=jax.random.fold_in(mining_key, 1), **loss_kwargs)
            memory_count = lax.psum(lax.stop_gradient(memory_sums["count"]), AXIS)
            value += loss.memory.weight * memory_sums["loss_sum"] / jnp.maximum(memory_count,
                                                                                1.0)
        return value, (sums, memory_sums, embeddings, updates["batch_stats"])

    grads, (sums, memory_sums, embeddings, batch_stats) = jax.grad(
        objective, has_aux=True)(state.params)
    if freeze_backbone_stats:
        batch_stats = optim.keep_backbone_stats(state.batch_stats, batch_stats)
    grads = lax.psum(grads, AXIS)
    loss_value, stats = losses.reduce_triplet_sums(lax.psum(sums, AXIS))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params,
                                                                              updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"loss": loss_value, **stats, "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(state.step)}
    if loss.memory is not None:
        memory_loss, memory_stats = losses.reduce_triplet_sums(lax.psum(memory_sums, AXIS))
        metrics.update(memory_loss=memory_loss,
                       memory_active_fraction=memory_stats["active_fraction"],
                       memory_fill=jnp.mean(state.memory.valid.astype(jnp.float32)))
        new_state = new_state.replace(memory=xbm.enqueue_from(
            state.memory, lax.all_gather(embeddings, AXIS, tiled=True),
            lax.all_gather(labels, AXIS, tiled=True), state.step, loss.memory.start_step))
    return new_state, metrics


def make_train_step(mesh: jax.sharding.Mesh, **step_kwargs: Any):
    """`train_step` compiled once over the mesh; the state buffers are donated."""
    def per_device(state, images, labels):
        return train_step(state, images, labels, **step_kwargs)
    return parallel.shard_per_device(
        per_device, mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()),
        donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# The loop (effects: files, devices, signals, terminal).


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (save, then exit cleanly)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_Preemption":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _prepare_workdir(workdir: pathlib.Path, is_writer: bool) -> None:
    """Creates DIR and proves it writable before any long work (clear error otherwise)."""
    if not is_writer:
        return
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as error:
        raise OSError(f"workdir {workdir} is not writable ({error.strerror}); choose another "
                      "--workdir or free space/permissions there") from error


@contextlib.contextmanager
def _exclusive_workdir(workdir: pathlib.Path, is_writer: bool) -> Iterator[None]:
    """Holds an exclusive lock on DIR/.lock while training (process 0; flock, dropped by the
    kernel if the process dies; a DIR/.lock.excl file where the filesystem refuses flock, see
    runfiles.exclusive_lock). Two runs in one DIR, e.g. a requeued job whose old copy still
    runs, would each delete the other's in-progress checkpoint as a torn save."""
    if not is_writer:
        yield
        return
    try:
        with runfiles.exclusive_lock(workdir / LOCK_FILE, what=f"training in {workdir}") as kind:
            if kind == "flock":
                logging.info("workdir lock: flock on %s", workdir / LOCK_FILE)
            else:  # say so: the lock then depends on the fallback's stale-file rule
                logging.warning("workdir lock: the filesystem refused flock; took the lock file "
                                "%s%s instead", workdir / LOCK_FILE, runfiles.FALLBACK_SUFFIX)
            yield
    except runfiles.LockHeldError as error:
        raise RuntimeError(f"{error}, or use another --workdir") from None


def _check_resume_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                         reached: int | None) -> None:
    """A resumed run may only change RESUMABLE_KEYS; anything else is an error naming keys.

    Only a checkpoint binds the config (`reached`: DIR's newest checkpoint step, None without
    one): a run that stopped before its first save (bad data, a NaN at step 3) may be started
    again with a corrected config in the same DIR.
    """
    saved_path = workdir / "config.json"
    if not saved_path.exists() or reached is None:
        return
    saved = json.loads(saved_path.read_text())["config"]
    differing = changed_keys(saved, to_plain(config))
    if differing:
        details = "; ".join(
            f"{k}: {_lookup(saved, k)!r} -> {_lookup(to_plain(config), k)!r}" for k in differing)
        raise ValueError(
            f"{workdir} holds a run with a different config ({details}). A resumed run may only "
            f"change {', '.join(RESUMABLE_KEYS)}. Use a new --workdir, or restore those keys.")


def _check_num_steps(reached: int | None, num_steps: int) -> None:
    """A resumed run may not ask for fewer steps than its newest checkpoint (step `reached`)
    already holds."""
    if reached is not None and reached > num_steps:
        raise ValueError(
            f"config.num_steps={num_steps} is below the step {reached} this workdir already "
            f"reached; pass --config.num_steps >= {reached}")


def _check_enough_identities(dataset: data.Dataset) -> None:
    """Training needs 2 identities and the test split 2 more, whatever the split fractions."""
    if dataset.num_identities < 4:
        raise ValueError(
            f"the dataset holds {dataset.num_identities} usable identities "
            f"({dataset.identity_names}; those below data.min_images_per_identity are "
            "dropped); training needs at least 2 and the held-out test split 2 more: add "
            "identities (folders root/<identity>/<image>) or check data.root")


def _fault_injection_step() -> int | None:
    """FACENET_JAX_KILL_AFTER_STEP=s makes the process SIGKILL itself after step s (and its
    checkpoint, if one is due): the fault tests use it to kill at an exact point."""
    value = os.environ.get("FACENET_JAX_KILL_AFTER_STEP")
    return int(value) if value else None


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    runfiles.atomic_write_json(workdir / "config.json",
                               {"config": to_plain(config), "provenance": provenance()})


def _device_batches(sampler: data.RowSampler, mesh: jax.sharding.Mesh, steps: range,
                    prefetch: int) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Host batches built ahead in a background thread, put on the devices one step early."""
    process, count = jax.process_index(), jax.process_count()
    host = data.prefetch((sampler.host_batch(s, process, count) for s in steps), prefetch)
    pending = None
    for images, labels in host:
        batch = parallel.put_global_batch((images, labels), mesh)
        if pending is not None:
            yield pending
        pending = batch
    if pending is not None:
        yield pending


class _Progress:
    """A tqdm bar on a terminal, plain log lines otherwise."""

    def __init__(self, start: int, total: int, enabled: bool):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, row: Mapping[str, Any], steps_done: int, total: int,
               seconds_per_step: float) -> None:
        summary = (f"loss {row['loss']:.4f}  active {row['active_fraction']:.3f}  "
                   f"spread {row['embedding_spread']:.4f}  {row['images_per_second']:.0f} img/s")
        if self._bar is not None:
            self._bar.update(steps_done)
            self._bar.set_postfix_str(summary)
        else:
            eta = (total - step) * seconds_per_step
            logging.info("step %d/%d  %s  ETA %.0fs", step, total, summary, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _mean_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir` and returns the test-split evaluation."""
    parallel.maybe_initialize_distributed(config.parallel.distributed)
    workdir = pathlib.Path(workdir).resolve()
    is_writer = jax.process_index() == 0
    mesh = parallel.make_mesh()
    validate_config(config, num_devices=mesh.size)
    _prepare_workdir(workdir, is_writer)
    with _exclusive_workdir(workdir, is_writer):
        return _train_in(workdir, config, mesh, is_writer)


def _train_in(workdir: pathlib.Path, config: ml_collections.ConfigDict,
              mesh: jax.sharding.Mesh, is_writer: bool) -> dict[str, Any]:
    """train_and_evaluate's body, run while this process holds DIR's lock."""
    reached = checkpoints.latest_step(workdir)  # read once: the checks below all need it
    _check_resume_config(workdir, config, reached)
    _check_num_steps(reached, config.num_steps)
    if reached is None and config.model.init_from is not None:  # a resume never reads it
        finetune.check_init_dir(config.model.init_from)
    model = build_model(config, bn_axis_name=AXIS)
    tx, schedule = build_optimizer(config)
    if is_writer:  # from the state's shapes alone: before loading data or compiling
        checkpoints.check_free_space(
            workdir, jax.eval_shape(lambda: create_train_state(config, model, tx)))

    dataset = data.load_dataset(config.data)
    _check_enough_identities(dataset)
    splits = data.split_dataset(dataset, config.data)
    if reached is not None:  # resuming: the same people, or stop
        data.check_split_record(workdir / evaluate.SPLIT_FILE, splits)
    evaluate.generated_pairs(config, splits["test"], "test")  # a too-small test split fails now
    benchmark_sets = verification_sets.configured_sets(config.eval, config.data.image_size)
    validation = splits["validation"]
    validation_pairs = (evaluate.generated_pairs(config, validation, "validation")
                        if validation.num_identities >= 2 else None)
    sampler = data.make_sampler(splits["train"], config, num_shards=mesh.size)

    state = parallel.put_replicated(
        finetune.initial_state(config, model, tx, resuming=reached is not None), mesh)
    manager = checkpoints.make_manager(workdir, max_to_keep=config.keep_checkpoints)
    restored = checkpoints.restore_latest(manager, state)
    start_step = 0
    if restored is not None:
        state, start_step = restored
        logging.info("resumed from step %d", start_step)
    if is_writer:
        truncate_metrics(workdir, start_step)
        _write_config(workdir, config)
        data.write_split_record(workdir / evaluate.SPLIT_FILE, splits)

    def compiled_step(warmup: bool):
        return make_train_step(
            mesh, model=model, tx=tx, schedule=schedule, mining=config.parallel.mining,
            loss=LossSpec.from_config(config.loss, warmup=warmup),
            freeze_backbone_stats=config.optimizer.backbone_lr_multiplier == 0)

    step_fn = compiled_step(warmup=False)
    warmup_steps = config.loss.warmup_steps
    warmup_fn = compiled_step(warmup=True) if warmup_steps else None
    embed = make_embedder(build_model(config, bn_axis_name=None), mesh,
                          batch_size=config.eval.batch_size, flip=config.eval.flip)
    # TensorBoard drops the events a killed earlier attempt logged past the restored step.
    writer = MetricsWriter(workdir, enabled=is_writer,
                           purge_step=start_step + 1 if restored is not None else None)
    progress = _Progress(start_step, config.num_steps, enabled=is_writer)
    batch_size = config.batch.identities * config.batch.images_per_identity
    last_checkpoint = start_step if restored is not None else None
    pending: list[dict[str, jax.Array]] = []
    if config.model.init_from is not None and restored is None and validation_pairs is not None:
        # The fine-tune's baseline: the imported encoder on the validation split, at step 0.
        start = evaluate.evaluate_dataset(embed, state.variables, validation, validation_pairs,
                                          distance=config.eval.distance)
        writer.write(0, _logged_numbers("eval", start))
    logged: list[dict[str, float]] = []  # this process's training log rows, for the collapse rule
    collapse_warned = False
    window_start = time.perf_counter()

    def flush_logs(step: int) -> None:
        nonlocal window_start, collapse_warned
        if not pending:
            return
        rows = parallel.to_host(pending)
        for offset, row in enumerate(rows):
            # A finite loss with a non-finite gradient would make the next checkpoint NaN.
            bad_values = {k: float(row[k]) for k in ("loss", "grad_norm")
                          if not math.isfinite(float(row[k]))}
            if bad_values:
                bad = step - len(rows) + offset + 1
                raise NonFiniteLossError(
                    f"non-finite loss or gradient ({bad_values}) at step {bad}; last good "
                    f"checkpoint: {last_checkpoint if last_checkpoint is not None else 'none'} "
                    f"in {checkpoints.checkpoint_dir(workdir)}. Re-running the same command "
                    "repeats the same batches from there; to change the learning rate, "
                    "optimizer.grad_clip_norm or the data, start a new --workdir (or, with no "
                    "checkpoint yet, re-run in this one).")
        elapsed = time.perf_counter() - window_start
        row = {k: v for k, v in _mean_rows(rows).items() if k in LOGGED_STATS}
        row["images_per_second"] = batch_size * len(rows) / max(elapsed, 1e-9)
        writer.write(step, row)
        progress.update(step, row, len(rows), config.num_steps, elapsed / len(rows))
        pending.clear()
        logged.append(row)
        warning = None if collapse_warned else collapse.collapse_warning(
            logged, step=step, margin=config.loss.margin, distance=config.loss.distance,
            soft=config.loss.soft)
        if warning is not None:
            collapse_warned = True
            if is_writer:
                logging.warning("%s", warning)
        window_start = time.perf_counter()

    steps = range(start_step, config.num_steps)
    kill_after_step = _fault_injection_step()
    with _Preemption() as preemption:
        for step, (images, labels) in zip(steps, _device_batches(sampler, mesh, steps,
                                                                 config.data.prefetch)):
            state, metrics = (warmup_fn if step < warmup_steps else step_fn)(state, images,
                                                                             labels)
            pending.append(metrics)
            done = step + 1
            if done % config.log_every == 0 or done == config.num_steps:
                flush_logs(done)
            if validation_pairs is not None and done % config.eval_every == 0:
                flush_logs(done)  # a non-finite loss is reported as such, before evaluating
                result = evaluate.evaluate_dataset(embed, state.variables, validation,
                                                   validation_pairs,
                                                   distance=config.eval.distance)
                writer.write(done, _logged_numbers("eval", result))
                logging.info("validation split at step %d: accuracy %.4f ± %.4f, AUC %.4f "
                             "(%d pairs)", done, result["accuracy"], result["accuracy_std"],
                             result["auc"], result["num_pairs"])
                window_start = time.perf_counter()  # images/s measures training alone
            if benchmark_sets and done % config.eval_every == 0:
                flush_logs(done)
                writer.write(done, verification_sets.training_metrics(
                    functools.partial(embed, state.variables), benchmark_sets,
                    distance=config.eval.distance))
                window_start = time.perf_counter()
            should_save = done % config.checkpoint_every == 0 or done == config.num_steps
            if should_save or preemption.requested:
                flush_logs(done)
                writer.flush()  # TensorBoard up to date with the checkpoint, as metrics.jsonl is
                checkpoints.save(manager, done, state)
                window_start = time.perf_counter()
                last_checkpoint = done
            if done == kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if preemption.requested:
                logging.warning("SIGTERM: saved step %d; re-run the same command to resume",
                                done)
                progress.close()
                writer.close()
                return {"preempted": True, "step": done}
    flush_logs(config.num_steps)
    progress.close()
    try:
        return _final_evaluations(config, workdir, embed, state.variables, splits, writer,
                                  is_writer)
    finally:
        writer.close()


def _logged_numbers(prefix: str, result: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation's numbers as training-log keys PREFIX/KEY (lists, strings and the
    val@far=T_resolved flags left out): the step-0, periodic and final evaluations share it."""
    return {f"{prefix}/{k}": v for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _final_evaluations(config: ml_collections.ConfigDict, workdir: pathlib.Path, embed: Any,
                       variables: Any, splits: Mapping[str, data.Dataset],
                       writer: MetricsWriter, is_writer: bool) -> dict[str, Any]:
    """After the last step: the validation split (when it has 2 identities) →
    eval_validation.json, whose threshold is the run's (evaluate.run_threshold); the test split
    → eval.json; both with figures. The test metrics and figures also go to TensorBoard
    (test/...), and the training curves to DIR/training_curves.png. Returns the test result."""
    step = config.num_steps
    if splits["validation"].num_identities >= 2:
        evaluate.evaluate_run_test_split(config, workdir, embed, variables,
                                         splits["validation"], step=step, write=is_writer,
                                         split="validation")
    result = evaluate.evaluate_run_test_split(config, workdir, embed, variables, splits["test"],
                                              step=step, write=is_writer)
    if is_writer:
        writer.write(step, _logged_numbers("test", result))
        writer.write_images(step, {f"test/{name}": path
                                   for name, path in result["figures"].items()})
        plots.plot_training_curves(read_metrics(workdir), workdir / TRAINING_CURVES_FILE)
    return result


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    cli_logging()
    flags_ = flags.FLAGS
    result = train_and_evaluate(flags_.config, flags_.workdir)
    if result.get("preempted"):
        return
    validation = pathlib.Path(flags_.workdir) / evaluate.VALIDATION_EVAL_FILE
    if validation.exists():
        print(f"validation split ({validation}):\n"
              f"{evaluate.format_summary(json.loads(validation.read_text()))}", flush=True)
    print(f"test split ({pathlib.Path(flags_.workdir) / evaluate.EVAL_FILE}):\n"
          f"{evaluate.format_summary(result)}", flush=True)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder (created; re-use to resume)")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(one_line_user_errors(main))
