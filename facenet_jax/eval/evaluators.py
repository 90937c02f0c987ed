"""Every evaluation a run can get, as entries of one registry (EVALUATORS), listed in one place:
the bottom of this module. An entry has up to two faces:

- in training (`when` + `prepare`): selected and parameterised by the run's config keys
  (`eval_every`, `eval.verification_sets`, `eval.*`, `model.init_from`), prepared once from the
  config and the run's splits before anything compiles (a bad .bin folder or a test split too
  small for its pairs fails there), then run by the one loop `run_phase` at the phases it
  names: "start" (step 0 of a fresh run), "every" (each `eval_every` steps) and "end" (after
  the last step);
- in `python -m facenet_jax.evaluate` (`flag` + `run_flags`): selected by its flag (none: the
  default mode), with the flags it reads listed (`flags`): `select_from_flags` refuses a flag
  that no selected entry reads, and entries of another kind (`group`), in one line, before
  anything loads.

The entries, in the order they run:

    name               training                                   evaluate
    finetune_baseline  start: the validation split at step 0      -
                       when model.init_from is set (eval/...)
    validation         every: the validation split (eval/...);    -
                       end: → eval_validation.json + figures
    verification_sets  every: eval/<set>/accuracy of the sets in  --verification_sets FOLDER
                       eval.verification_sets                     → eval_verification_sets.json
    test               end: → eval.json + figures, test/... in    -
                       metrics.jsonl and TensorBoard
    run_split          -                                          default (--split S, or
                                                                  --data_root F [--pairs P])
    ijb                -                                          --ijb ROOT → eval_<ijb>.json
    pixels             -                                          --baseline pixels
    load_and_eval      -                                          --evaluators all|NAMES: the
                                                                  "end" entries above, on the
                                                                  latest checkpoint
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from facenet_jax import data, runfiles
from facenet_jax.config import overrides_from_texts
from facenet_jax.eval import evaluate, ijb, verification_sets
from facenet_jax.eval.metrics import protocol_options
from facenet_jax.logs import MetricsWriter, drop_metric_rows
from facenet_jax.registry import Registry

PHASES = ("start", "every", "end")
Embedder = Callable[[Any, np.ndarray], np.ndarray]  # embed(variables, uint8 [N,H,W,3]) -> [N,D]


@dataclasses.dataclass
class EvalInputs:
    """What the entries are prepared from: the run's config and splits; each split's pairs
    are generated once (`pairs`), whichever entries need them."""

    config: ml_collections.ConfigDict
    splits: Mapping[str, data.Dataset]
    _pairs: dict[str, data.Pairs] = dataclasses.field(default_factory=dict)

    def pairs(self, split: str) -> data.Pairs:
        """The config's generated pairs of `split` (ValueError below 2 identities)."""
        if split not in self._pairs:
            self._pairs[split] = evaluate.generated_pairs(self.config, self.splits[split], split)
        return self._pairs[split]


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What a prepared evaluation reads when it runs: the encoder's variables after `step`
    steps, the embedder, the phase, and where results go (the training log; the run folder,
    written by process 0 alone)."""

    step: int
    variables: Any
    embed: Embedder
    phase: str
    writer: MetricsWriter
    workdir: pathlib.Path
    is_writer: bool


Run = Callable[[EvalContext], dict[str, Any] | None]


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """One registry entry.

    when, prepare: the training face. prepare(EvalInputs) -> run(EvalContext) -> result (or
    None), or None when the config selects no such evaluation; run at each phase of `when`.
    flag, run_flags: the evaluate command's face. The entry runs when `flag` is given (with
    choice=True, when the flag's value is the entry's name: `--baseline pixels`); flag None:
    the default mode. flags: the other flags it reads; writes: what it writes (for messages);
    check(flags): its own refusals, run for every selected entry before any runs;
    run_flags(flags) -> the text the command prints. group: entries of one group run in one
    command (the benchmarks of a checkpoint), others are refused beside them.
    """

    when: tuple[str, ...] = ()
    prepare: Callable[[EvalInputs], Run | None] | None = None
    flag: str | None = None
    choice: bool = False
    flags: tuple[str, ...] = ()
    writes: str = ""
    group: str = ""
    check: Callable[[Any], None] | None = None
    run_flags: Callable[[Any], str] | None = None


EVALUATORS: Registry[Evaluator] = Registry("evaluator")


# ----------------------------------------------------------------------------------------------
# Training: prepare the configured entries once, run them by phase.


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An entry the run's config selects, ready to run."""

    name: str
    when: tuple[str, ...]
    run: Run


