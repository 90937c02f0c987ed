"""Mining speed and peak memory, side by side with TF-Addons and pytorch-metric-learning.

Every configuration runs in a fresh Python process (peak RSS from `getrusage`, so one
configuration's peak cannot hide another's), beside an imports-only process per framework (the
baseline that peak includes). Inputs: 128-d unit Gaussian embeddings, P×K labels (K = 4, except
1800 = 45×40 as in FaceNet), hinge loss, margin 0.2 on squared Euclidean distance (TF-Addons
`distance_metric="squared-L2"`; pytorch-metric-learning `LpDistance(power=2)` on normalised
embeddings), forward + backward: median of --repeats runs after one warm-up (compile and
warm-up excluded from the time, included in the peak RSS).

Ours is the public default call, `losses.triplet_loss(e, labels, margin=0.2, strategy=S)` (no
hint). The anchors, each beside the strategy it is nearest to:
- semihard: TF-Addons 0.23 `triplet_semihard_loss` (B <= --tfa-max-batch: it tiles a B²×B
  matrix) and pytorch-metric-learning's `TripletMarginMiner("semihard")` + `TripletMarginLoss`
  (the miner keeps every triplet with d(a,p) < d(a,n) < d(a,p) + margin: FaceNet's band, a
  different rule, but the library's semi-hard);
- semihard_facenet: the same pytorch-metric-learning miner (the same band; ours draws one);
- all: pytorch-metric-learning `TripletMarginLoss` without a miner (every triplet; B <=
  --pml-all-max-batch: it builds a B×B×B mask);
- distance_weighted: pytorch-metric-learning `DistanceWeightedMiner` + `TripletMarginLoss`.
The anchors are imported from --anchor-path (a folder with pytorch_metric_learning and
tensorflow_addons installed, e.g. `pip install --target DIR --no-deps pytorch-metric-learning
tensorflow-addons typeguard`; torch and tensorflow come from the environment). TF-Addons 0.23
no longer imports under Keras 3 (TF >= 2.16): only its two loss files are loaded, see
`_load_tfa_triplet`. Without --anchor-path the anchors are skipped.

--chunked A×C×c adds `triplet_loss_sums` of A anchors against C candidates with
anchor_chunk=c (memory O(c·C)) and with anchor_chunk=A (one block). The default call
(anchor_chunk=None) chunks by itself above `losses.triplet.AUTO_CHUNK_ELEMENTS`.

    python benchmarks/mining.py --anchor-path /work/bench_pkgs      # -> results/mining.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.output_file import add_output_arguments, refuse_existing  # noqa: E402

MARGIN = 0.2
DIM = 128
STRATEGIES = ("semihard", "semihard_facenet", "all", "distance_weighted")
ANCHORS = {"semihard": ("tfa_semihard", "pml_semihard"), "semihard_facenet": ("pml_semihard",),
           "all": ("pml_all",), "distance_weighted": ("pml_distance_weighted",)}


def layout(size: int) -> tuple[int, int]:
    """(P, K) of a benchmark batch: 45×40 for 1800, else K = 4."""
    per_identity = 40 if size == 1800 else 4
    if size % per_identity:
        raise ValueError(f"batch size {size} is not a multiple of K={per_identity}")
    return size // per_identity, per_identity


def unit_inputs(size: int, per_identity: int):
    """[size, DIM] unit float32 embeddings and int32 labels, `per_identity` rows per label."""
    import numpy as np

    from facenet_jax.eval.metrics import l2_normalize_rows

    rng = np.random.default_rng(size)
    emb = rng.normal(size=(size, DIM)).astype(np.float32)
    emb = l2_normalize_rows(emb)
    return emb, np.repeat(np.arange(size // per_identity), per_identity).astype(np.int32)


def _timed(run, repeats: int) -> float:
    run()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- one configuration per process -----------------------------------------------------------

def _ours(strategy: str, size: int, repeats: int) -> float:
    import jax
    from facenet_jax import losses

    emb, labels = unit_inputs(size, layout(size)[1])
    key = jax.random.key(0)
    grad = jax.jit(jax.grad(lambda e: losses.triplet_loss(
        e, labels, margin=MARGIN, strategy=strategy, key=key)[0]))
    return _timed(lambda: jax.block_until_ready(grad(emb)), repeats)


def _ours_chunked(anchors: int, candidates: int, chunk: int | None, repeats: int) -> float:
    import jax
    from facenet_jax import losses

    emb, labels = unit_inputs(candidates, 4)
    grad = jax.jit(jax.grad(lambda e: losses.triplet_loss_sums(
        e, labels, anchor_start=0, num_anchors=anchors, margin=MARGIN, strategy="semihard",
        anchor_chunk=chunk)["loss_sum"]))
    return _timed(lambda: jax.block_until_ready(grad(emb)), repeats)


def _load_tfa_triplet(anchor_path: str):
    """TF-Addons' `losses/triplet.py` (and the `metric_learning.py` it imports) without the
    package's __init__, which fails under Keras 3: the package and subpackages are registered
    as empty namespaces, the one Keras-2 symbol its type hints import is stubbed, and Keras's
    serialisation decorator (which rejects its loss classes) is made a no-op. The function
    measured, `triplet_semihard_loss`, is plain TensorFlow and untouched."""
    import types

    engine = types.ModuleType("keras.src.engine")
    keras_tensor = types.ModuleType("keras.src.engine.keras_tensor")
    keras_tensor.KerasTensor = type("KerasTensor", (), {})
    engine.keras_tensor = keras_tensor
    sys.modules.setdefault("keras.src.engine", engine)
    sys.modules.setdefault("keras.src.engine.keras_tensor", keras_tensor)
    import tensorflow as tf

    tf.keras.utils.register_keras_serializable = lambda *a, **k: (lambda cls: cls)
    root = pathlib.Path(anchor_path) / "tensorflow_addons"
    for name, folder in (("tensorflow_addons", root), ("tensorflow_addons.losses",
                                                        root / "losses"),
                         ("tensorflow_addons.utils", root / "utils")):
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module
    from tensorflow_addons.losses import triplet
    return tf, triplet


def _tfa(strategy: str, size: int, repeats: int, anchor_path: str) -> float:
    tf, triplet = _load_tfa_triplet(anchor_path)
    emb, labels = unit_inputs(size, layout(size)[1])
    emb, labels = tf.constant(emb), tf.constant(labels)

    @tf.function
    def grad(e):
        with tf.GradientTape() as tape:
            tape.watch(e)
            loss = triplet.triplet_semihard_loss(labels, e, margin=MARGIN,
                                                 distance_metric="squared-L2")
        return tape.gradient(loss, e)

    return _timed(lambda: grad(emb).numpy(), repeats)


def _pml(strategy: str, size: int, repeats: int) -> float:
    import torch
    from pytorch_metric_learning import distances, losses, miners

    emb, labels = unit_inputs(size, layout(size)[1])
    emb, labels = torch.from_numpy(emb), torch.from_numpy(labels).long()
    distance = distances.LpDistance(power=2, normalize_embeddings=True)
    loss_fn = losses.TripletMarginLoss(margin=MARGIN, distance=distance)
    miner = {"pml_semihard": lambda: miners.TripletMarginMiner(
                 margin=MARGIN, type_of_triplets="semihard", distance=distance),
             "pml_distance_weighted": lambda: miners.DistanceWeightedMiner(cutoff=0.5,
                                                                           nonzero_loss_cutoff=1.4),
             "pml_all": lambda: None}[strategy]()

    def run():
        e = emb.clone().requires_grad_(True)
        loss = loss_fn(e, labels, miner(e, labels) if miner is not None else None)
        loss.backward()
        return e.grad

    return _timed(run, repeats)


def _imports(framework: str, anchor_path: str | None) -> None:
    if framework == "jax":
        import jax  # noqa: F401
        from facenet_jax import losses  # noqa: F401
    elif framework == "tensorflow":
        _load_tfa_triplet(anchor_path)
    else:
        import torch  # noqa: F401
        from pytorch_metric_learning import losses, miners  # noqa: F401


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one configuration in this process and returns its row (seconds, peak RSS)."""
    impl, repeats = spec["impl"], spec.get("repeats", 3)
    seconds = None
    if impl == "imports":
        _imports(spec["framework"], spec.get("anchor_path"))
    elif impl == "ours":
        seconds = _ours(spec["strategy"], spec["batch"], repeats)
    elif impl == "ours_chunked":
        seconds = _ours_chunked(spec["anchors"], spec["batch"], spec["chunk"], repeats)
    elif impl == "tfa_semihard":
        seconds = _tfa(impl, spec["batch"], repeats, spec["anchor_path"])
    else:
        seconds = _pml(impl, spec["batch"], repeats)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {**{k: v for k, v in spec.items() if k != "anchor_path"}, "seconds": seconds,
            "peak_rss_mb": peak_kb / 1024}


