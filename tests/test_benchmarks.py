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