def prepare(config: ml_collections.ConfigDict, splits: Mapping[str, data.Dataset], *,
            names: Sequence[str] | None = None) -> list[Prepared]:
    """The entries the config selects (among `names`, default all), in registration order,
    prepared from the run's splits (pairs generated, .bin sets read: errors surface here,
    before compiling)."""
    inputs = EvalInputs(config, splits)
    prepared = []
    for name in names or EVALUATORS.names():
        entry = EVALUATORS.get(name)
        run = entry.prepare(inputs) if entry.prepare is not None else None
        if run is not None:
            prepared.append(Prepared(name, entry.when, run))
    return prepared


def due_every(prepared: Sequence[Prepared]) -> bool:
    """Whether any prepared entry runs every `eval_every` steps (the loop's periodic action)."""
    return any("every" in entry.when for entry in prepared)


def run_phase(prepared: Sequence[Prepared], phase: str, context: EvalContext
              ) -> dict[str, dict[str, Any] | None]:
    """The one evaluation loop: every prepared entry whose `when` holds `phase`, in order →
    {name: its result}."""
    if phase not in PHASES:
        raise ValueError(f"unknown evaluation phase {phase!r}; valid phases: {PHASES}")
    context = dataclasses.replace(context, phase=phase)
    return {entry.name: entry.run(context) for entry in prepared if phase in entry.when}


def end_entries() -> tuple[str, ...]:
    """The entries that run at the end of training (phase "end"), in registration order."""
    return tuple(name for name in EVALUATORS.names() if "end" in EVALUATORS.get(name).when)


def load_and_eval(workdir: str | pathlib.Path, names: Sequence[str] | None = None
                  ) -> dict[str, dict[str, Any] | None]:
    """An evaluation-only run (big_vision's `load_and_eval`): DIR's latest checkpoint through
    the same entries, prepared from its recorded config and splits, that its last step runs
    (phase "end"; `names`: some of `end_entries()`, default all), writing what they write at
    the end of training: eval_validation.json, eval.json (+ figures) and the test/... rows of
    the training log, at the checkpoint's step (its earlier test/... rows there replaced). DIR's
    lock is held as by training. → {name: result}."""
    from facenet_jax.eval.embed import load_encoder  # local: jax only where a model is loaded

    valid = end_entries()
    unknown = [name for name in names or () if name not in valid]
    if unknown:
        raise ValueError(f"--evaluators {','.join(unknown)}: not an evaluation the end of "
                         f"training runs; choose from {', '.join(valid)}")
    workdir = pathlib.Path(workdir)
    if not (workdir / runfiles.SPLIT_FILE).exists():
        raise ValueError(f"{workdir} holds no {runfiles.SPLIT_FILE} (imported weights?): it has "
                         "no splits of its own to evaluate; use --data_root FOLDER instead")
    encoder = load_encoder(workdir)
    config = encoder.config
    splits = data.split_dataset(data.load_dataset(config.data), config.data)
    data.check_split_record(workdir / runfiles.SPLIT_FILE, splits)
    chosen = prepare(config, splits, names=names or valid)
    with runfiles.exclusive_workdir(workdir, is_writer=True):
        writer = MetricsWriter(workdir)
        try:
            return run_phase(chosen, "end", EvalContext(
                step=encoder.step, variables=encoder.variables, embed=encoder.embedder,
                phase="end", writer=writer, workdir=workdir, is_writer=True))
        finally:
            writer.close()


