"""The benchmark evaluations end to end: a tiny run trained with eval.verification_sets logs
eval/<set>/accuracy; `python -m facenet_jax.evaluate --verification_sets ... --ijb ...` on it
writes the JSON, the table and the log-FAR ROC; configs recorded without the new keys are
unchanged."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from facenet_jax.logs import read_metrics

from benchmark_fixtures import png, python2_pickle, synthetic_pairs, write_ijb_layout
from test_train_cli import REPO, _env, _train


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    sets = root / "sets"
    sets.mkdir()
    images, flags = synthetic_pairs(num_pairs=40, size=40)  # 40 px stored, the run uses 16
    (sets / "lfw.bin").write_bytes(python2_pickle([png(i) for i in images], flags))
    (sets / "cfp_fp.bin").write_bytes(pickle.dumps(([png(i) for i in images[::-1]],
                                                    np.array(flags[::-1]))))
    ijb_root = root / "IJB"
    ijb_root.mkdir()
    write_ijb_layout(ijb_root)
    workdir = root / "run"
    _train(workdir, f"--config.eval.verification_sets={sets}",
           "--config.eval.verification_set_names=lfw,cfp_fp")
    return workdir, sets, ijb_root


@pytest.mark.slow
def test_training_logs_each_set_every_eval_every(benchmark_run):
    workdir, _, _ = benchmark_run
    logged = {row["step"]: row for row in read_metrics(workdir)
              if "eval/lfw/accuracy" in row}
    assert sorted(logged) == [4, 8]  # eval_every=4 of 8 steps
    for row in logged.values():
        assert 0.0 <= row["eval/lfw/accuracy"] <= 1.0 and "eval/cfp_fp/accuracy" in row


@pytest.mark.slow
def test_evaluate_cli_writes_sets_and_ijb(benchmark_run):
    workdir, sets, ijb_root = benchmark_run
    result = subprocess.run(
        [sys.executable, "-m", "facenet_jax.evaluate", "--workdir", str(workdir),
         "--verification_sets", str(sets), "--names", "lfw", "--noflip",
         "--ijb", str(ijb_root), "--ijb_name", "IJBC"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((workdir / "eval_verification_sets.json").read_text())
    assert list(saved) == ["lfw"]
    lfw = saved["lfw"]
    assert lfw["flip"] is False and lfw["num_pairs"] == 40 and lfw["source_image_size"] == 40
    assert {"accuracy", "accuracy_std", "val@far=1e-3", "auc", "eer", "step",
            "provenance"} <= set(lfw)
    # The same weights, embedder (no flip) and pairs as the training-time evaluation at step 8.
    final = [row for row in read_metrics(workdir) if "eval/lfw/accuracy" in row][-1]
    assert lfw["step"] == 8 and lfw["accuracy"] == pytest.approx(final["eval/lfw/accuracy"])
    assert (workdir / "eval_verification_sets.md").read_text().startswith("| lfw |")
    ijbc = json.loads((workdir / "eval_ijbc.json").read_text())
    assert set(ijbc["tar@far"]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}
    assert ijbc["features"]["flip"] is False and ijbc["num_pairs"] == 276
    assert (workdir / "eval_ijbc_roc.png").stat().st_size > 0
    assert "TAR (FAR ≤ target, conservative)" in result.stdout


def test_missing_set_fails_before_training_compiles(tmp_path):
    result = _train(tmp_path / "run", f"--config.eval.verification_sets={tmp_path}",
                    "--config.eval.verification_set_names=lfw", check=False)
    assert result.returncode != 0
    assert "config.eval.verification_sets" in result.stderr and "no lfw.bin" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_sets_cli_takes_output_and_records_flags_and_alignment(benchmark_run, tmp_path):
    """--output was refused for --verification_sets; the JSON now carries the VAL@FAR flags
    and the sets' alignment against the run's (synthetic data: no data.alignment)."""
    workdir, sets, _ = benchmark_run
    default = workdir / "eval_verification_sets.json"
    before = default.read_text() if default.exists() else None
    output = tmp_path / "sets.json"
    result = subprocess.run(
        [sys.executable, "-m", "facenet_jax.evaluate", "--workdir", str(workdir),
         "--verification_sets", str(sets), "--names", "cfp_fp", "--output", str(output)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output}" in result.stdout and "\\* unresolved" in result.stdout
    cfp_fp = json.loads(output.read_text())["cfp_fp"]
    assert cfp_fp["val@far=1e-3_resolved"] is False  # 40 pairs: under 1,000 different
    assert cfp_fp["alignment"] == "landmarks, 112 px" and cfp_fp["center_crop"] is None
    assert "raw, unaligned photos" in cfp_fp["alignment_mismatch"]
    assert (tmp_path / "sets.md").exists()
    assert (default.read_text() if default.exists() else None) == before
