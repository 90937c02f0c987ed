"""The training loop: resume checks, data, the compiled step, periodic actions (log lines,
evaluations, checkpoints), preemption and the final evaluations. Effects: files, devices,
signals, terminal."""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from facenet_jax import (checkpoints, data, features_cache, finetune, objectives, parallel,
                         runfiles)
from facenet_jax.eval import evaluators, plots
from facenet_jax.eval.embed import make_embedder
from facenet_jax.logs import MetricsWriter, read_metrics, truncate_metrics
from facenet_jax.state import build_model, build_optimizer, create_train_state, partition_specs
from facenet_jax.train.step import make_train_step
from facenet_jax.train.validate import validate_run_config

# Logged beside the objective's own stats_keys (averaged over the steps since the last line).
STEP_STATS = ("learning_rate", "grad_norm")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step and the last good
    checkpoint."""


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


def _check_enough_identities(dataset: data.Dataset) -> None:
    """Training needs 2 identities and the test split 2 more, whatever the split fractions."""
    if dataset.num_identities < 4:
        raise ValueError(
            f"the dataset holds {dataset.num_identities} usable identities "
            f"({dataset.identity_names}; those below data.min_images_per_identity are "
            "dropped); training needs at least 2 and the held-out test split 2 more: add "
            "identities (folders root/<identity>/<image>) or check data.root")


def device_batches(sampler: data.RowSampler, mesh: jax.sharding.Mesh, steps: range,
                   prefetch: int, workers: int = 0) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Host batches built `prefetch` ahead, in a background thread (workers=0) or in
    `workers` processes (data.stream), put on the devices one step early."""
    process, count = jax.process_index(), jax.process_count()
    host = data.stream_host_batches(sampler, steps, process, count, workers=workers,
                                    buffer_size=prefetch)
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

    def __init__(self, start: int, total: int, enabled: bool,
                 fields: tuple[tuple[str, str, str], ...]):
        self._bar = None
        self._fields = fields  # the objective's (label, metric key, format) after the loss
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, row: Mapping[str, Any], steps_done: int, total: int,
               seconds_per_step: float) -> None:
        summary = "  ".join([f"loss {row['loss']:.4f}"]
                            + [f"{label} {row[key]:{fmt}}" for label, key, fmt in self._fields]
                            + [f"{row['images_per_second']:.0f} img/s"])
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


class _TrainingLog:
    """The steps' metrics since the last log line: on `flush`, checked for non-finite values,
    averaged, written (metrics.jsonl, TensorBoard), shown as progress and watched for collapse.
    Time spent outside training (evaluations, saves) is left out of images/s by `restart`."""

    def __init__(self, *, workdir: pathlib.Path, writer: MetricsWriter, progress: _Progress,
                 objective: objectives.Objective, batch_size: int, num_steps: int,
                 last_checkpoint: int | None, is_writer: bool,
                 replaced_images: Callable[[], int | None] = lambda: None):
        self.workdir, self.writer, self.progress = workdir, writer, progress
        self.replaced_images = replaced_images
        self.objective, self.batch_size, self.num_steps = objective, batch_size, num_steps
        self.last_checkpoint, self.is_writer = last_checkpoint, is_writer
        self.keys = objective.stats_keys + STEP_STATS
        self.pending: list[dict[str, jax.Array]] = []
        self.rows: list[dict[str, float]] = []  # this process's rows, for the collapse rule
        self.collapse_warned = False
        self.restart()

    def restart(self) -> None:
        self.window_start = time.perf_counter()

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.pending.append(metrics)

    def flush(self, step: int) -> None:
        if not self.pending:
            return
        rows = parallel.to_host(self.pending)
        self._check_finite(rows, step)
        elapsed = time.perf_counter() - self.window_start
        row = {k: v for k, v in _mean_rows(rows).items() if k in self.keys}
        row["images_per_second"] = self.batch_size * len(rows) / max(elapsed, 1e-9)
        replaced = self.replaced_images()
        if replaced is not None:  # packs: unreadable images replaced so far (this process)
            row["replaced_images"] = replaced
        self.writer.write(step, row)
        self.progress.update(step, row, len(rows), self.num_steps, elapsed / len(rows))
        self.pending.clear()
        self.rows.append(row)
        warning = (None if self.collapse_warned
                   else self.objective.collapse_warning(self.rows, step))
        if warning is not None:
            self.collapse_warned = True
            if self.is_writer:
                logging.warning("%s", warning)
        self.restart()

    def _check_finite(self, rows: list[dict[str, np.ndarray]], step: int) -> None:
        """A finite loss with a non-finite gradient would make the next checkpoint NaN."""
        for offset, row in enumerate(rows):
            bad_values = {k: float(row[k]) for k in ("loss", "grad_norm")
                          if not math.isfinite(float(row[k]))}
            if bad_values:
                bad = step - len(rows) + offset + 1
                last = self.last_checkpoint
                raise NonFiniteLossError(
                    f"non-finite loss or gradient ({bad_values}) at step {bad}; last good "
                    f"checkpoint: {last if last is not None else 'none'} "
                    f"in {checkpoints.checkpoint_dir(self.workdir)}. Re-running the same "
                    "command repeats the same batches from there; to change the learning rate, "
                    "optimizer.grad_clip_norm or the data, start a new --workdir (or, with no "
                    "checkpoint yet, re-run in this one).")