def logged_numbers(prefix: str, result: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation's numbers as training-log keys PREFIX/KEY (lists, strings and the
    val@far=T_resolved flags left out): the step-0, periodic and final evaluations share it."""
    return {f"{prefix}/{k}": v for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _log_validation(inputs: EvalInputs, pairs: data.Pairs, context: EvalContext, label: str
                    ) -> dict[str, Any]:
    """The validation split's verification, logged as eval/... at the context's step and shown
    as a line starting with `label`."""
    result = evaluate.evaluate_dataset(context.embed, context.variables,
                                       inputs.splits["validation"], pairs,
                                       **protocol_options(inputs.config.eval))
    context.writer.write(context.step, logged_numbers("eval", result))
    logging.info("%s at step %d: accuracy %.4f ± %.4f, AUC %.4f (%d pairs)", label,
                 context.step, result["accuracy"], result["accuracy_std"], result["auc"],
                 result["num_pairs"])
    return result


def _has_validation(inputs: EvalInputs) -> bool:
    return inputs.splits["validation"].num_identities >= 2


def _prepare_finetune_baseline(inputs: EvalInputs) -> Run | None:
    """model.init_from with steps to train: its encoder on the validation split before any
    step (eval/... at step 0), so the fine-tune's gain can be read off its log."""
    config = inputs.config
    if config.model.init_from is None or not config.num_steps:
        return None
    pairs = inputs.pairs("validation") if _has_validation(inputs) else None

    def run(context: EvalContext) -> dict[str, Any] | None:
        if pairs is None:
            logging.info("fine-tune baseline: no validation split (data.split.validation) to "
                         "score model.init_from=%s on at step 0", config.model.init_from)
            return None
        return _log_validation(inputs, pairs, context, "fine-tune baseline (model.init_from="
                               f"{config.model.init_from}) on the validation split")
    return run


def _prepare_validation(inputs: EvalInputs) -> Run | None:
    """The validation split (2 identities or more): every eval_every steps its k-fold numbers
    in the training log; at the end DIR/eval_validation.json (+ figures), whose threshold is
    the run's (threshold.run_threshold)."""
    if not _has_validation(inputs):
        return None
    pairs = inputs.pairs("validation")

    def run(context: EvalContext) -> dict[str, Any]:
        if context.phase != "end":
            return _log_validation(inputs, pairs, context, "validation split")
        return evaluate.evaluate_run_test_split(
            inputs.config, context.workdir, context.embed, context.variables,
            inputs.splits["validation"], step=context.step, write=context.is_writer,
            split="validation")
    return run


def _prepare_training_sets(inputs: EvalInputs) -> Run | None:
    """The .bin sets of eval.verification_sets (names: eval.verification_set_names), read once
    here (a bad folder or file fails before compiling), scored every eval_every steps:
    eval/<set>/accuracy."""
    config = inputs.config
    sets = verification_sets.configured_sets(config.eval, config.data.image_size, config.data)
    if not sets:
        return None

    def run(context: EvalContext) -> dict[str, Any]:
        numbers = verification_sets.training_metrics(
            functools.partial(context.embed, context.variables), sets,
            **protocol_options(config.eval))
        context.writer.write(context.step, numbers)
        return numbers
    return run


def _prepare_test(inputs: EvalInputs) -> Run:
    """The test split, after the last step: DIR/eval.json (+ figures), its numbers and figures
    as test/... in the training log. Its pairs are generated here: a test split too small for
    them fails before compiling."""
    inputs.pairs("test")

    def run(context: EvalContext) -> dict[str, Any]:
        result = evaluate.evaluate_run_test_split(
            inputs.config, context.workdir, context.embed, context.variables,
            inputs.splits["test"], step=context.step, write=context.is_writer)
        if context.is_writer:
            drop_metric_rows(context.workdir, context.step, "test")
            context.writer.write(context.step, logged_numbers("test", result))
            context.writer.write_images(context.step, {
                f"test/{name}": path for name, path in result["figures"].items()})
        return result
    return run


# ----------------------------------------------------------------------------------------------
# The evaluate command: entries selected by their flags.

# How a flag is named in messages (run_config is given as --config.eval.KEY=VALUE).
_FLAG_TEXT = {"run_config": "--config.eval.KEY=VALUE"}


def _flag_text(name: str) -> str:
    return _FLAG_TEXT.get(name, f"--{name}")


def _given(flags: Any, name: str) -> bool:
    """Whether flag `name` holds a value (None and an empty list are absent)."""
    return getattr(flags, name, None) not in (None, [], ())


def _selected(entry: Evaluator, name: str, flags: Any) -> bool:
    if entry.flag is None:
        return False
    value = getattr(flags, entry.flag, None)
    return value == name if entry.choice else _given(flags, entry.flag)


def _selector_text(entry: Evaluator, name: str) -> str:
    """How a selected entry is named in messages: its flag (the default mode: --workdir)."""
    if entry.flag is None:
        return "--workdir DIR alone"
    return f"--{entry.flag} {name}" if entry.choice else f"--{entry.flag}"