FRAMEWORK = {"ours": "jax", "ours_chunked": "jax", "tfa_semihard": "tensorflow"}


def _in_fresh_process(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), spec.get("anchor_path"), os.environ.get("PYTHONPATH")) if p),
        "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode < 0:  # SIGKILL here is the kernel's out-of-memory killer
        return {**spec, "error": f"killed by signal {-done.returncode}"
                + (" (out of memory)" if done.returncode == -9 else "")}
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "Error" in line]
        return {**spec, "error": (errors or [f"exit {done.returncode}"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan(sizes: list[int], strategies: list[str], anchor_path: str | None, repeats: int,
         chunked: tuple[int, int, int] | None, tfa_max: int, pml_all_max: int
         ) -> list[dict[str, Any]]:
    """The configurations to run, baselines first."""
    specs = [{"impl": "imports", "framework": "jax"}]
    if anchor_path:
        specs += [{"impl": "imports", "framework": f, "anchor_path": anchor_path}
                  for f in ("tensorflow", "torch")]
    for size in sizes:
        for strategy in strategies:
            specs.append({"impl": "ours", "strategy": strategy, "batch": size})
            for anchor in ANCHORS[strategy] if anchor_path else ():
                if (anchor == "tfa_semihard" and size > tfa_max) or (
                        anchor == "pml_all" and size > pml_all_max):
                    continue
                specs.append({"impl": anchor, "strategy": strategy, "batch": size,
                              "anchor_path": anchor_path})
    if chunked:
        anchors, candidates, chunk = chunked
        for c in (chunk, anchors):  # anchor_chunk = anchors: one block (no chunking)
            specs.append({"impl": "ours_chunked", "strategy": "semihard", "batch": candidates,
                          "anchors": anchors, "chunk": c})
    return [{**spec, "repeats": repeats} for spec in specs]


def markdown(rows: list[dict[str, Any]]) -> str:
    baseline = {r["framework"]: r["peak_rss_mb"] for r in rows
                if r["impl"] == "imports" and "error" not in r}
    ours = {(r["strategy"], r["batch"]): r["seconds"] for r in rows
            if r["impl"] == "ours" and r.get("seconds")}
    lines = ["| strategy | B (P×K) | implementation | fwd+bwd (ms) | ours is × faster | peak RSS "
             "(MB) | over imports-only (MB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["impl"] == "imports":
            continue
        what = r["impl"] if r["impl"] != "ours_chunked" else (
            f"ours, {r['anchors']} anchors, anchor_chunk={r['chunk']}")
        # The anchor_chunk rows always use K = 4 (_ours_chunked), whatever their size.
        p, k = (r["batch"] // 4, 4) if r["impl"] == "ours_chunked" else layout(r["batch"])
        if "error" in r:
            lines.append(f"| {r['strategy']} | {r['batch']} ({p}×{k}) | {what} | failed: "
                         f"{r['error']} | | | |")
            continue
        speedup = ours.get((r["strategy"], r["batch"]))
        ratio = "" if r["impl"].startswith("ours") or not speedup else (
            f"{r['seconds'] / speedup:.1f}×")
        base = baseline.get(FRAMEWORK.get(r["impl"], "torch"))
        over = "" if base is None else f"{r['peak_rss_mb'] - base:.0f}"
        lines.append(f"| {r['strategy']} | {r['batch']} ({p}×{k}) | {what} | "
                     f"{1e3 * r['seconds']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} | {over} |")
    lines.append("")
    lines.append("imports-only peak RSS (MB): " + ", ".join(
        f"{k} {v:.0f}" for k, v in baseline.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="512,1024,1800,8192",
                        help="comma-separated batch sizes (P×K, K=4; 1800 is 45×40)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--anchor-path", default=None,
                        help="folder holding pytorch_metric_learning and tensorflow_addons")
    parser.add_argument("--chunked", default="1024x65536x64",
                        help="ANCHORSxCANDIDATESxCHUNK for the anchor_chunk rows, or 'none'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tfa-max-batch", type=int, default=512,
                        help="TF-Addons at 1024 was killed for memory on a 24 GB machine")
    parser.add_argument("--pml-all-max-batch", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
    add_output_arguments(parser, REPO / "benchmarks" / "results" / "mining.json", flag="--out")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    refuse_existing(parser, [args.out], args.overwrite, flag="--out")
    strategies = args.strategies.split(",")
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; valid: {', '.join(STRATEGIES)}")
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        for size in sizes:
            layout(size)
        chunked = None if args.chunked == "none" else tuple(
            int(x) for x in args.chunked.split("x"))
    except ValueError as error:
        parser.error(str(error))
    if chunked is not None and (len(chunked) != 3 or chunked[1] % 4
                                or not 1 <= chunked[0] <= chunked[1]):
        parser.error("--chunked takes ANCHORSxCANDIDATESxCHUNK with CANDIDATES a multiple of "
                     "4 (K = 4) and 1 <= ANCHORS <= CANDIDATES, e.g. 1024x65536x64")
    if args.anchor_path and not pathlib.Path(args.anchor_path).is_dir():
        parser.error(f"--anchor-path {args.anchor_path} is not a folder")
    rows = []
    load_before = os.getloadavg()
    for spec in plan(sizes, strategies, args.anchor_path, args.repeats, chunked,
                     args.tfa_max_batch, args.pml_all_max_batch):
        row = _in_fresh_process(spec, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(markdown(rows))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/mining.py", *(argv or sys.argv[1:])]),
        "cpu_count": os.cpu_count(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "dim": DIM, "margin": MARGIN,
        "distance": "squared", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
