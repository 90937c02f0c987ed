"""Throughput of the full train step (encoder fwd + mining + loss + bwd + update).

For each encoder at its input size, each P×K, device count and compute dtype: compile time
(separately), step time, images/s, the share of the step spent in distances + mining + loss, the
convolutions' dtypes as requested by the program and as compiled by XLA (does bfloat16 really
compute in bfloat16?), the compiled program's temporary memory, and on accelerators the model
FLOPs utilisation (XLA's cost analysis of the compiled step against the device's peak). Prints a
markdown table and writes JSON (rewritten after every row, so a cut-off run keeps what it
measured).

The mining + loss share is measured two ways (--share):
  alone       the same loss (distances + mining + loss, fwd + bwd) on random unit embeddings of
              the step's global shape [B, D], jitted alone on one device, over the step time;
  difference  (step − the same step with the loss replaced by a linear function of the anchor
              embeddings) over the step: what the real loss costs inside the compiled step,
              including the all_gather, at the price of a second compile.

    python benchmarks/train_step.py                                  # CPU-sized defaults
    python benchmarks/train_step.py --models resnet50 --batches 45x40 --dtypes bfloat16,float32 \
        --devices 1 --steps 10 --output benchmarks/results/train_step_gpu.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import re
import sys
import time
from typing import Any
from unittest import mock

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.output_file import add_output_arguments, refuse_existing  # noqa: E402

# Peak dense FLOP/s by device kind substring: (float32 via TF32 tensor cores, bfloat16).
PEAK_FLOPS = {
    "H200": (494e12, 989e12), "H100": (494e12, 989e12), "A100": (156e12, 312e12),
    "L4": (60e12, 121e12), "V100": (15.7e12, 125e12), "TPU v4": (275e12, 275e12),
    "TPU v5": (197e12, 197e12),
}
INPUT_SIZE = {"small_cnn": 32, "resnet18": 112, "resnet34": 112, "resnet50": 112,
              "inception_resnet_v1": 160}
DTYPES = ("float32", "bfloat16")
SHARE_METHODS = ("alone", "difference", "both")
# A convolution's result type in StableHLO (what JAX asks for) and in compiled HLO (what XLA
# runs: plain `convolution` on CPU, cuDNN custom calls on GPU, whose result is a tuple).
_STABLEHLO_CONV = re.compile(r"stablehlo\.convolution.*->\s*tensor<[^>]*x(\w+)>")
_HLO_CONV = re.compile(r"=\s*\(?(\w+)\[[^\n]*?\s(?:convolution\(|custom-call\([^\n]*"
                       r"custom_call_target=\"[^\"]*conv)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small_cnn,resnet18")
    parser.add_argument("--batches", default="32x4,45x40", help="P×K list, e.g. 32x4,45x40")
    parser.add_argument("--devices", default="1", help="device counts (CPU: forced host devices)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--strategy", default="semihard")
    parser.add_argument("--share", default="both", choices=SHARE_METHODS,
                        help="how to measure the distances + mining + loss share (see above)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing rounds (variants alternate; the fastest round counts)")
    parser.add_argument("--image_size", type=int, default=None, help="override every model's")
    add_output_arguments(parser, "benchmarks/results/train_step.json",
                         what="output JSON, rewritten after every row")
    args = parser.parse_args(argv)
    refuse_existing(parser, [args.output], args.overwrite)
    args.models = args.models.split(",")
    args.layouts = [parse_layout(text) for text in args.batches.split(",")]
    args.device_counts = [int(d) for d in args.devices.split(",")]
    args.dtypes = args.dtypes.split(",")
    for model in args.models:
        if model not in INPUT_SIZE:
            parser.error(f"unknown model {model!r}; choose from {', '.join(INPUT_SIZE)}")
    for dtype in args.dtypes:
        if dtype not in DTYPES:
            parser.error(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    for p, _ in args.layouts:
        for devices in args.device_counts:
            if devices < 1 or p % devices:
                parser.error(f"P={p} identities cannot be split over {devices} devices (each "
                             "device holds whole identities); choose P divisible by it")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    return args


def parse_layout(text: str) -> tuple[int, int]:
    """"45x40" -> (45, 40): P identities × K images each (K ≥ 2 so positives exist)."""
    match = re.fullmatch(r"(\d+)[x×](\d+)", text.strip().lower())
    if not match or int(match.group(1)) < 2 or int(match.group(2)) < 2:
        raise SystemExit(f"bad P×K {text!r}: write it as PxK with P ≥ 2 and K ≥ 2, e.g. 32x4")
    return int(match.group(1)), int(match.group(2))


def force_host_devices(count: int) -> None:
    """Asks XLA for `count` CPU devices; must run before jax is imported (ignored on GPUs)."""
    if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={count}").strip()


def main(argv: list[str]) -> list[dict]:
    args = parse_args(argv)
    force_host_devices(max(args.device_counts))
    import jax

    device = jax.devices()[0]
    report = {"device_kind": device.device_kind, "platform": device.platform,
              "host": host_description(), "jax": jax.__version__, "argv": argv, "rows": []}
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        size = args.image_size or INPUT_SIZE[model]
        for p, k in args.layouts:
            for devices in args.device_counts:
                for dtype in args.dtypes:
                    print(f"... {model} {size}px P×K={p}×{k} devices={devices} {dtype}",
                          flush=True)
                    row = measure(model, size, p, k, devices, dtype, args.strategy,
                                  args.steps, args.share, args.rounds)
                    report["rows"].append(row)
                    output.write_text(json.dumps(report, indent=2) + "\n")
                    print(format_row(row), flush=True)
    print(markdown_table(report["rows"], device.device_kind))
    print(f"wrote {output}")
    return report["rows"]


def host_description() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in
                  pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) \
        if pathlib.Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": model, "cpu_count": os.cpu_count(), "python": platform.python_version()}


def build_step(model_name: str, size: int, p: int, k: int, devices: int, dtype: str,
               strategy: str) -> tuple[Any, Any, Any, Any, Any, Any]:
    """(step, state, images, labels, loss spec, config) as facenet_jax.train builds them;
    images uint8 [P*K, size, size, 3] random, labels [P*K] in P×K order, batch-sharded."""
    import numpy as np

    from facenet_jax import config as cfg
    from facenet_jax import parallel
    from facenet_jax.state import build_model, build_optimizer, create_train_state
    from facenet_jax.train import LossSpec, make_train_step

    config = cfg.load_config(REPO / "experiments" / "default.py", {
        "model.name": model_name, "model.dtype": dtype, "data.image_size": size,
        "batch.identities": p, "batch.images_per_identity": k, "loss.strategy": strategy})
    mesh = parallel.make_mesh(devices)
    model = build_model(config, bn_axis_name=None)  # the step runs over global arrays
    tx, schedule = build_optimizer(config)
    state = parallel.put_replicated(create_train_state(config, model, tx), mesh)
    loss = LossSpec.from_config(config.loss)
    step = make_train_step(mesh, model=model, tx=tx, schedule=schedule, loss=loss,
                           mining="global")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (p * k, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(p), k).astype(np.int32)
    images, labels = parallel.put_global_batch((images, labels), mesh)
    return step, state, images, labels, loss, config


def time_steps(step: Any, state: Any, images: Any, labels: Any, steps: int
               ) -> tuple[Any, float]:
    """Seconds per step over `steps` back-to-back calls; the host waits only at the end (as
    the training loop does between log lines). Returns the final state (the input is donated)."""
    import jax

    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, images, labels)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - start) / steps


def time_interleaved(steps_by_name: dict[str, Any], state: Any, images: Any, labels: Any,
                     steps: int, rounds: int) -> tuple[Any, dict[str, float]]:
    """Per-step seconds of each compiled step, timed in alternating rounds after one warm-up
    call each; the fastest round counts. Alternation and the minimum keep load from other
    processes (a shared CPU) from falling on one variant only."""
    import jax

    best = {name: float("inf") for name in steps_by_name}
    for step in steps_by_name.values():
        state, metrics = step(state, images, labels)
        jax.block_until_ready(metrics)
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            state, seconds = time_steps(step, state, images, labels, steps)
            best[name] = min(best[name], seconds)
    return state, best


def linear_loss_sums(embeddings: Any, labels: Any, *, anchor_start: Any, num_anchors: int,
                     **unused: Any) -> dict[str, Any]:
    """A stand-in for `losses.triplet_loss_sums` with no distances or mining: the sum of the
    anchors' first coordinates. Its gradient is non-zero, so the encoder's backward pass still
    runs in full; only the loss's own work disappears. Same keys (SUM_KEYS), same scalars."""
    import jax.numpy as jnp
    from jax import lax

    from facenet_jax import losses

    anchors = lax.dynamic_slice_in_dim(embeddings, anchor_start, num_anchors)
    sums = {key: jnp.zeros((), jnp.float32) for key in losses.SUM_KEYS}
    sums["loss_sum"] = jnp.sum(anchors[:, 0])
    sums["count"] = jnp.asarray(num_anchors, jnp.float32)
    return sums


