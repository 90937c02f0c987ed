"""The command lines' shared user-error path (facenet_jax.cli), the verify CLI and the
Encoder's files-and-embeddings API, and quiet loads: every `python -m facenet_jax.X` given one
bad input prints one line naming it and exits 2, without a traceback."""

import json
import logging
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

from facenet_jax import cli
from tiny import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.py"
TINY = {"num_steps": 8, "log_every": 2, "eval_every": 4, "checkpoint_every": 4,
        "data.image_size": 16, "data.synthetic.num_identities": 40,
        "data.synthetic.images_per_identity": 6, "batch.identities": 8,
        "batch.images_per_identity": 2, "data.pairs.pairs_per_fold": 20,
        "eval.batch_size": 64, "model.embedding_dim": 16, "optimizer.schedule": "constant"}


def _cli(module, *args, cwd=REPO, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_one_line_user_error(result, *named):
    """Exit 2, no traceback, exactly one `error (...)` line, the last, naming `named`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error (")]
    assert errors == lines[-1:], result.stderr[-3000:]
    for text in named:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (synthetic faces, 16 px, 16-d, 8 steps) with its threshold."""
    from facenet_jax.config import load_config
    from facenet_jax.train.loop import train_and_evaluate

    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(load_config(DEFAULT, TINY), workdir)
    return workdir


@pytest.fixture(scope="module")
def encoder(run):
    from facenet_jax import parallel
    from facenet_jax.eval.embed import load_encoder

    return load_encoder(run, mesh=parallel.make_mesh(1))


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Six synthetic 16 px faces (3 people × 2) and their PNG files, lossless."""
    from PIL import Image

    from facenet_jax import data

    folder = tmp_path_factory.mktemp("faces")
    faces = data.load_synthetic(num_identities=3, images_per_identity=2, image_size=16, seed=3)
    paths = []
    for i, image in enumerate(faces.images):
        paths.append(folder / f"face{i}.png")
        Image.fromarray(image).save(paths[-1])
    return faces.images, paths


# ----------------------------------------------------------------------------------------------
# The shared user-error path.


def test_a_config_key_typo_is_one_line_exit_2_keeping_did_you_mean(tmp_path):
    """The issue's repro: `--config.loss.stratgy=semihard` printed 55 lines and exited 1."""
    result = _cli("facenet_jax.train", "--config", DEFAULT, "--workdir", tmp_path / "run",
                  "--config.loss.stratgy=semihard")
    line = _assert_one_line_user_error(result, "--config.loss.stratgy",
                                       'Did you mean "strategy" instead of "stratgy"?')
    assert "unknown config key 'stratgy'" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_user_errors_wrapper_one_line_exit_2_and_traceback_on_request(capsys, monkeypatch):
    def corrupt(argv):
        raise pickle.UnpicklingError("sets/lfw.bin: not a readable pickle (truncated)")

    with pytest.raises(SystemExit) as ended:
        cli.one_line_user_errors(corrupt)([])
    assert ended.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error (UnpicklingError): sets/lfw.bin: not a readable pickle (truncated) "
        "[FACENET_JAX_TRACEBACK=1 shows the traceback]"]

    def missing_key(argv):
        raise KeyError("unknown config key 'x'")

    with pytest.raises(SystemExit):  # a KeyError's message, not its repr
        cli.one_line_user_errors(missing_key)([])
    assert capsys.readouterr().err.startswith("error (KeyError): unknown config key 'x' [")

    def bug(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):  # not a user error: the traceback stays
        cli.one_line_user_errors(bug)([])
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(KeyError):  # on request, a user error keeps its traceback too
        cli.one_line_user_errors(missing_key)([])


def _make_corrupt_bin(folder):
    folder.mkdir()
    (folder / "lfw.bin").write_bytes(b"\x80\x02(this is not a pickle")
    return folder


def _align_dst_made_with_other_settings(tmp_path):
    from PIL import Image

    (tmp_path / "src" / "ann").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "src" / "ann" / "1.png")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "alignment.json").write_text(json.dumps(
        {"mode": "landmarks", "image_size": 112, "face": "largest"}))
    return tmp_path / "src", tmp_path / "dst"


