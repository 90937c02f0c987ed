"""Time and memory of every mining strategy, beside a naive B³ semi-hard reference.

For each batch size B (P×K layout, K = 4, except 1800 = 45×40 as in FaceNet), 128-d unit
embeddings, hinge loss, squared distance: forward and forward+backward wall time (median of
--repeats runs after one warm-up, compile excluded) and XLA's compiled temp memory
(`compiled.memory_analysis().temp_size_in_bytes`). The naive reference tiles the B²×B matrix
the way TF-Addons' `triplet_semihard_loss` does; it runs only where its compiled temp memory
fits under --naive-max-gb.

    .venv/bin/python benchmarks/mining.py --sizes 256,1024,1800
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from facenet_jax import losses

MARGIN = 0.2
DIM = 128


def naive_semihard_loss(embeddings: jax.Array, labels: jax.Array, margin: float) -> jax.Array:
    """TF-Addons-style semi-hard loss that materialises a [B², B] tile (the B³ baseline)."""
    b = embeddings.shape[0]
    d = losses.pairwise_distances(embeddings, "squared")
    same = labels[:, None] == labels[None, :]
    # Row (p·B + a) of the tile holds anchor a's distances, compared with d(a, p).
    tile = jnp.tile(d, (b, 1))
    farther = jnp.tile(~same, (b, 1)) & (tile > d.T.reshape(-1, 1))
    has_farther = jnp.any(farther, axis=1).reshape(b, b).T
    closest_farther = jnp.min(jnp.where(farther, tile, jnp.inf), axis=1).reshape(b, b).T
    farthest_negative = jnp.max(jnp.where(~same, d, -jnp.inf), axis=1, keepdims=True)
    negative = jax.lax.stop_gradient(jnp.where(has_farther, closest_farther, farthest_negative))
    positive = same & ~jnp.eye(b, dtype=bool)
    hinge = jnp.where(positive, jnp.maximum(d + margin - negative, 0.0), 0.0)
    return jnp.sum(hinge) / jnp.maximum(jnp.sum(positive), 1)


def batch(size: int) -> tuple[jax.Array, jax.Array]:
    images_per_identity = 40 if size == 1800 else 4
    key = jax.random.key(size)
    emb = jax.random.normal(key, (size, DIM))
    emb = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
    return emb, jnp.repeat(jnp.arange(size // images_per_identity), images_per_identity)


def measure(fn, args, repeats: int) -> dict[str, float]:
    compiled = jax.jit(fn).lower(*args).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "temp_mb": temp_bytes / 2**20}


def loss_fn(strategy: str):
    if strategy == "naive_semihard_b3":
        return lambda e, l: naive_semihard_loss(e, l, MARGIN)
    key = jax.random.key(0)
    return lambda e, l: losses.triplet_loss(e, l, margin=MARGIN, strategy=strategy,
                                            key=key)[0]


def naive_fits(size: int, max_gb: float) -> bool:
    """Compiled temp memory of the naive forward+backward, without running it."""
    emb, labels = batch(size)
    grad = jax.grad(loss_fn("naive_semihard_b3"))
    temp = jax.jit(grad).lower(emb, labels).compile().memory_analysis().temp_size_in_bytes
    return temp <= max_gb * 2**30


def run(sizes: list[int], strategies: list[str], repeats: int,
        naive_max_gb: float) -> list[dict]:
    rows = []
    for size in sizes:
        emb, labels = batch(size)
        names = list(strategies)
        if naive_fits(size, naive_max_gb):
            names.append("naive_semihard_b3")
        else:
            rows.append({"batch": size, "strategy": "naive_semihard_b3", "skipped":
                         f"compiled temp memory above {naive_max_gb} GB"})
        for name in names:
            fn = loss_fn(name)
            forward = measure(fn, (emb, labels), repeats)
            backward = measure(jax.grad(fn), (emb, labels), repeats)
            row = {"batch": size, "strategy": name,
                   "forward_s": forward["seconds"], "forward_temp_mb": forward["temp_mb"],
                   "grad_s": backward["seconds"], "grad_temp_mb": backward["temp_mb"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| B | strategy | forward (ms) | forward+backward (ms) | temp memory fwd / fwd+bwd "
             "(MB) |", "|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['batch']} | {row['strategy']} | — | — | skipped: "
                         f"{row['skipped']} |")
        else:
            lines.append(f"| {row['batch']} | {row['strategy']} | {1e3 * row['forward_s']:.1f} "
                         f"| {1e3 * row['grad_s']:.1f} | {row['forward_temp_mb']:.1f} / "
                         f"{row['grad_temp_mb']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,1024,1800,4096,8192",
                        help="comma-separated batch sizes (P×K, K=4; 1800 is 45×40)")
    parser.add_argument("--strategies", default=",".join(losses.STRATEGIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-max-gb", type=float, default=4.0)
    parser.add_argument("--out", default="benchmarks/results/mining.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        if size % (40 if size == 1800 else 4):
            parser.error(f"--sizes: {size} is not a multiple of K=4")
    strategies = args.strategies.split(",")
    unknown = set(strategies) - set(losses.STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; valid: {losses.STRATEGIES}")
    rows = run(sizes, strategies, args.repeats, args.naive_max_gb)
    print(markdown(rows))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__,
                               "dim": DIM, "margin": MARGIN, "distance": "squared",
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
