"""Throughput of the full train step (encoder fwd + mining + loss + bwd + update).

For each encoder at its input size, each P×K, device count and compute dtype: compile time
(separately), step time, images/s, the share of the step spent in distances + mining + loss (the
same loss on random embeddings of the same shape, fwd + bwd, timed alone), and on GPUs the model
FLOPs utilisation from XLA's cost analysis against the device's peak. Prints a markdown table and
writes JSON.

    python benchmarks/train_step.py                                  # CPU-sized defaults
    python benchmarks/train_step.py --models resnet50 --batches 45x40 --dtypes float32,bfloat16 \
        --devices 1 --steps 10 --output benchmarks/results/train_step_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

# Peak dense FLOP/s by device kind substring: (float32 via TF32 tensor cores, bfloat16).
PEAK_FLOPS = {
    "H200": (494e12, 989e12), "H100": (494e12, 989e12), "A100": (156e12, 312e12),
    "L4": (60e12, 121e12), "V100": (15.7e12, 125e12), "TPU v4": (275e12, 275e12),
    "TPU v5": (197e12, 197e12),
}
INPUT_SIZE = {"small_cnn": 32, "resnet18": 112, "resnet34": 112, "resnet50": 112,
              "inception_resnet_v1": 160}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small_cnn,resnet18")
    parser.add_argument("--batches", default="32x4,45x40", help="PxK list")
    parser.add_argument("--devices", default="1", help="device counts (CPU: forced host devices)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--strategy", default="semihard")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--image_size", type=int, default=None, help="override every model's")
    parser.add_argument("--output", default="benchmarks/results/train_step.json")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device_counts = [int(d) for d in args.devices.split(",")]
    if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={max(device_counts)}")
    import jax

    rows = []
    for model in args.models.split(","):
        for batch in args.batches.split(","):
            p, k = (int(v) for v in batch.lower().split("x"))
            for devices in device_counts:
                for dtype in args.dtypes.split(","):
                    size = args.image_size or INPUT_SIZE[model]
                    print(f"... {model} {size}px P×K={p}×{k} devices={devices} {dtype}",
                          flush=True)
                    rows.append(measure(model, size, p, k, devices, dtype, args.strategy,
                                        args.steps))
                    print(format_row(rows[-1]), flush=True)
    device = jax.devices()[0]
    report = {"device_kind": device.device_kind, "platform": device.platform,
              "jax": jax.__version__, "rows": rows}
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(markdown_table(rows, device.device_kind))
    print(f"wrote {output}")


def measure(model_name: str, size: int, p: int, k: int, devices: int, dtype: str,
            strategy: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from facenet_jax import config as cfg
    from facenet_jax import losses, parallel
    from facenet_jax.state import build_model, build_optimizer, create_train_state
    from facenet_jax.train import LossSpec, make_train_step

    config = cfg.load_config(pathlib.Path(__file__).parents[1] / "experiments" / "default.py", {
        "model.name": model_name, "model.dtype": dtype, "data.image_size": size,
        "batch.identities": p, "batch.images_per_identity": k, "loss.strategy": strategy})
    mesh = parallel.make_mesh(devices)
    model = build_model(config, bn_axis_name=parallel.AXIS)
    tx, schedule = build_optimizer(config)
    state = parallel.put_replicated(create_train_state(config, model, tx), mesh)
    loss = LossSpec.from_config(config.loss)
    step = make_train_step(mesh, model=model, tx=tx, schedule=schedule, loss=loss,
                           mining="global")
    rng = np.random.default_rng(0)
    batch = p * k
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(p), k).astype(np.int32)
    images, labels = parallel.put_global_batch((images, labels), mesh)

    start = time.perf_counter()
    compiled = step.lower(state, images, labels).compile()
    compile_s = time.perf_counter() - start
    flops = _flops(compiled)
    state, metrics = compiled(state, images, labels)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, images, labels)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps

    embeddings = jax.random.normal(jax.random.PRNGKey(0), (batch, config.model.embedding_dim))
    embeddings = embeddings / jnp.linalg.norm(embeddings, axis=1, keepdims=True)

    @jax.jit
    def loss_only(e):
        return jax.value_and_grad(lambda x: losses.triplet_loss(
            x, jnp.asarray(labels), margin=loss.margin, strategy=loss.strategy,
            distance=loss.distance, key=jax.random.PRNGKey(0))[0])(e)

    jax.block_until_ready(loss_only(embeddings))
    start = time.perf_counter()
    for _ in range(steps):
        out = loss_only(embeddings)
    jax.block_until_ready(out)
    loss_s = (time.perf_counter() - start) / steps

    device = jax.devices()[0]
    peak = next((v for name, v in PEAK_FLOPS.items() if name in device.device_kind), None)
    mfu = None
    if peak and flops and device.platform != "cpu":
        mfu = flops / step_s / (devices * peak[dtype == "bfloat16"])
    return {"model": model_name, "image_size": size, "P": p, "K": k, "batch": batch,
            "devices": devices, "dtype": dtype, "strategy": strategy,
            "compile_s": compile_s, "step_s": step_s, "images_per_s": batch / step_s,
            "loss_s": loss_s, "loss_share": loss_s / step_s, "flops_per_step": flops,
            "mfu": mfu}


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def format_row(row: dict) -> str:
    mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    return (f"| {row['model']} | {row['image_size']} | {row['P']}×{row['K']} | "
            f"{row['devices']} | {row['dtype']} | {row['compile_s']:.1f} | "
            f"{1000 * row['step_s']:.1f} | {row['images_per_s']:.0f} | "
            f"{100 * row['loss_share']:.1f}% | {mfu} |")


def markdown_table(rows: list[dict], device_kind: str) -> str:
    header = (f"Device: {device_kind}\n\n| model | px | P×K | devices | dtype | compile s | "
              "step ms | images/s | mining+loss share | MFU |\n|---|---|---|---|---|---|---|---|"
              "---|---|")
    return "\n".join([header, *map(format_row, rows)])


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