@dataclasses.dataclass(frozen=True)
class PeriodicAction:
    """Something the loop does after step `done` when `due(done)`: `run(done, state)`, after
    the training log is flushed up to that step (so a non-finite loss is reported as such
    first). Actions that are not training (evaluations, saves) restart the images/s window."""

    due: Callable[[int], bool]
    run: Callable[[int, Any], None]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       after_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir` and returns the test-split evaluation.

    after_step(done): called after each step's actions (its checkpoint included), e.g. by
    tests that interrupt a run at an exact point.
    """
    parallel.maybe_initialize_distributed(config.parallel.distributed)
    workdir = pathlib.Path(workdir).resolve()
    is_writer = jax.process_index() == 0
    mesh = parallel.make_mesh()
    validate_run_config(config, num_devices=mesh.size)
    runfiles.prepare_workdir(workdir, is_writer)
    with runfiles.exclusive_workdir(workdir, is_writer):
        return _train_in(workdir, config, mesh, is_writer, after_step)


@dataclasses.dataclass(frozen=True)
class _Data:
    """The run's splits, the evaluations its config selects, and its training sampler."""

    splits: Mapping[str, data.Dataset]
    evaluations: list[evaluators.Prepared]  # eval.evaluators.prepare: run by phase
    sampler: data.RowSampler
    workers: int  # input worker processes (0: a background thread)


def _load_data(config: ml_collections.ConfigDict, workdir: pathlib.Path,
               mesh: jax.sharding.Mesh, resuming: bool, moved_from: str | None) -> _Data:
    """Loads and splits the data; a resumed run must see the same people, with the same image
    counts (`moved_from`: the data.root it was recorded with, when this one is another). Every
    check that needs the data (enough identities, a test split big enough for its pairs, the
    .bin sets of eval.verification_sets) runs here, before compiling."""
    workers = data.worker_count(config.data) if data.pipeline_of(config.data) == "stream" else 0
    dataset = data.load_dataset(config.data)
    _check_enough_identities(dataset)
    splits = data.split_dataset(dataset, config.data)
    if resuming:
        data.check_split_record(workdir / runfiles.SPLIT_FILE, splits, moved_from=moved_from)
        if moved_from is not None:
            logging.info("data.root %s: resuming a run trained on %s, which held the same "
                         "identities and image counts (config.json keeps %s)",
                         config.data.root, moved_from, moved_from)
    return _Data(
        splits=splits, evaluations=evaluators.prepare(config, splits),
        sampler=data.make_sampler(splits["train"], config, num_shards=mesh.size),
        workers=workers)


def _train_in(workdir: pathlib.Path, config: ml_collections.ConfigDict,
              mesh: jax.sharding.Mesh, is_writer: bool,
              after_step: Callable[[int], None] | None) -> dict[str, Any]:
    """train_and_evaluate's body, run while this process holds DIR's lock."""
    reached = checkpoints.latest_step(workdir)  # read once: the checks below all need it
    resumed = runfiles.check_resume_config(workdir, config, reached)
    moved_from = _moved_root(resumed, config)
    runfiles.check_num_steps(reached, config.num_steps)
    if reached is None and config.model.init_from is not None:  # a resume never reads it
        finetune.check_init_dir(config.model.init_from)
    model = build_model(config, bn_axis_name=None)  # the step is jitted over the global batch
    tx, schedule = build_optimizer(config)
    has_head = objectives.has_parameters(config)

    def state_shapes(**sizes: int) -> Any:
        """The train state's shapes (traced once: the free-space check before compiling and
        model.init_from's structure check both read them)."""
        shapes = jax.eval_shape(lambda: create_train_state(config, model, tx, **sizes))
        if is_writer:
            checkpoints.check_free_space(workdir, shapes)
        return shapes

    if not has_head:  # a head's size depends on the data: checked once it is loaded
        shapes = state_shapes()
    run_data = _load_data(config, workdir, mesh, resuming=reached is not None,
                          moved_from=moved_from)
    sizes = dict(num_classes=run_data.splits["train"].num_identities, num_shards=mesh.size)
    if has_head:
        shapes = state_shapes(**sizes)
    objective = objectives.from_config(config, **sizes)

    host_state = finetune.initial_state(config, model, tx, resuming=reached is not None,
                                        shapes=shapes, **sizes)
    state_specs = partition_specs(host_state, objective, tx)
    state = parallel.put_with_specs(host_state, state_specs, mesh)
    manager = checkpoints.make_manager(workdir, max_to_keep=config.keep_checkpoints)
    restored = checkpoints.restore_latest(manager, state)
    start_step = 0
    if restored is not None:
        state, start_step = restored
        logging.info("resumed from step %d", start_step)
    if is_writer:
        truncate_metrics(workdir, start_step)
        runfiles.write_config(workdir, _recorded_config(config, moved_from),
                              init_from=_init_from_record(config, resumed))
        data.write_split_record(workdir / runfiles.SPLIT_FILE, run_data.splits)

    eval_model = model
    train_model = model
    if features_cache.enabled(config) and config.num_steps > start_step:
        # The restored state's backbone is model.init_from's on a resume too (frozen).
        sampler, train_model = features_cache.cached_training(
            config, model, eval_model, state.variables, run_data.sampler, mesh)
        run_data = dataclasses.replace(run_data, sampler=sampler)

    def compiled_step(objective: objectives.Objective):
        return make_train_step(
            mesh, state_specs=state_specs, model=train_model, tx=tx, schedule=schedule,
            objective=objective,
            freeze_backbone_stats=config.optimizer.backbone_lr_multiplier == 0)

    step_fn = compiled_step(objective)
    warmup_steps = config.loss.warmup_steps
    warmup_fn = (compiled_step(objectives.from_config(config, warmup=True, **sizes))
                 if warmup_steps else None)
    embed = make_embedder(eval_model, mesh,
                          batch_size=config.eval.batch_size, flip=config.eval.flip,
                          flip_mode=config.eval.flip_mode)
    # TensorBoard drops the events a killed earlier attempt logged past the restored step.
    writer = MetricsWriter(workdir, enabled=is_writer,
                           purge_step=start_step + 1 if restored is not None else None)
    progress = _Progress(start_step, config.num_steps, enabled=is_writer,
                         fields=objective.progress_fields)
    log = _TrainingLog(
        workdir=workdir, writer=writer, progress=progress, objective=objective,
        batch_size=config.batch.identities * config.batch.images_per_identity,
        num_steps=config.num_steps,
        last_checkpoint=start_step if restored is not None else None, is_writer=is_writer,
        replaced_images=lambda: run_data.sampler.replaced_images)

    def evaluate_at(phase: str, step: int, state: Any) -> dict[str, Any]:
        """The one evaluation path: the run's evaluator entries of `phase` after `step`."""
        return evaluators.run_phase(run_data.evaluations, phase, evaluators.EvalContext(
            step=step, variables=state.variables, embed=embed, phase=phase, writer=writer,
            workdir=workdir, is_writer=is_writer))

    if restored is None:  # a fresh run: e.g. model.init_from's encoder before any step
        evaluate_at("start", 0, state)

    with _Preemption() as preemption:
        actions = _periodic_actions(config, run_data, log, manager, preemption, evaluate_at)
        steps = range(start_step, config.num_steps)
        for step, (images, labels) in zip(steps, device_batches(
                run_data.sampler, mesh, steps, config.data.prefetch, run_data.workers)):
            state, metrics = (warmup_fn if step < warmup_steps else step_fn)(state, images,
                                                                             labels)
            log.add(metrics)
            done = step + 1
            for action in actions:
                if action.due(done):
                    log.flush(done)
                    action.run(done, state)
            if after_step is not None:
                after_step(done)
            if preemption.requested:
                logging.warning("SIGTERM: saved step %d; re-run the same command to resume",
                                done)
                progress.close()
                writer.close()
                return {"preempted": True, "step": done}
    log.flush(config.num_steps)
    progress.close()
    if not config.num_steps and restored is None:
        # num_steps=0 (model.init_from as it is): the step-0 checkpoint the loop never saves,
        # so the run folder is evaluated (crossval, evaluate --workdir) like any other.
        checkpoints.save(manager, 0, state)
    try:
        results = evaluate_at("end", config.num_steps, state)
        if is_writer and config.num_steps:  # num_steps=0 trained nothing: no curve to draw
            plots.plot_training_curves(read_metrics(workdir),
                                       workdir / runfiles.TRAINING_CURVES_FILE)
        return results["test"]
    finally:
        writer.close()


def _periodic_actions(config: ml_collections.ConfigDict, run_data: _Data, log: _TrainingLog,
                      manager: Any, preemption: _Preemption,
                      evaluate_at: Callable[[str, int, Any], Any]) -> list[PeriodicAction]:
    """In order: the training log line, the evaluator entries of phase "every" (the
    validation split, the .bin sets) each eval_every steps, the checkpoint (also on SIGTERM)."""
    num_steps = config.num_steps

    def evaluate_every(done: int, state: Any) -> None:
        evaluate_at("every", done, state)
        log.restart()  # images/s measures training alone

    def save(done: int, state: Any) -> None:
        log.writer.flush()  # TensorBoard up to date with the checkpoint, as metrics.jsonl is
        checkpoints.save(manager, done, state)
        log.restart()
        log.last_checkpoint = done

    actions = [PeriodicAction(lambda d: d % config.log_every == 0 or d == num_steps,
                              lambda d, s: None)]  # the flush before each action logs
    if evaluators.due_every(run_data.evaluations):
        actions.append(PeriodicAction(lambda d: d % config.eval_every == 0, evaluate_every))
    actions.append(PeriodicAction(
        lambda d: d % config.checkpoint_every == 0 or d == num_steps or preemption.requested,
        save))
    return actions


def _moved_root(resumed: Mapping[str, Any] | None,
                config: ml_collections.ConfigDict) -> str | None:
    """The data.root a resumed run (`resumed`: its config.json) was recorded with, when the
    current config reaches its data by another path (runfiles.RELOCATABLE_KEYS); else None."""
    if resumed is None:
        return None
    recorded = resumed["config"]["data"]["root"]
    return recorded if recorded != config.data.root else None


def _recorded_config(config: ml_collections.ConfigDict,
                     moved_from: str | None) -> ml_collections.ConfigDict:
    """The config that config.json records: a moved data.root keeps its first value (the
    resume logs the new one)."""
    if moved_from is None:
        return config
    recorded = config.copy_and_resolve_references()
    recorded.data.root = moved_from
    return recorded


def _init_from_record(config: ml_collections.ConfigDict,
                      resumed: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The provenance's "init_from" ({"path", "step"} of the run a fine-tune started from):
    read from model.init_from on a fresh start, kept from config.json on a resume (which never
    reads DIR again)."""
    if resumed is not None:
        return resumed["provenance"].get("init_from")
    if config.model.init_from is None:
        return None
    return finetune.init_source(config.model.init_from)
