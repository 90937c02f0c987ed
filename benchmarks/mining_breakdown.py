"""Where the default semi-hard call spends its time: forward + backward, forward alone, and the
distance matrix's own forward + backward, in one process, minimum and median of --repeats
calls after one warm-up (compile excluded).

Inputs as benchmarks/mining.py: 128-d unit Gaussian embeddings, P×K labels, hinge loss,
margin 0.2 on squared distance, `losses.triplet_loss(e, labels, margin=0.2, strategy=S)`.
Forward + backward minus forward is what differentiation adds (for B > 724 the default call
mines in blocks and takes each block's gradient in its forward pass, see
`triplet._sums_by_blocks`); the third line, the whole distance matrix's own forward + backward,
is there for scale.

    python benchmarks/mining_breakdown.py --sizes 1024x4,1800x40
    python benchmarks/mining_breakdown.py --anchor-chunks auto,225,1800   # block sizes side by side
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from facenet_jax import losses
from facenet_jax.losses import distances

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.mining import unit_inputs  # noqa: E402  (the same inputs as mining.py)


def timed_ms(function: Callable[[jax.Array], object], embeddings: jax.Array,
             repeats: int) -> tuple[float, float]:
    """(min, median) milliseconds of `repeats` calls after one warm-up call."""
    jax.block_until_ready(function(embeddings))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(embeddings))
        times.append(time.perf_counter() - start)
    return 1000 * float(np.min(times)), 1000 * float(np.median(times))


def _loss(e: jax.Array, *, labels: jax.Array, strategy: str,
          anchor_chunk: int | None) -> jax.Array:
    return losses.triplet_loss(e, labels, margin=0.2, strategy=strategy,
                               anchor_chunk=anchor_chunk)[0]


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Prints one line per (size, part) and returns them as rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024x4,1800x40",
                        help="comma-separated B x K (B images, K per identity)")
    parser.add_argument("--strategy", default="semihard")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--anchor-chunks", default="auto",
                        help="comma-separated anchor_chunk values to time the loss with: "
                             "'auto' (the default call) or a number of anchor rows")
    args = parser.parse_args(argv)
    print(f"{jax.devices()[0].device_kind}, {args.strategy}, min / median of {args.repeats} "
          "calls (ms)")
    rows = []
    for size in args.sizes.split(","):
        batch, per_identity = (int(part) for part in size.split("x"))
        embeddings, labels = (jnp.asarray(x) for x in unit_inputs(batch, per_identity))

        def distance_only(e: jax.Array) -> jax.Array:
            # A linear read of the whole matrix, so its backward is a dense [B,B] cotangent.
            return jnp.sum(distances.pairwise_distances(e, "squared") * e[:, :1])

        parts = {}
        for chunk in args.anchor_chunks.split(","):
            anchor_chunk = None if chunk == "auto" else int(chunk)
            loss = functools.partial(_loss, labels=labels, strategy=args.strategy,
                                     anchor_chunk=anchor_chunk)
            block_rows = anchor_chunk or losses.auto_anchor_chunk(batch, batch)
            blocks = f"{min(block_rows, batch)} anchor rows per block"
            parts[f"loss forward + backward, {blocks}"] = jax.jit(jax.value_and_grad(loss))
            parts[f"loss forward, {blocks}"] = jax.jit(loss)
        parts["distance matrix forward + backward"] = jax.jit(jax.value_and_grad(
            distance_only))
        for name, function in parts.items():
            low, median = timed_ms(function, embeddings, args.repeats)
            rows.append({"batch": batch, "per_identity": per_identity, "part": name,
                         "min_ms": low, "median_ms": median})
            print(f"B = {batch} ({batch // per_identity}×{per_identity})  {name:56s} "
                  f"{low:7.1f} / {median:7.1f}")
    return rows


if __name__ == "__main__":
    main()