def select_from_flags(flags: Any) -> list[tuple[str, Evaluator]]:
    """The entries an evaluate command line selects, with every refusal that comes from the
    entries, before anything loads: the entries whose flag is given (else the default mode),
    of one group (the first selected entry's); a given flag that no selected entry reads, or a
    flag of another group's entry, is refused in one line naming what the selected entries
    write; --output with more than one entry (it names one file); then each entry's own
    `check`."""
    entries = [(name, EVALUATORS.get(name)) for name in EVALUATORS.names()
               if EVALUATORS.get(name).run_flags is not None]
    chosen = [(name, entry) for name, entry in entries if _selected(entry, name, flags)]
    if chosen:
        group = chosen[0][1].group
        chosen = [(name, entry) for name, entry in chosen if entry.group == group]
    else:
        chosen = [(name, entry) for name, entry in entries if entry.flag is None]
    read = {flag for _, entry in chosen for flag in (entry.flag, *entry.flags) if flag}
    known = dict.fromkeys(flag for _, entry in entries for flag in (entry.flag, *entry.flags)
                          if flag)  # registration order, for the message
    unused = [flag for flag in known if flag not in read and _given(flags, flag)]
    if unused:
        selected = " / ".join(_selector_text(entry, name) for name, entry in chosen)
        verb = "they write" if len(chosen) > 1 else "it writes"
        raise ValueError(f"{', '.join(map(_flag_text, unused))}: not used with {selected} "
                         f"({verb} {', '.join(entry.writes for _, entry in chosen)}): run them "
                         "as a separate command")
    if _given(flags, "output") and len(chosen) > 1:
        raise ValueError(f"--output names one file, but {len(chosen)} benchmarks run: give "
                         f"{' and '.join(_selector_text(e, n) for n, e in chosen)} separate "
                         "commands, each with its --output")
    for _, entry in chosen:
        if entry.check is not None:
            entry.check(flags)
    return chosen


def _needs_workdir(selector: str) -> Callable[[Any], None]:
    def check(flags: Any) -> None:
        if flags.workdir is None:
            raise ValueError(f"{selector} needs --workdir DIR (a trained run)")
    return check


def benchmark_flip(flags: Any) -> bool | None:
    """--flip for a benchmark of a checkpoint: given, else on (as the field evaluates them)
    unless --config.eval.flip sets it (None: the run's eval.flip, overridden)."""
    if flags.flip is not None:
        return flags.flip
    overrides = overrides_from_texts(flags.run_config)
    return None if "eval.flip" in overrides else True


def _verification_sets_from_flags(flags: Any) -> str:
    """`python -m facenet_jax.evaluate --workdir DIR --verification_sets FOLDER [--names]
    [--output FILE]`."""
    output = verification_sets.output_path(flags.workdir, flags.output)
    results = verification_sets.evaluate_workdir_sets(
        flags.workdir, flags.verification_sets, names=flags.names, flip=benchmark_flip(flags),
        output=output, eval_overrides=overrides_from_texts(flags.run_config))
    return f"{verification_sets.markdown_table(results)}\nwrote {output}"


def _ijb_from_flags(flags: Any) -> str:
    """`python -m facenet_jax.evaluate --workdir DIR --ijb ROOT --ijb_name IJBB|IJBC
    [--output FILE]` (its own protocol: no --config.eval.KEY=VALUE)."""
    output = (pathlib.Path(flags.output) if flags.output
              else ijb.output_path(flags.workdir, flags.ijb_name))
    result = ijb.evaluate_workdir_ijb(flags.workdir, flags.ijb, flags.ijb_name,
                                      flip=benchmark_flip(flags),
                                      use_detector_score=flags.ijb_detector_score,
                                      output=output)
    return f"{ijb.format_ijb_summary(result)}\nwrote {output}"


def _check_pixels_flags(flags: Any) -> None:
    if flags.run_config and flags.config is None:
        raise ValueError("--config.KEY=VALUE with --baseline needs --config FILE (the config "
                         "the baseline floors); the eval keys of a --workdir run are changed "
                         "by --config.eval.KEY=V without --baseline")


