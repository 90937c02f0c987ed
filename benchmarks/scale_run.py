"""A simulated scale run: does a pack's size cost anything beyond its index?

Renders synthetic faces at 112 px in chunks (never the whole set in memory) into a RecordIO
pack of 20,000 identities × 10 images (200,000 JPEG records) and a pack 10× smaller, then
trains the at-scale recipe on each through the streaming pipeline: IR-ResNet-50 + ArcFace with
Partial FC (sample_fraction 0.1), B = 64 (16 × 4), 200 steps, 8 forced CPU devices
(experiments/ms1mv2_arcface.py with those overrides). From outside the training process it
samples the resident memory of the process tree (the trainer and its input workers), and reads
the start-up (launch to the pack's index loaded, from the log's timestamps; launch to the
first logged step), the step time (metrics.jsonl's images/s, first log window left out) and
the host time (CPU-seconds the input workers spent per batch).

    python benchmarks/scale_run.py --output OUT.json [--identities 20000] [--images 10]
        [--steps 200] [--model iresnet50] [--workers N] [--scratch DIR]

Not a test: on this project's 2-core CPU machine an IR-ResNet-50 step at B = 64 takes tens of
seconds; `--model small_cnn --identities 2000 --steps 20` is a quick rehearsal.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from kill_resume import REPO, logged_steps, train_env  # noqa: E402

from facenet_jax.data import rec, synthetic  # noqa: E402

IMAGE_SIZE = 112
CHUNK = 500  # images rendered at once per thread: bounds the float32 working memory
_ABSL_TIME = re.compile(r"^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+)")


def rendered_jpegs(identities: int, per_identity: int, seed: int = 0, quality: int = 95
                   ) -> Iterator[bytes]:
    """The JPEGs of load_synthetic(identities, per_identity, 112, seed=seed)'s images, in its
    order, rendered CHUNK at a time on every core (numpy and PIL release the GIL)."""
    faces = synthetic.identity_parameters(identities, seed)
    total = identities * per_identity

    def render(start: int) -> list[bytes]:
        rows = np.arange(start, min(start + CHUNK, total))
        ids, nth = rows // per_identity, rows % per_identity
        nuisance = synthetic.nuisance_parameters(ids, nth, 1.0, seed)
        images = synthetic._to_uint8(synthetic.render_faces(
            {k: v[ids] for k, v in faces.items()}, nuisance, IMAGE_SIZE))
        return [rec.encode_jpeg(image, quality) for image in images]

    threads = os.cpu_count() or 1
    starts = list(range(0, total, CHUNK))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for window in range(0, len(starts), threads):  # a chunk per core at a time, in order
            for chunk in pool.map(render, starts[window:window + threads]):
                yield from chunk


def make_pack(root: pathlib.Path, identities: int, per_identity: int) -> dict:
    """Renders and writes the pack, or reuses the one a run with the same --scratch made."""
    start = time.perf_counter()
    labels = np.repeat(np.arange(identities), per_identity)
    if not (root / rec.REC_FILE).exists():
        rec.write_pack(root, rendered_jpegs(identities, per_identity), labels,
                       image_size=IMAGE_SIZE)
    elif rec.describe_pack(root)["images"] != len(labels):
        raise SystemExit(f"{root} holds another pack; remove it or choose another --scratch")
    return {"identities": identities, "images": int(len(labels)),
            "rec_mib": (root / rec.REC_FILE).stat().st_size / 2**20,
            "idx_mib": (root / rec.IDX_FILE).stat().st_size / 2**20,
            "render_and_write_s": time.perf_counter() - start}


def process_tree(pid: int) -> tuple[float, float]:
    """(resident MiB summed over the process and its children, CPU-seconds of the
    children: the input workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        children = root.children(recursive=True)
        rss = root.memory_info().rss
    except psutil.Error:
        return 0.0, 0.0
    cpu = 0.0
    for child in children:
        try:
            rss += child.memory_info().rss
            times = child.cpu_times()
            cpu += times.user + times.system
        except psutil.Error:
            continue
    return rss / 2**20, cpu


def _absl_seconds(line: str, year: int) -> float | None:
    match = _ABSL_TIME.match(line)
    if not match:
        return None
    stamp = datetime.datetime.strptime(f"{year}{match.group(1)} {match.group(2)}",
                                       "%Y%m%d %H:%M:%S.%f")
    return stamp.timestamp()


def train(pack: pathlib.Path, identities: int, workdir: pathlib.Path,
          args: argparse.Namespace, cache: pathlib.Path) -> dict:
    batch = 64
    test = min(100, identities // 4) / identities  # 100 test people (fewer for rehearsals)
    overrides = [
        f"--config.data.root={pack}", f"--config.num_steps={args.steps}",
        "--config.batch.identities=16", "--config.batch.images_per_identity=4",
        "--config.loss.classification.sample_fraction=0.1", f"--config.model.name={args.model}",
        f"--config.log_every={args.log_every}", f"--config.checkpoint_every={args.steps}",
        f"--config.eval_every={args.steps}", "--config.eval.batch_size=64",
        f"--config.data.split.train={1 - test}", "--config.data.split.validation=0.0",
        f"--config.data.split.test={test}",
        "--config.data.pairs.pairs_per_fold=30"]
    if args.workers is not None:
        overrides.append(f"--config.data.workers={args.workers}")
    command = [sys.executable, "-m", "facenet_jax.train", "--config",
               str(REPO / "experiments" / "ms1mv2_arcface.py"), "--workdir", str(workdir),
               *overrides]
    log = workdir.with_suffix(".log")
    launched = time.time()
    peak, worker_cpu, first_step_at = 0.0, 0.0, None
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=train_env(cache, devices=8),
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        while process.poll() is None:
            rss, cpu = process_tree(process.pid)
            peak, worker_cpu = max(peak, rss), max(worker_cpu, cpu)
            if first_step_at is None and logged_steps(workdir):
                first_step_at = time.time() - launched
            time.sleep(args.interval)
    if process.returncode:
        raise SystemExit(f"training on {pack} failed ({process.returncode}); see {log}")
    text = log.read_text().splitlines()
    year = datetime.date.today().year
    loaded = next((_absl_seconds(line, year) for line in text
                   if re.search(r"train\.rec: \d+ images of \d+ identities", line)), None)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [row["images_per_second"] for row in rows if "images_per_second" in row][1:]
    return {"command": " ".join(command[1:]), "batch": batch, "steps": args.steps,
            "index_loaded_s": None if loaded is None else loaded - launched,
            "first_logged_step_s": first_step_at,
            "step_s_median": batch / statistics.median(rates) if rates else None,
            "input_worker_cpu_s_per_batch": worker_cpu / args.steps,
            "peak_rss_mib_process_tree": peak, "total_s": time.time() - launched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=pathlib.Path, required=True)
    parser.add_argument("--identities", type=int, default=20_000)
    parser.add_argument("--images", type=int, default=10, help="images per identity")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--model", default="iresnet50")
    parser.add_argument("--workers", type=int, default=None, help="data.workers")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--scratch", type=pathlib.Path, default=None,
                        help="where packs and runs go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale_run_") as tmp:
        scratch = args.scratch or pathlib.Path(tmp)
        report = {"image_size": IMAGE_SIZE, "packs": {}}
        for name, identities in (("large", args.identities),
                                 ("small", args.identities // 10)):
            pack = scratch / f"pack_{name}"
            report["packs"][name] = {"pack": make_pack(pack, identities, args.images)}
            print(name, report["packs"][name]["pack"], flush=True)
            report["packs"][name]["run"] = train(pack, identities, scratch / f"run_{name}",
                                                 args, scratch / "compile_cache")
            print(name, report["packs"][name]["run"], flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
