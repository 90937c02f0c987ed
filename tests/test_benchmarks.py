"""Smoke tests of the benchmark scripts at tiny sizes: they run, write valid JSON, measure what
they claim (bf16 requested with float32 params, both loss-share methods), reject bad input.
No timing is asserted (timings belong in benchmarks/results). One device and the cheapest
strategy keep the compiles (most of this file's time) short; benchmarks/results holds the
multi-device runs."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import input_pipeline, mining_breakdown, train_step  # noqa: E402


@pytest.mark.slow
def test_train_step_benchmark_writes_a_row_per_setting(tmp_path):
    output = tmp_path / "train_step.json"
    train_step.main(["--models", "small_cnn", "--batches", "4x2", "--devices", "1",
                     "--dtypes", "bfloat16", "--image_size", "16", "--steps", "1",
                     "--rounds", "1", "--share", "both", "--strategy", "hardest",
                     "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["platform"] == "cpu" and report["host"]["cpu_count"] >= 1
    (row,) = report["rows"]
    assert (row["model"], row["P"], row["K"], row["batch"], row["devices"], row["dtype"]) == (
        "small_cnn", 4, 2, 8, 1, "bfloat16")
    # bf16 compute, float32 parameters: the program asks for bf16 convolutions only.
    assert row["param_dtypes"] == ["float32"]
    assert set(row["conv_dtypes"]["requested"]) == {"bf16"}
    assert sum(row["conv_dtypes"]["compiled"].values()) > 0
    for key in ("compile_s", "step_s", "loss_alone_s", "linear_loss_step_s",
                "flops_per_device_step"):
        assert row[key] > 0, key
    assert row["images_per_s"] == pytest.approx(8 / row["step_s"])
    assert row["loss_share_alone"] == pytest.approx(row["loss_alone_s"] / row["step_s"])
    assert row["loss_share_difference"] == pytest.approx(
        1 - row["linear_loss_step_s"] / row["step_s"])
    assert row["mfu"] is None  # no peak FLOP/s for a CPU


def test_conv_dtypes_reads_stablehlo_and_compiled_hlo():
    lowered = ("%3 = stablehlo.convolution(%1, %2) dim_numbers = [b, 0, 1, f] : "
               "(tensor<8x16x16x3xbf16>, tensor<3x3x3x16xbf16>) -> tensor<8x8x8x16xbf16>")
    compiled = ("%conv.1 = f32[8,8,8,16]{3,2,1,0} convolution(%a, %b), window={size=3x3}\n"
                "%cudnn.2 = (bf16[8,8,8,16]{3,2,1,0}, u8[0]{0}) custom-call(%c, %d), "
                'window={size=3x3}, custom_call_target="__cudnn$convForward"\n'
                "%add.3 = f32[8]{0} add(%e, %f)")
    assert train_step.conv_dtypes(lowered, compiled) == {
        "requested": {"bf16": 1}, "compiled": {"f32": 1, "bf16": 1}}


@pytest.mark.parametrize("argv, message", [
    (["--batches", "32"], "bad P×K"),
    (["--batches", "6x4", "--devices", "4"], "cannot be split over 4 devices"),
    (["--dtypes", "float16"], "unknown dtype"),
    (["--models", "vgg"], "unknown model"),
])
def test_train_step_benchmark_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        train_step.parse_args(argv)
    assert message in str(error.value) + capsys.readouterr().err


def test_input_overhead_times_both_feeds():
    (row,) = input_pipeline.measure_train_step_input_overhead(
        image_size=16, layouts=((4, 2),), devices=1, steps=2, rounds=1, prefetch=2,
        strategy="hardest")
    assert (row["P"], row["K"], row["devices"], row["steps"]) == (4, 2, 1, 2)
    for key in ("fixed_step_s", "real_input_step_s", "host_batch_s"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["ratio"] == pytest.approx(row["real_input_step_s"] / row["fixed_step_s"])


@pytest.mark.slow
def test_heap_growth_measures_both_heaps_between_its_marks(tmp_path):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from benchmarks import heap_growth, kill_resume

    overrides = heap_growth.tiny_overrides(12)
    assert overrides["num_steps"] == 12 and overrides["data.image_size"] == 16
    assert overrides["optimizer.schedule"] == "constant"  # bare words stay strings
    assert len(overrides) == len(kill_resume.TINY) + 1  # + checkpoint_every
    result = heap_growth.measure(12, 6, tmp_path / "run")
    assert result["first_mark"] == 6 and len(result["python_heap_mib"]) == 2
    assert all(value > 0 for value in result["python_heap_mib"] + result["anon_rss_mib"])
    assert math.isfinite(result["python_growth_mib_per_1000_steps"])
    assert result["top_python_growth"] and all(
        {"site", "growth_kib", "new_blocks"} <= set(site) for site in result["top_python_growth"])
    assert not any("heap_growth.py" in site["site"] for site in result["top_python_growth"])


@pytest.mark.slow
def test_mining_breakdown_times_each_part_of_each_size():
    rows = mining_breakdown.main(["--sizes", "16x4,12x3", "--repeats", "2"])
    assert [(r["batch"], r["per_identity"]) for r in rows] == [(16, 4)] * 3 + [(12, 3)] * 3
    assert [r["part"] for r in rows[3:]] == [
        "loss forward + backward, 12 anchor rows per block",
        "loss forward, 12 anchor rows per block", "distance matrix forward + backward"]
    assert all(0 < r["min_ms"] <= r["median_ms"] for r in rows)
    chunked = mining_breakdown.main(["--sizes", "16x4", "--repeats", "1",
                                     "--anchor-chunks", "auto,4"])
    assert [r["part"] for r in chunked] == [
        "loss forward + backward, 16 anchor rows per block",
        "loss forward, 16 anchor rows per block",
        "loss forward + backward, 4 anchor rows per block",
        "loss forward, 4 anchor rows per block", "distance matrix forward + backward"]


# Each script's output flag and arguments that keep a run (if one started) tiny.
OUTPUT_FLAGS = {
    "heap_growth": ("--output", ["--num-steps", "4", "--first", "2"]),
    "ijb_scoring": ("--output", ["--images", "40", "--templates", "4", "--pairs", "50"]),
    "input_pipeline": ("--output_dir", ["--steps", "1"]),
    "kill_resume": ("--output", ["--kills", "1", "--num-steps", "4"]),
    "long_run": ("--output", ["--num-steps", "4", "--warmup-steps", "2"]),
    "mining": ("--out", ["--sizes", "16", "--strategies", "semihard", "--chunked", "none"]),
    "train_step": ("--output", ["--models", "small_cnn", "--batches", "4x2", "--devices", "1",
                                "--steps", "1", "--rounds", "1"]),
}


@pytest.mark.parametrize("script", list(OUTPUT_FLAGS))
def test_benchmarks_refuse_an_existing_output_unless_overwrite(script, tmp_path, capsys):
    """A benchmark run never replaces a results file (the committed benchmarks/results/ by
    default) unless asked: refused before anything is measured, the file left as it was."""
    import importlib

    module = importlib.import_module(f"benchmarks.{script}")
    flag, tiny = OUTPUT_FLAGS[script]
    existing = tmp_path / "result.json"
    existing.write_text('{"committed": true}\n')
    target = tmp_path if flag == "--output_dir" else existing
    if flag == "--output_dir":  # a folder whose first output file is there already
        (tmp_path / "input_pipeline.json").write_text('{"committed": true}\n')
    with pytest.raises(SystemExit) as ended:
        module.main([*tiny, flag, str(target)])
    assert ended.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already exists" in error and "--overwrite" in error and flag in error
    assert existing.read_text() == '{"committed": true}\n'


def test_output_check_passes_a_new_path_and_an_overwrite(tmp_path):
    import argparse

    from benchmarks import ijb_scoring
    from benchmarks.output_file import add_output_arguments, refuse_existing

    parser = argparse.ArgumentParser()
    add_output_arguments(parser, tmp_path / "default.json")
    args = parser.parse_args([])
    assert (args.output, args.overwrite) == (str(tmp_path / "default.json"), False)
    refuse_existing(parser, [tmp_path / "new.json"], overwrite=False)  # nothing there
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    refuse_existing(parser, [existing], overwrite=True)
    result = ijb_scoring.main(["--images", "40", "--templates", "4", "--pairs", "20000",
                               "--output", str(existing), "--overwrite"])
    assert json.loads(existing.read_text()) == result and "overwrite" not in result


def test_stream_benchmark_times_every_path_on_a_pack(tmp_path):
    """The --stream rows (decoders, the cached folder, the thread, workers) on a tiny pack."""
    from facenet_jax import data
    from facenet_jax.data import rec

    faces = data.load_synthetic(num_identities=40, images_per_identity=4, image_size=112)
    folder = tmp_path / "faces"
    for i, (image, label) in enumerate(zip(faces.images, faces.labels)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / f"{i}.png").write_bytes(rec.encode_jpeg(image))
    rec.convert_folder(folder, tmp_path / "pack", image_size=112)
    report = input_pipeline.measure_stream(tmp_path / "pack", folder, [], steps=3,
                                           cache_dir=tmp_path / "cache", decode_seconds=0.1)
    paths = [row["path"] for row in report["rows"]]
    assert paths[0] == "decode only, pil (1 thread)"
    assert paths[-2:] == ["folder cache + prefetch thread (today)", "pack, prefetch thread"]
    for row in report["rows"]:
        assert row["images_per_s"] > 0 and row["after"]["load_1min"] >= 0
    assert report["projection"] is None  # no worker row measured


def test_scale_run_renders_load_synthetics_faces_chunk_by_chunk(monkeypatch, tmp_path):
    """The scale run's pack holds exactly load_synthetic's faces (as JPEGs), whatever the
    chunk size, and its pack reads back as that many identities."""
    from benchmarks import scale_run
    from facenet_jax import data
    from facenet_jax.data import rec

    monkeypatch.setattr(scale_run, "CHUNK", 5)  # chunks that cut identities
    faces = data.load_synthetic(num_identities=3, images_per_identity=4, image_size=112)
    assert list(scale_run.rendered_jpegs(3, 4)) == [rec.encode_jpeg(im) for im in faces.images]
    summary = scale_run.make_pack(tmp_path / "pack", 3, 4)
    assert (summary["identities"], summary["images"]) == (3, 12)
    assert rec.load_pack(tmp_path / "pack", 112).counts().tolist() == [4, 4, 4]


def _torch_anchor():
    pytest.importorskip("torch")
    from benchmarks import train_step_torch
    return train_step_torch


def test_torch_anchor_is_the_same_resnet18_as_ours():
    """Parameter and BN-statistics counts of the PyTorch model equal facenet_jax's resnet18
    (the counts see every width, block, projection, the head BN and the embedding's bias)."""
    import jax
    import jax.numpy as jnp

    from facenet_jax import config as cfg
    from facenet_jax.state import build_model

    torch_model = _torch_anchor().build_model()
    config = cfg.load_config(train_step.REPO / "experiments" / "default.py",
                             {"model.name": "resnet18", "data.image_size": 32})
    variables = jax.eval_shape(lambda: build_model(config, bn_axis_name=None).init(
        jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False))
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    assert sum(p.numel() for p in torch_model.parameters()) == count(variables["params"])
    assert sum(b.numel() for name, b in torch_model.named_buffers()
               if "running" in name) == count(variables["batch_stats"])
    import torch
    embeddings = torch_model.train()(torch.zeros(4, 3, 32, 32).uniform_(-1, 1))
    assert embeddings.shape == (4, 128)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("duplicates", [False, True])
def test_torch_anchor_loss_is_our_semihard_loss(duplicates):
    """The anchor's loss value equals losses.triplet_loss(strategy="semihard") on the same
    batch, also with duplicated rows (distance exactly 0: ties among negatives)."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from facenet_jax import losses

    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(24, 8)).astype(np.float32)
    if duplicates:
        embeddings[1] = embeddings[0]
        embeddings[9] = embeddings[4]  # identity 2's row 9 = identity 1's row 4: a negative at 0
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = np.repeat(np.arange(6), 4)
    ours = losses.triplet_loss(jnp.asarray(embeddings), jnp.asarray(labels), margin=0.2,
                               strategy="semihard")[0]
    anchor = _torch_anchor().semihard_loss(torch.tensor(embeddings), torch.tensor(labels))
    assert anchor.item() == pytest.approx(float(ours), rel=1e-5)


def test_torch_anchor_benchmark_writes_rows_and_keeps_existing_output(tmp_path, capsys):
    module = _torch_anchor()
    output = tmp_path / "torch.json"
    module.main(["--batches", "2x2", "--image_size", "16", "--steps", "1", "--rounds", "2",
                 "--threads", "1", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["threads"] == 1 and report["framework"] == "torch"
    (row,) = report["rows"]
    assert (row["P"], row["K"], row["batch"], row["image_size"]) == (2, 2, 4, 16)
    assert len(row["round_s"]) == 2 and row["step_s"] == min(row["round_s"]) > 0
    assert math.isfinite(row["final_loss"])
    for argv, message in [([], "exists; give a new --output"),
                          (["--overwrite", "--batches", "32x32"], "above 512"),
                          (["--overwrite", "--image_size", "8"], "below 16 px")]:
        with pytest.raises(SystemExit):
            module.parse_args(["--output", str(output), *argv])
        assert message in capsys.readouterr().err
    module.parse_args(["--output", str(output), "--overwrite"])


@pytest.mark.slow
def test_torch_anchor_alternates_rounds_with_our_step(tmp_path):
    output = tmp_path / "both.json"
    (row,) = _torch_anchor().main(["--batches", "2x2", "--image_size", "16", "--steps", "1",
                                   "--rounds", "3", "--with_jax", "--output", str(output)])
    assert len(row["jax_round_s"]) == len(row["round_s"]) == 3
    assert row["jax_step_s"] == min(row["jax_round_s"]) > 0
    ratios = [j / t for j, t in zip(row["jax_round_s"], row["round_s"])]
    assert row["jax_over_torch_per_round"] == pytest.approx(ratios)
    assert row["jax_over_torch_median"] == pytest.approx(sorted(ratios)[1])
    assert json.loads(output.read_text())["jax"]