# One bad input per CLI: (module, argv builder (tmp_path, run) -> args, texts the line names).
BAD_INPUTS = {
    "train: config key typo": (
        "facenet_jax.train",
        lambda tmp, run: ["--config", DEFAULT, "--workdir", tmp / "w", "--config.los.margin=1"],
        ["--config.los.margin", 'Did you mean "loss"']),
    "train: config file missing": (
        "facenet_jax.train",
        lambda tmp, run: ["--config", tmp / "none.py", "--workdir", tmp / "w",
                          "--config.loss.margin=1"],
        ["none.py: config file not found"]),
    "train: bad flag value": (
        "facenet_jax.train",
        lambda tmp, run: ["--config", DEFAULT, "--workdir", tmp / "w",
                          "--config.loss.margin=abc"],
        ["--config.loss.margin=abc", "could not convert"]),
    "evaluate: corrupt .bin": (
        "facenet_jax.evaluate",
        lambda tmp, run: ["--workdir", run, "--verification_sets", _make_corrupt_bin(tmp / "s")],
        ["(UnpicklingError)", "lfw.bin"]),
    "embed: missing data root": (
        "facenet_jax.embed",
        lambda tmp, run: ["--workdir", run, "--data_root", tmp / "none", "--output",
                          tmp / "e.npz"],
        ["none does not exist"]),
    "crossval: missing pairs file": (
        "facenet_jax.crossval",
        lambda tmp, run: ["--config", DEFAULT, "--pairs", tmp / "pairs.txt", "--workdir",
                          tmp / "cv"],
        ["--pairs", "pairs.txt does not exist"]),
    "align: missing source folder": (
        "facenet_jax.align", lambda tmp, run: [tmp / "photos", tmp / "aligned"],
        ["source folder (SRC)", "photos does not exist"]),
    "align: output made with other settings": (
        "facenet_jax.align", lambda tmp, run: list(_align_dst_made_with_other_settings(tmp)),
        ["dst was aligned with", "'landmarks'", "use another DST"]),
    "pretrained: missing weights": (
        "facenet_jax.pretrained",
        lambda tmp, run: ["--weights", tmp / "vggface2.pt", "--workdir", tmp / "w"],
        ["vggface2.pt does not exist"]),
    "sweep: missing sweep file": (
        "facenet_jax.sweep",
        lambda tmp, run: ["--sweep", tmp / "grid.py", "--workdir", tmp / "w"],
        ["sweep file", "grid.py does not exist"]),
    "verify: missing image": (
        "facenet_jax.verify", lambda tmp, run: [run, tmp / "a.png", tmp / "b.png"],
        ["image file", "a.png does not exist"]),
    "verify: wrong arguments": (
        "facenet_jax.verify", lambda tmp, run: [run, tmp / "a.png"],
        ["usage: python -m facenet_jax.verify DIR IMG_A IMG_B"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_every_cli_reports_a_bad_input_in_one_line(case, run, tmp_path):
    module, make_args, named = BAD_INPUTS[case]
    line = _assert_one_line_user_error(_cli(module, *make_args(tmp_path, run)), *named)
    assert "data.root" not in line or module != "facenet_jax.align"


def test_every_cli_module_goes_through_the_shared_path():
    """Each `python -m facenet_jax.X` entry point starts through facenet_jax.cli (so a CLI
    added later without it fails here)."""
    package = REPO / "facenet_jax"
    entries = sorted(p for p in package.rglob("*.py")
                     if 'if __name__ == "__main__":' in p.read_text() or p.name == "__main__.py")
    assert {str(p.relative_to(package)) for p in entries} >= {
        "train/__main__.py", "evaluate.py", "embed.py", "crossval.py", "align.py",
        "pretrained.py", "sweep/__main__.py", "verify.py"}
    for path in entries:
        text = path.read_text()
        assert "cli.run(main" in text or "one_line_user_errors(main)" in text, path


# ----------------------------------------------------------------------------------------------
# Files in, verdict out: the Encoder's API and the verify CLI.


@pytest.mark.slow
def test_distance_and_verify_take_embeddings_as_well_as_images(encoder, faces):
    images, _ = faces
    a, b = images[[0, 2, 4]], images[[1, 3, 0]]
    e_a, e_b = encoder.embed(a), encoder.embed(b)
    expected = np.sum((e_a.astype(np.float64) - e_b) ** 2, axis=1)  # the run's distance
    np.testing.assert_allclose(encoder.distance(e_a, e_b), expected, atol=1e-6)
    np.testing.assert_allclose(encoder.distance(a, e_b), expected, atol=1e-5)  # mixed
    np.testing.assert_allclose(encoder.distance(e_a[0], b[0]), expected[:1], atol=1e-5)
    np.testing.assert_allclose(encoder.distance(e_a.astype(np.float64), e_b), expected,
                               atol=1e-6)
    low, middle, _ = np.sort(expected)
    threshold = float(low + middle) / 2  # between two distances: no tie to round either way
    verdicts = encoder.verify(e_a, e_b, threshold)
    np.testing.assert_array_equal(verdicts, expected <= threshold)
    assert verdicts.sum() == 1


@pytest.mark.slow
@pytest.mark.parametrize("bad", [
    np.zeros((16, 16, 3), np.float32),  # float images
    np.zeros(16, np.uint8),  # a uint8 vector
    np.zeros(17, np.float32),  # another embedding size
    np.zeros((2, 3, 16), np.float32),
    np.zeros((16, 16), np.uint8),  # grey image
])
def test_distance_names_both_accepted_forms_for_anything_else(encoder, faces, bad):
    with pytest.raises(ValueError, match=r"expected images \(uint8 \[H,W,3\] or \[N,H,W,3\], "
                                         r"16x16 for this run\) or embeddings \(float \[16\] "
                                         r"or \[N,16\]\)"):
        encoder.distance(bad, faces[0][0])


@pytest.mark.slow
def test_verify_files_decodes_as_the_run_does(encoder, faces):
    images, paths = faces
    threshold = encoder.threshold_info["threshold"]
    a, b = [paths[0], paths[2], paths[4]], [paths[1], paths[3], paths[0]]
    by_images = encoder.distance(images[[0, 2, 4]], images[[1, 3, 0]])
    np.testing.assert_array_equal(encoder.verify_files(a, b), by_images <= threshold)
    np.testing.assert_array_equal(encoder.verify_files(paths[0], paths[0]), [True])
    assert encoder.verify_files(paths[0], paths[1], threshold=-1.0).tolist() == [False]


@pytest.mark.slow
def test_verify_cli_prints_distance_threshold_and_verdict(run, encoder, faces):
    images, paths = faces
    chosen = encoder.threshold_info
    expected = float(encoder.distance(images[0], images[1])[0])
    result = _cli("facenet_jax.verify", run, paths[0], paths[1])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"distance   {expected:.4f} (squared)"
    assert lines[1] == (f"threshold  {chosen['threshold']:.4f} (the run's, chosen on its "
                        f"validation split at step 8)")
    verdict = "same person" if expected <= chosen["threshold"] else "different people"
    assert lines[2] == f"verdict    {verdict}" and len(lines) == 3  # no alignment note
    given = _cli("facenet_jax.verify", run, paths[0], paths[1], "--threshold", expected + 1e-3)
    assert given.stdout.strip().splitlines()[1:] == [
        f"threshold  {expected + 1e-3:.4f} (given on the command line)", "verdict    same person"]
    assert "read only" not in result.stderr + given.stderr  # quiet loads


def test_alignment_note_only_for_runs_trained_on_aligned_crops():
    from facenet_jax.eval import verify
    from facenet_jax.config import load_config

    assert verify.alignment_note(load_config(DEFAULT)) is None
    note = verify.alignment_note(load_config(DEFAULT, {"data.alignment": "landmarks"}))
    assert "'landmarks'-aligned crops" in note and "--mode landmarks" in note
    assert "must be such crops" in note


@pytest.mark.slow
def test_verify_of_a_run_on_aligned_crops_says_the_inputs_must_be_such_crops(
        run, encoder, faces, monkeypatch):
    import dataclasses

    from facenet_jax.eval import embed, verify

    config = encoder.config.copy_and_resolve_references()
    with config.unlocked():
        config.data.alignment = "box"
    aligned = dataclasses.replace(encoder, config=config)
    monkeypatch.setattr(embed, "load_encoder", lambda workdir: aligned)
    lines = verify.verify_pair(run, faces[1][0], faces[1][1])
    assert lines[0] == verify.alignment_note(config) and "'box'-aligned crops" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["distance", "threshold", "verdict"]


# ----------------------------------------------------------------------------------------------
# Quiet loads.


@pytest.mark.slow
def test_loading_a_run_logs_no_read_only_warnings(run, caplog):
    """orbax warned three times per load that a read-only manager saves nothing."""
    from facenet_jax import checkpoints, parallel
    from facenet_jax.eval.embed import load_encoder

    with caplog.at_level(logging.WARNING):
        load_encoder(run, mesh=parallel.make_mesh(1))
        assert checkpoints.latest_step(run) == 8
    assert [r.getMessage() for r in caplog.records] == []
    with caplog.at_level(logging.WARNING, logger="absl"):  # other orbax warnings still pass
        logging.getLogger("absl").warning("Given directory is read only=elsewhere")
    assert caplog.records[-1].getMessage() == "Given directory is read only=elsewhere"