def _pixels_from_flags(flags: Any) -> str:
    """`python -m facenet_jax.evaluate --baseline pixels (--config CONFIG --output FILE |
    --workdir DIR)`."""
    config, output = evaluate.baseline_inputs("pixels", flags.config, flags.workdir,
                                              flags.output)
    evaluate.check_output_holds_the_same_evaluation(output, None, None, baseline="pixels")
    result = evaluate.evaluate_pixels(config, output)
    return f"{evaluate.format_summary(result)}\nwrote {output}"


def _check_run_split_flags(flags: Any) -> None:
    if flags.workdir is None:
        raise ValueError("give --workdir DIR (a trained run) or --baseline pixels "
                         "--config CONFIG --output FILE")
    if flags.pairs is not None and flags.data_root is None:
        raise ValueError("--pairs needs --data_root (the image folder it names)")
    if flags.run_config and not flags.output:
        raise ValueError("--config.eval.KEY=VALUE evaluates with another protocol than the "
                         "run's: pass --output FILE (the run's own evaluation files are "
                         "kept unless you name one)")


def _load_and_eval_from_flags(flags: Any) -> str:
    """`python -m facenet_jax.evaluate --workdir DIR --evaluators all|validation,test`."""
    names = None if flags.evaluators == "all" else [
        name.strip() for name in flags.evaluators.split(",") if name.strip()]
    results = load_and_eval(flags.workdir, names)
    files = {"validation": runfiles.VALIDATION_EVAL_FILE, "test": runfiles.EVAL_FILE}
    return "\n".join(f"{name} ({pathlib.Path(flags.workdir) / files.get(name, name)}):\n"
                     f"{evaluate.format_summary(result)}"
                     for name, result in results.items() if result is not None)


def _run_split_from_flags(flags: Any) -> str:
    """`python -m facenet_jax.evaluate --workdir DIR [--split S | --data_root F [--pairs P]
    [--fold K]] [--threshold T|run] [--output F] [--config.eval.KEY=V]`."""
    workdir = pathlib.Path(flags.workdir)
    output = (pathlib.Path(flags.output) if flags.output
              else workdir / evaluate.run_split_eval_file(flags.split))
    result = evaluate.evaluate_workdir(
        workdir, data_root=flags.data_root, pairs_file=flags.pairs, output=output,
        threshold=evaluate.threshold_flag(flags.threshold), fold=flags.fold, split=flags.split,
        eval_overrides=overrides_from_texts(flags.run_config))
    return f"{evaluate.format_summary(result)}\nwrote {output}"


# ----------------------------------------------------------------------------------------------
# The entries, in the order they run.

EVALUATORS.add("finetune_baseline", Evaluator(when=("start",),
                                              prepare=_prepare_finetune_baseline))
EVALUATORS.add("validation", Evaluator(when=("every", "end"), prepare=_prepare_validation))
EVALUATORS.add("verification_sets", Evaluator(
    when=("every",), prepare=_prepare_training_sets,
    flag="verification_sets", flags=("workdir", "names", "flip", "output", "run_config"),
    writes=f"--output or DIR/{verification_sets.OUTPUT_FILE}", group="benchmark",
    check=_needs_workdir("--verification_sets"), run_flags=_verification_sets_from_flags))
EVALUATORS.add("test", Evaluator(when=("end",), prepare=_prepare_test))
EVALUATORS.add("run_split", Evaluator(
    flags=("workdir", "data_root", "pairs", "output", "fold", "threshold", "run_config"),
    writes="--output or DIR/eval.json (eval_<split>.json)", check=_check_run_split_flags,
    run_flags=_run_split_from_flags))
EVALUATORS.add("ijb", Evaluator(
    flag="ijb", flags=("workdir", "flip", "output"), writes="--output or DIR/eval_<ijb>.json",
    group="benchmark", check=_needs_workdir("--ijb"), run_flags=_ijb_from_flags))
EVALUATORS.add("pixels", Evaluator(
    flag="baseline", choice=True, flags=("config", "workdir", "output", "run_config"),
    writes="--output or DIR/eval_pixels.json", group="baseline", check=_check_pixels_flags,
    run_flags=_pixels_from_flags))
EVALUATORS.add("load_and_eval", Evaluator(
    flag="evaluators", flags=("workdir",), group="run", check=_needs_workdir("--evaluators"),
    writes="what the end of training writes (eval_validation.json, eval.json, test/... rows)",
    run_flags=_load_and_eval_from_flags))
BASELINES = tuple(name for name in EVALUATORS.names() if EVALUATORS.get(name).flag == "baseline")
