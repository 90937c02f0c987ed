"""Input pipeline speed: batches/s of the P×K sampler (with augmentation, through the
background prefetch) for synthetic faces and an image folder, at P×K = 32×4 and 45×40; the
synthetic generator's images/s; the raw-pixel verification baseline of synthetic faces by
difficulty; and a grid of sample faces.

    python benchmarks/input_pipeline.py [--folder PATH] [--steps 50]
    python benchmarks/input_pipeline.py --train_step_overhead [--overhead_steps 10]
    python benchmarks/input_pipeline.py --stream OUT.json [--pack PACK_DIR] [--folder PATH]
        [--workers 1 2] [--steps 50]

The first writes benchmarks/results/input_pipeline.json and benchmarks/results/synthetic_faces.png.
The second (`measure_train_step_input_overhead()`) times the train step fed by the real input
pipeline, as facenet_jax.train feeds it (P×K sampler + augmentation in a background thread, then
each batch put on the devices one step ahead), against the same compiled step on one fixed
device batch, and writes benchmarks/results/input_pipeline_train_step.json. A ratio near 1 means
the host input overlaps the compute.
The third (`measure_stream()`) times 112 px batches of a RecordIO pack (decode + crop/flip +
batch) built by the streaming pipeline's worker processes against the single-thread paths:
JPEG decoding alone (PIL, simplejpeg), today's cached-folder path (a memory map read by the
prefetch thread) and a pack decoded in that thread; images/s, per core, with the load average
before and after each row, and a projection to a 16-core accelerator host. The pack: PACK_DIR,
made from --folder (default LFW-half, the shared data) at 112 px when it does not exist; the
cached-folder row reads that folder.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import train_step as train_step_benchmark  # noqa: E402
from benchmarks.output_file import add_output_arguments, refuse_existing  # noqa: E402
from facenet_jax import data  # noqa: E402
from facenet_jax.eval import evaluate, metrics  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SHARED_ORL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "orl_faces"
SHARED_LFW = SHARED_ORL.with_name("lfw_half")
STREAM_SIZE = 112
STREAM_LAYOUT = (32, 4)  # P×K of each timed batch: 128 images
STREAM_AUGMENT = {"crop_padding": 2, "flip": True}
# The step rate an accelerator host asks for: insightface's arcface_torch, IResNet-50 at 112 px,
# batch 1,024 on 8 × A100 80GB with FP16 and TF32, about 5,400 samples/s
# (deepinsight/insightface benchmarks/train/nvidia_a100.md).
ASSUMED_ACCELERATOR_IMAGES_PER_S = 5400
PROJECTED_CORES = 16
RESERVED_CORES = 2  # the training process: its Python loop and XLA's host threads
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


def _load() -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {"load_1min": one, "load_5min": five, "load_15min": fifteen}


class _CpuMeter:
    """CPU time (user + system) of this process and its children (input workers) since it
    was made. On a loaded host, images per CPU-second is what dedicated cores would deliver,
    where images per wall-second is what this host's share of its cores delivered. `sample`
    between batches: a worker that exits before the end keeps its last reading."""

    def __init__(self) -> None:
        self.start = self._read()
        self.last = dict(self.start)

    @staticmethod
    def _read() -> dict[int, float]:
        try:
            import psutil
        except ImportError:  # without the stream extra: this process alone (no workers then)
            return {os.getpid(): time.process_time()}
        me, seconds = psutil.Process(), {}
        for process in [me, *me.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            seconds[process.pid] = times.user + times.system
        return seconds

    def sample(self) -> None:
        self.last.update(self._read())

    def seconds(self) -> float:
        self.sample()
        return sum(value - self.start.get(pid, 0.0) for pid, value in self.last.items())


def _images_per_s(batches, images_per_batch: int, warmup: int = 2
                  ) -> tuple[float, float | None, float]:
    """(images per wall-second and per CPU-second after the first `warmup` batches, seconds
    until the first batch). Per CPU-second is None when the CPU time read stays below the
    clock tick (10 ms), as a very short run on a tiny pack can."""
    start = time.perf_counter()
    first = meter = None
    count = 0
    for i, _ in enumerate(batches):
        if i == 0:
            first = time.perf_counter() - start
        if i == warmup - 1:
            steady, meter = time.perf_counter(), _CpuMeter()
        if i >= warmup:
            count += 1
            meter.sample()
    images = count * images_per_batch
    cpu_seconds = meter.seconds()
    return (images / (time.perf_counter() - steady),
            images / cpu_seconds if cpu_seconds > 0 else None, first)


def decode_rates(payloads: list[bytes], seconds: float = 3.0
                 ) -> dict[str, tuple[float, float]]:
    """(images per wall-second, per CPU-second) of one thread decoding the pack's JPEGs: PIL,
    and simplejpeg if installed."""
    def pil(payload: bytes) -> None:
        with Image.open(io.BytesIO(payload)) as img:
            np.asarray(img.convert("RGB"))

    decoders = {"pil": pil}
    try:
        import simplejpeg
        decoders["simplejpeg"] = lambda payload: simplejpeg.decode_jpeg(payload,
                                                                        colorspace="RGB")
    except ImportError:
        pass
    rates = {}
    for name, decode in decoders.items():
        count, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            for payload in payloads[:500]:
                decode(payload)
            count += min(500, len(payloads))
        rates[name] = (count / (time.perf_counter() - start),
                       count / (time.process_time() - cpu))
    return rates


def measure_stream(pack: pathlib.Path, folder: pathlib.Path | None, workers: list[int],
                   steps: int, cache_dir: pathlib.Path, decode_seconds: float = 3.0) -> dict:
    """Rows of images/s at 112 px, P×K = 32×4 with crop/flip: decoding alone, the cached
    folder read by the prefetch thread (today's path, when `folder` is given), the pack
    decoded in that thread, and the pack streamed by each worker count; then the
    projection (see module docstring)."""
    from facenet_jax.data import rec, recordio

    p, k = STREAM_LAYOUT
    dataset = rec.load_pack(pack, STREAM_SIZE)
    records = recordio.RecordFile(pack / rec.REC_FILE)
    payloads = [recordio.unpack_record(records.read(o))[1]
                for o in rec.load_index(*rec.pack_files(pack)).offsets[:500].tolist()]
    rows = []

    def row(name: str, processes: int, rate: float, per_cpu_second: float | None,
            startup: float | None = None, before: dict | None = None) -> None:
        rows.append({"path": name, "processes": processes, "images_per_s": rate,
                     "images_per_s_per_process": rate / processes,
                     "images_per_cpu_s": per_cpu_second, "startup_s": startup,
                     "before": before, "after": _load()})
        print(f"{name:40s} {rate:7.0f} images/s ({rate / processes:6.0f} per process, "
              f"{per_cpu_second or float('nan'):6.0f} per CPU-second)"
              + (f", first batch after {startup:.1f} s" if startup is not None else "")
              + f"  load {before['load_1min']:.1f} → {rows[-1]['after']['load_1min']:.1f}",
              flush=True)

    before = _load()
    for name, (rate, per_cpu_second) in decode_rates(payloads, decode_seconds).items():
        row(f"decode only, {name} (1 thread)", 1, rate, per_cpu_second, before=before)

    def sampler(source: data.Dataset) -> data.PKSampler:
        return data.PKSampler(source, identities=p, images_per_identity=k, seed=0,
                              augment=STREAM_AUGMENT)

    if folder is not None:
        cached = data.load_image_folder(folder, STREAM_SIZE, cache_dir=cache_dir)
        before = _load()
        rate, per_cpu_second, _ = _images_per_s(
            data.prefetch((sampler(cached).batch(s) for s in range(steps)), 4), p * k)
        row("folder cache + prefetch thread (today)", 1, rate, per_cpu_second, before=before)
    for count in [0, *workers]:
        before = _load()
        batches = data.stream_host_batches(sampler(dataset), range(steps), 0, 1,
                                           workers=count, buffer_size=max(2, 2 * count))
        rate, per_cpu_second, startup = _images_per_s(batches, p * k)
        row("pack, prefetch thread" if count == 0 else f"pack, stream, {count} worker(s)",
            max(count, 1), rate, per_cpu_second, startup, before)
    # Per CPU-second (this process's and the workers'), so that the projection to dedicated
    # cores does not carry this host's load; the 2-worker efficiency is then what a second
    # worker costs in overhead, not what it gained on a busy host.
    by_workers = {r["processes"]: r["images_per_cpu_s"] for r in rows
                  if r["path"].startswith("pack, stream")}
    per_worker = by_workers.get(1)
    scaling = (min(1.0, by_workers[2] / per_worker)
               if per_worker and by_workers.get(2) else None)
    projection = None
    if per_worker:
        projected_workers = PROJECTED_CORES - RESERVED_CORES
        rate = per_worker * projected_workers * (scaling or 1.0)
        projection = {"cores": PROJECTED_CORES, "workers": projected_workers,
                      "per_worker_images_per_s": per_worker, "two_worker_efficiency": scaling,
                      "images_per_s": rate,
                      "assumed_accelerator_images_per_s": ASSUMED_ACCELERATOR_IMAGES_PER_S,
                      "assumption_source": "insightface benchmarks/train/nvidia_a100.md: "
                      "IResNet-50, batch 1024, 8 x A100 80GB, FP16 + TF32, ~5400 samples/s",
                      "headroom": rate / ASSUMED_ACCELERATOR_IMAGES_PER_S}
        print(f"projection: {projected_workers} workers on a {PROJECTED_CORES}-core host × "
              f"{per_worker:.0f} images/s × 2-worker efficiency "
              f"{scaling if scaling is not None else 'unmeasured'} = {rate:.0f} images/s vs "
              f"{ASSUMED_ACCELERATOR_IMAGES_PER_S} assumed (8 × A100, IResNet-50)")
    return {"pack": str(pack), "images": len(dataset.labels),
            "identities": dataset.num_identities, "image_size": STREAM_SIZE,
            "layout": list(STREAM_LAYOUT), "augment": STREAM_AUGMENT, "steps": steps,
            "cpu_count": os.cpu_count(), "rows": rows, "projection": projection}


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
    parser.add_argument("--stream", type=pathlib.Path, default=None, metavar="OUT.json",
                        help="only time the streaming pipeline on a 112 px pack; write OUT.json")
    parser.add_argument("--pack", type=pathlib.Path, default=None,
                        help="--stream's pack (made from --folder, default LFW-half, when it "
                        "does not exist; default: a temporary folder)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    add_output_arguments(parser, RESULTS, flag="--output_dir",
                         what="folder of input_pipeline.json and synthetic_faces.png (or "
                              "input_pipeline_train_step.json)")
    args = parser.parse_args(argv)
    output_dir = pathlib.Path(args.output_dir)
    if args.stream is not None:
        refuse_existing(parser, [args.stream], args.overwrite, flag="--stream")
        run_stream(args)
        return
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


def run_stream(args: argparse.Namespace) -> None:
    from facenet_jax.data import rec

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or (SHARED_LFW if SHARED_LFW.is_dir() else None)
        if folder is None:
            folder = pathlib.Path(tmp) / "generated"
            generated_folder(folder)
        pack = args.pack or pathlib.Path(tmp) / "pack"
        if not (pack / rec.REC_FILE).exists():
            print(f"converting {folder} to a {STREAM_SIZE} px pack in {pack} ...", flush=True)
            rec.convert_folder(folder, pack, image_size=STREAM_SIZE)
        report = measure_stream(pack, folder, args.workers, args.steps,
                                pathlib.Path(tmp) / "cache")
    report.update({"python": platform.python_version(),
                   "host": train_step_benchmark.host_description(),
                   "command": "python benchmarks/input_pipeline.py " + " ".join(sys.argv[1:])})
    args.stream.parent.mkdir(parents=True, exist_ok=True)
    args.stream.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
