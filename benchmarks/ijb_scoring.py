"""IJB-C-sized template pooling, pair scoring and TAR@FAR, without the images.

The image side of IJB (decode, align, embed) scales with the encoder; the part this project's
code owns at IJB-C's size is pooling ~470k image features into ~23k templates and scoring
~15.7M template pairs. This times `ijb.template_features`, `ijb.pair_scores` and
`ijb.tar_at_far` on random unit features of that size (the numbers are meaningless, the shapes
and the time are real) and writes benchmarks/results/ijb_scoring.json.

    python benchmarks/ijb_scoring.py                     # IJB-C size, 128-d
    python benchmarks/ijb_scoring.py --pairs 1000000     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import sys
import time

import numpy as np

from facenet_jax.eval import ijb, metrics

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.output_file import add_output_arguments, refuse_existing  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "ijb_scoring.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=469_375)
    parser.add_argument("--templates", type=int, default=23_124)
    parser.add_argument("--pairs", type=int, default=15_658_489)
    parser.add_argument("--dim", type=int, default=128)
    add_output_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    refuse_existing(parser, [args.output], args.overwrite)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(args.images, args.dim)).astype(np.float32)
    features = metrics.l2_normalize_rows(features)
    templates = rng.integers(0, args.templates, args.images)
    medias = rng.integers(0, 4 * args.templates, args.images)
    weights = rng.uniform(0.5, 1.0, args.images)
    timings = {}

    start = time.perf_counter()
    ids, feats = ijb.template_features(features, templates, medias, weights)
    timings["template_features_s"] = time.perf_counter() - start
    pairs = ids[rng.integers(0, len(ids), (args.pairs, 2))]
    is_same = rng.random(args.pairs) < 0.00125  # IJB-C: 19,557 genuine of 15.7M
    start = time.perf_counter()
    scores = ijb.pair_scores(ids, feats, pairs)
    timings["pair_scores_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ijb.tar_at_far(scores, is_same)
    timings["tar_at_far_s"] = time.perf_counter() - start
    result = {**{k: v for k, v in vars(args).items() if k not in ("output", "overwrite")}, **{k: round(v, 2) for k, v in timings.items()},
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "load_average": os.getloadavg()[0]}
    pathlib.Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