def time_loss_alone(loss: Any, labels: Any, embedding_dim: int, steps: int, rounds: int
                    ) -> float:
    """Seconds for the loss (distances + mining + loss, fwd + bwd) on random unit embeddings
    [B, D] of the step's global batch, jitted alone on one device (fastest of `rounds`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from facenet_jax import losses
    from facenet_jax.losses.distances import l2_normalize

    host_labels = jnp.asarray(np.asarray(labels))
    embeddings = jax.random.normal(jax.random.PRNGKey(0), (host_labels.shape[0], embedding_dim))
    embeddings = l2_normalize(embeddings)

    @jax.jit
    def loss_and_grad(e: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jax.value_and_grad(lambda x: losses.triplet_loss(
            x, host_labels, margin=loss.margin, strategy=loss.strategy, distance=loss.distance,
            soft=loss.soft, key=jax.random.PRNGKey(0), **dict(loss.options))[0])(e)

    jax.block_until_ready(loss_and_grad(embeddings))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            out = loss_and_grad(embeddings)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def conv_dtypes(lowered_text: str, compiled_text: str) -> dict[str, dict[str, int]]:
    """Counts of convolution result dtypes in the program JAX emits and in what XLA compiled.

    bfloat16 compute shows as bf16 in "requested"; if "compiled" says f32, the backend upcasts
    (XLA's CPU backend does: there bf16 only adds conversions)."""
    return {"requested": dict(collections.Counter(_STABLEHLO_CONV.findall(lowered_text))),
            "compiled": dict(collections.Counter(_HLO_CONV.findall(compiled_text)))}


def measure(model_name: str, size: int, p: int, k: int, devices: int, dtype: str,
            strategy: str, steps: int, share: str = "both", rounds: int = 3) -> dict:
    """One table row: compile time, step time (fastest of `rounds` rounds of `steps` steps),
    images/s, the loss share (by `share`, see the module docstring), conv dtypes, memory, MFU."""
    import jax

    from facenet_jax import losses

    step, state, images, labels, loss, config = build_step(model_name, size, p, k, devices,
                                                           dtype, strategy)
    param_dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(state.params)})
    start = time.perf_counter()
    lowered = step.lower(state, images, labels)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = _flops(compiled)
    memory = compiled.memory_analysis()
    convs = conv_dtypes(lowered.as_text(), compiled.as_text())
    variants = {"step": compiled}
    if share in ("difference", "both"):
        # The step is traced at lower(): patching the module attribute the triplet objective calls swaps
        # the loss in this one compiled program and nowhere else.
        with mock.patch.object(losses, "triplet_loss_sums", linear_loss_sums):
            baseline = build_step(model_name, size, p, k, devices, dtype, strategy)[0]
            variants["linear_loss_step"] = baseline.lower(state, images, labels).compile()
    state, seconds = time_interleaved(variants, state, images, labels, steps, rounds)
    step_s = seconds["step"]
    batch = p * k
    row = {"model": model_name, "image_size": size, "P": p, "K": k, "batch": batch,
           "devices": devices, "dtype": dtype, "param_dtypes": param_dtypes,
           "conv_dtypes": convs, "strategy": strategy, "steps": steps, "rounds": rounds,
           "compile_s": compile_s, "step_s": step_s, "images_per_s": batch / step_s,
           "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
           # Output bytes aliased to (donated) inputs: the state is updated in place.
           "donated_alias_bytes": getattr(memory, "alias_size_in_bytes", None),
           "flops_per_device_step": flops, "loss_alone_s": None, "loss_share_alone": None,
           "linear_loss_step_s": seconds.get("linear_loss_step"),
           "loss_share_difference": None, "mfu": None}
    if "linear_loss_step" in seconds:
        row["loss_share_difference"] = 1.0 - seconds["linear_loss_step"] / step_s
    if share in ("alone", "both"):
        row["loss_alone_s"] = time_loss_alone(loss, labels, config.model.embedding_dim, steps,
                                              rounds)
        row["loss_share_alone"] = row["loss_alone_s"] / step_s
    device = jax.devices()[0]
    peak = next((v for name, v in PEAK_FLOPS.items() if name in device.device_kind), None)
    if peak and flops and device.platform != "cpu":
        # cost_analysis describes the per-device (SPMD-partitioned) program.
        row["mfu"] = flops / step_s / peak[dtype == "bfloat16"]
    return row


def _flops(compiled: Any) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def format_row(row: dict) -> str:
    requested = "/".join(sorted(row["conv_dtypes"]["requested"])) or "–"
    compiled = "/".join(sorted(row["conv_dtypes"]["compiled"])) or "–"
    return (f"| {row['model']} | {row['image_size']} | {row['P']}×{row['K']} | "
            f"{row['devices']} | {row['dtype']} | {requested} → {compiled} | "
            f"{row['compile_s']:.1f} | {1000 * row['step_s']:.1f} | "
            f"{row['images_per_s']:.0f} | {_pct(row['loss_share_alone'])} | "
            f"{_pct(row['loss_share_difference'])} | {_pct(row['mfu'])} |")


def markdown_table(rows: list[dict], device_kind: str) -> str:
    header = (f"Device: {device_kind}\n\n| model | px | P×K | devices | dtype | convs (asked → "
              "compiled) | compile s | step ms | images/s | loss share (alone) | loss share "
              "(difference) | MFU |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([header, *map(format_row, rows)])


if __name__ == "__main__":
    main(sys.argv[1:])
