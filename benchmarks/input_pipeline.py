"""Input pipeline speed: batches/s of the P×K sampler (with augmentation, through the
background prefetch) for synthetic faces and an image folder, at P×K = 32×4 and 45×40; the
synthetic generator's images/s; the raw-pixel verification baseline of synthetic faces by
difficulty; and a grid of sample faces.

    python benchmarks/input_pipeline.py [--folder PATH] [--steps 50]
    python benchmarks/input_pipeline.py --train_step_overhead [--overhead_steps 10]

The first writes benchmarks/results/input_pipeline.json and benchmarks/results/synthetic_faces.png.
The second (`measure_train_step_input_overhead()`) times the train step fed by the real input
pipeline, as facenet_jax.train feeds it (P×K sampler + augmentation in a background thread, then
each batch put on the devices one step ahead), against the same compiled step on one fixed
device batch, and writes benchmarks/results/input_pipeline_train_step.json. A ratio near 1 means
the host input overlaps the compute.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import train_step as train_step_benchmark  # noqa: E402
from benchmarks.output_file import add_output_arguments, refuse_existing  # noqa: E402
from facenet_jax import data, evaluate, metrics  # noqa: E402

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


def measure_train_step_input_overhead(model: str = "small_cnn", image_size: int = IMAGE_SIZE,
                                      layouts: tuple[tuple[int, int], ...] = LAYOUTS,
                                      devices: int = 1, steps: int = 10, rounds: int = 2,
                                      prefetch: int = 4, strategy: str = "semihard"
                                      ) -> list[dict]:
    """Per P×K: seconds per train step fed by the real pipeline vs by one fixed device batch.

    The real feed is `facenet_jax.train.device_batches` itself (sampler over synthetic faces,
    the default augmentation, `prefetch` host batches ahead, device put one step ahead); the
    step is the one `benchmarks/train_step.py` builds, compiled once and shared by both feeds.
    Feeds alternate for `rounds` rounds of `steps` steps and the fastest round of each counts
    (a shared CPU's load then falls on neither alone). Also reports the host alone (batches/s
    through `prefetch`, no compute) for scale. Rows: P, K, fixed_step_s, real_input_step_s,
    ratio (real / fixed), host_batch_s.
    """
    train_step_benchmark.force_host_devices(devices)
    import jax

    from facenet_jax.train import device_batches

    faces = data.load_synthetic(max(p for p, _ in layouts) + 15, max(k for _, k in layouts),
                                image_size, 1.0, seed=0)
    augment = {"crop_padding": 2, "flip": True}
    rows = []
    for p, k in layouts:
        step, state, images, labels, _, _ = train_step_benchmark.build_step(
            model, image_size, p, k, devices, "float32", strategy)
        mesh = images.sharding.mesh
        sampler = data.PKSampler(faces, identities=p, images_per_identity=k, seed=0,
                                 num_shards=devices, augment=augment)
        state, _ = train_step_benchmark.time_steps(step, state, images, labels, 1)  # compile
        fixed = real = float("inf")
        for r in range(rounds):
            state, seconds = train_step_benchmark.time_steps(step, state, images, labels, steps)
            fixed = min(fixed, seconds)
            batches = device_batches(sampler, mesh, range(r * steps, (r + 1) * steps),
                                      prefetch)
            start = time.perf_counter()
            for batch_images, batch_labels in batches:
                state, metrics = step(state, batch_images, batch_labels)
            jax.block_until_ready((state, metrics))
            real = min(real, (time.perf_counter() - start) / steps)
        host = 1.0 / sampler_throughput(faces, p, k, steps)
        rows.append({"P": p, "K": k, "model": model, "image_size": image_size,
                     "strategy": strategy,
                     "devices": devices, "steps": steps, "rounds": rounds,
                     "prefetch": prefetch, "fixed_step_s": fixed, "real_input_step_s": real,
                     "ratio": real / fixed, "host_batch_s": host})
        print(f"{model} {image_size}px P×K={p}×{k}: fixed batch {1000 * fixed:.1f} ms/step, "
              f"real input {1000 * real:.1f} ms/step (×{real / fixed:.2f}); host alone "
              f"{1000 * host:.1f} ms/batch", flush=True)
    return rows


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
    embeddings = evaluate.pixel_embeddings(faces.images)
    distances = metrics.pair_distances(embeddings, pairs.first, pairs.second, "squared")
    return float(metrics.verification_kfold(distances, pairs.is_same, pairs.fold)["accuracy"])


def save_grid(path: pathlib.Path, identities: int = 8, per_identity: int = 8) -> None:
    """One row per identity at the default difficulty, upscaled 2× for viewing."""
    faces = data.load_synthetic(identities, per_identity, IMAGE_SIZE, 1.0, seed=0)
    s = IMAGE_SIZE
    grid = faces.images.reshape(identities, per_identity, s, s, 3).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(identities * s, per_identity * s, 3)
    Image.fromarray(grid).resize((2 * grid.shape[1], 2 * grid.shape[0]),
                                 Image.Resampling.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=pathlib.Path, default=None,
                        help="an image folder to time (default: ORL if present) besides a "
                        "generated one")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--train_step_overhead", action="store_true",
                        help="only measure the train step fed by the real pipeline vs a fixed "
                        "batch (writes input_pipeline_train_step.json)")
    parser.add_argument("--overhead_steps", type=int, default=10,
                        help="train steps per timing round of --train_step_overhead")
    add_output_arguments(parser, RESULTS, flag="--output_dir",
                         what="folder of input_pipeline.json and synthetic_faces.png (or "
                              "input_pipeline_train_step.json)")
    args = parser.parse_args(argv)
    output_dir = pathlib.Path(args.output_dir)
    outputs = ([output_dir / "input_pipeline_train_step.json"] if args.train_step_overhead
               else [output_dir / "input_pipeline.json", output_dir / "synthetic_faces.png"])
    refuse_existing(parser, outputs, args.overwrite, flag="--output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.train_step_overhead:
        rows = measure_train_step_input_overhead(steps=args.overhead_steps)
        report = {"python": platform.python_version(),
                  "host": train_step_benchmark.host_description(), "rows": rows}
        outputs[0].write_text(json.dumps(report, indent=2) + "\n")
        return
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
    save_grid(outputs[1])
    outputs[0].write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
