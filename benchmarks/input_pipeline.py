"""Input pipeline speed: batches/s of the P×K sampler (with augmentation, through the
background prefetch) for synthetic faces and an image folder, at P×K = 32×4 and 45×40; the
synthetic generator's images/s; the raw-pixel verification baseline of synthetic faces by
difficulty; and a grid of sample faces.

    python benchmarks/input_pipeline.py [--folder PATH] [--steps 50]

Writes benchmarks/results/input_pipeline.json and benchmarks/results/synthetic_faces.png.
(The train step's time with real input against a fixed batch is measured by
`measure_train_step_input_overhead()`, added with the train step.)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from facenet_jax import data  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SHARED_ORL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "orl_faces"
LAYOUTS = ((32, 4), (45, 40))
IMAGE_SIZE = 32


def sampler_throughput(dataset: data.Dataset, identities: int, images_per_identity: int,
                       steps: int) -> float:
    """Batches/s drawn through prefetch, as the training loop draws them."""
    sampler = data.PKSampler(dataset, identities=identities,
                             images_per_identity=images_per_identity, seed=0,
                             augment={"crop_padding": 2, "flip": True})
    sampler.batch(0)  # warm-up
    start = time.perf_counter()
    for _ in data.prefetch((sampler.batch(s) for s in range(1, steps + 1)), 4):
        pass
    return steps / (time.perf_counter() - start)


def generated_folder(root: pathlib.Path, identities: int = 60, per_identity: int = 40) -> None:
    """A folder of synthetic faces saved as 96 px JPEGs (enough identities for P = 45)."""
    faces = data.load_synthetic(identities, per_identity, image_size=96, seed=1)
    for i, (image, label) in enumerate(zip(faces.images, faces.labels)):
        path = root / faces.identity_names[label] / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, quality=90)


def pixel_baseline(difficulty: float, seed: int = 0) -> float:
    """10-fold LFW verification accuracy of raw pixels ([0,1], flattened, unit norm, squared
    Euclidean) on generated pairs of 100 held-out synthetic identities × 20 images."""
    faces = data.load_synthetic(100, 20, IMAGE_SIZE, difficulty, seed=seed + 1000)
    pairs = data.generate_pairs(faces, num_folds=10, pairs_per_fold=300, seed=seed)
    x = faces.images.reshape(len(faces.images), -1).astype(np.float64) / 255
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.sum((x[pairs.first] - x[pairs.second]) ** 2, axis=1)
    accuracies = []
    for fold in range(10):
        train = pairs.fold != fold
        thresholds = np.unique(dist[train])
        train_acc = [np.mean((dist[train] <= t) == pairs.is_same[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accuracies.append(np.mean((dist[~train] <= best) == pairs.is_same[~train]))
    return float(np.mean(accuracies))


def save_grid(path: pathlib.Path, identities: int = 8, per_identity: int = 8) -> None:
    """One row per identity at the default difficulty, upscaled 2× for viewing."""
    faces = data.load_synthetic(identities, per_identity, IMAGE_SIZE, 1.0, seed=0)
    s = IMAGE_SIZE
    grid = faces.images.reshape(identities, per_identity, s, s, 3).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(identities * s, per_identity * s, 3)
    Image.fromarray(grid).resize((2 * grid.shape[1], 2 * grid.shape[0]),
                                 Image.Resampling.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=pathlib.Path, default=None,
                        help="an image folder to time (default: ORL if present) besides a "
                        "generated one")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    results: dict = {"python": platform.python_version(), "image_size": IMAGE_SIZE,
                     "augment": {"crop_padding": 2, "flip": True}, "steps": args.steps}

    start = time.perf_counter()
    synthetic = data.load_synthetic(500, 20, IMAGE_SIZE, 1.0, seed=0)
    results["synthetic_generation_images_per_s"] = len(synthetic.labels) / (
        time.perf_counter() - start)

    results["folders"], results["batches_per_s"] = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        generated = pathlib.Path(tmp) / "generated"
        generated_folder(generated)
        folders = {"generated": generated}
        if args.folder or SHARED_ORL.is_dir():
            folders["orl" if args.folder is None else "given"] = args.folder or SHARED_ORL
        datasets = {"synthetic": synthetic}
        for name, folder in folders.items():
            cache = pathlib.Path(tmp) / "cache"
            start = time.perf_counter()
            data.load_image_folder(folder, IMAGE_SIZE, cache_dir=cache)
            first = time.perf_counter() - start
            start = time.perf_counter()
            datasets[name] = loaded = data.load_image_folder(folder, IMAGE_SIZE, cache_dir=cache)
            results["folders"][name] = {
                "root": str(folder), "images": len(loaded.labels),
                "identities": loaded.num_identities, "first_load_s": first,
                "cached_load_s": time.perf_counter() - start}
        for name, dataset in datasets.items():
            for p, k in LAYOUTS:
                if p > dataset.num_identities:
                    print(f"{name}: {dataset.num_identities} identities, too few for P={p}")
                    continue
                rate = sampler_throughput(dataset, p, k, args.steps)
                results["batches_per_s"][f"{name}_{p}x{k}"] = rate
                print(f"{name:9s} P×K={p}×{k}: {rate:8.1f} batches/s "
                      f"({rate * p * k:9.0f} images/s)")

    results["pixel_baseline_accuracy"] = {str(d): pixel_baseline(d)
                                          for d in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)}
    print("pixel baseline by difficulty:", results["pixel_baseline_accuracy"])
    print(f"synthetic generation: {results['synthetic_generation_images_per_s']:.0f} images/s")
    save_grid(RESULTS / "synthetic_faces.png")
    (RESULTS / "input_pipeline.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
