"""insightface `.bin` verification sets: the restricted unpickler, reading, and the evaluation
checked against a brute-force computation of the protocol."""

import io
import json
import logging
import pathlib
import pickle
import pickletools

import numpy as np
import pytest

from facenet_jax import safe_pickle
from facenet_jax.eval import verification_sets
from facenet_jax.eval.evaluate import pixel_embeddings

from benchmark_fixtures import png, python2_pickle, synthetic_pairs


@pytest.fixture(scope="module")
def py2_bin(tmp_path_factory):
    images, flags = synthetic_pairs()
    images[5] = 128  # a flat image encodes to < 256 bytes: a SHORT_BINSTRING
    encoded = [png(image) for image in images]
    path = tmp_path_factory.mktemp("sets") / "lfw.bin"
    path.write_bytes(python2_pickle(encoded, flags))
    return path, images, np.array(flags)


def test_python2_stream_uses_string_opcodes_and_reads_back(py2_bin):
    path, images, flags = py2_bin
    names = {op.name for op, _, _ in pickletools.genops(path.read_bytes())}
    assert {"SHORT_BINSTRING", "BINSTRING"} <= names
    assert not names & {"BINBYTES", "SHORT_BINBYTES", "GLOBAL", "REDUCE"}
    vset = verification_sets.read_bin(path, 32)
    assert vset.name == "lfw" and vset.source_size == 32
    np.testing.assert_array_equal(vset.images, images)  # PNG is lossless
    np.testing.assert_array_equal(vset.is_same, flags)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_streams_with_numpy_bool_flags_read_the_same(tmp_path, protocol):
    images, flags = synthetic_pairs(num_pairs=10)
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(pickle.dumps(([png(i) for i in images], np.array(flags)),
                                  protocol=protocol))
    vset = verification_sets.read_bin(path, 32)
    np.testing.assert_array_equal(vset.images, images)
    np.testing.assert_array_equal(vset.is_same, flags)


class _RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_pickle_is_refused_without_running_anything(tmp_path, protocol):
    target = tmp_path / "pwned"
    payload = pickle.dumps(([b"x", b"y"], [_RunsCode(target)]), protocol=protocol)
    # The payload is real: unrestricted pickle would create the file.
    path = tmp_path / "lfw.bin"
    path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=r"lfw.bin: refused global posix\.system"):
        verification_sets.read_bin(path, 32)
    assert not target.exists()
    pickle.loads(payload)
    assert target.exists()


@pytest.mark.parametrize("payload, problem", [
    (pickle.dumps({"images": [b"x"]}, protocol=2), "refused opcode EMPTY_DICT"),
    (pickle.dumps(np.arange(3), protocol=2), "refused numpy dtype"),
    (pickle.dumps(([b"x"], [True]), protocol=2)[:-5], "not a readable pickle"),
    (b"\x80\x02cbuiltins\neval\nq\x00.", r"refused global builtins\.eval"),
    (b"\x80\x02cnumpy\nndarray\n)R.", r"refused call of numpy\.ndarray"),
])
def test_other_foreign_streams_are_refused_with_a_reason(payload, problem):
    with pytest.raises(pickle.UnpicklingError, match=problem):
        safe_pickle.load_data_pickle(payload)


def test_second_guard_alone_refuses_build_on_an_allowed_global():
    # BUILD with slot state would setattr on the stand-in; the opcode scan already refuses the
    # dict it needs (EMPTY_DICT), so the unpickler is driven directly here.
    payload = b"\x80\x02cnumpy\ndtype\nN}X\x01\x00\x00\x00aK\x01s\x86b."
    with pytest.raises(pickle.UnpicklingError, match="refused opcode EMPTY_DICT"):
        safe_pickle.check_opcodes(payload)
    with pytest.raises(pickle.UnpicklingError, match=r"the stream modifies numpy\.dtype"):
        safe_pickle._RestrictedUnpickler(io.BytesIO(payload)).load()
    assert np.dtype(bool).byteorder == "|"  # numpy's own bool dtype untouched


class _FlaggedBoolDtype:
    """A bool dtype whose BUILD state flags it as holding objects (np.dtype.__setstate__ takes
    the flags unchecked)."""

    def __reduce__(self):
        return (np.dtype, ("b1", False, True), (3, "|", None, None, None, -1, -1, 0x1 | 0x8 | 0x10))


class _ArrayOfFlaggedDtype:
    def __reduce__(self):
        from numpy.core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (0,), b"b"),
                (1, (16,), _FlaggedBoolDtype(), False, b"\x41" * 16))


def test_an_array_never_takes_a_dtype_the_stream_rebuilt():
    _, flags = safe_pickle.load_data_pickle(pickle.dumps(([], _ArrayOfFlaggedDtype()),
                                                         protocol=2))
    assert flags.dtype == np.dtype(bool) and not flags.dtype.hasobject
    assert np.asarray(flags).tolist() == [True] * 16


def test_structure_size_and_corrupt_image_errors(tmp_path, caplog):
    images, flags = synthetic_pairs(num_pairs=4, size=40)
    encoded = [png(i) for i in images]
    path = tmp_path / "calfw.bin"
    path.write_bytes(pickle.dumps((encoded, flags[:3])))
    with pytest.raises(ValueError, match="8 images for 3 pairs"):
        verification_sets.read_bin(path, 32)
    path.write_bytes(pickle.dumps((encoded[:5] + [b"not an image"] + encoded[6:], flags)))
    with pytest.raises(ValueError, match=r"image 5 \(pair 2\) cannot be decoded"):
        verification_sets.read_bin(path, 32)
    path.write_bytes(pickle.dumps((encoded, flags)))
    with caplog.at_level(logging.INFO):
        vset = verification_sets.read_bin(path, 32)  # 40 px stored, 32 px model
    assert vset.images.shape == (8, 32, 32, 3) and vset.source_size == 40
    assert "resized to 32 px" in caplog.text


def _shared_nesting(depth):
    """Flags nested `depth` lists deep, each level holding the one below twice (one object: the
    pickle memo stores it once), 2^depth bools in all."""
    flags = [True, False]
    for _ in range(depth - 1):
        flags = [flags, flags]
    return flags


def test_flags_nested_through_shared_references_are_refused_before_any_walk(tmp_path):
    # The audit's file: 29 levels, about 300 bytes, 2^29 flags once expanded (np.asarray of it
    # exhausts memory). Only the loader is called here: it must refuse, in milliseconds.
    data = pickle.dumps(([], _shared_nesting(29)), protocol=2)
    assert len(data) < 400  # 212 bytes at protocol 2
    with pytest.raises(pickle.UnpicklingError, match=r"over \d+ items once shared references"):
        safe_pickle.load_data_pickle(data, "crafted.bin")
    looped = []
    looped.append(looped)
    with pytest.raises(pickle.UnpicklingError, match="contains itself"):
        safe_pickle.load_data_pickle(pickle.dumps(([], looped), protocol=2))
    # Legitimate sharing stays within the bound: the same bytes object referenced twice.
    image = b"x" * 50
    assert safe_pickle.load_data_pickle(pickle.dumps(([image, image], [True]))) == (
        [image, image], [True])


@pytest.mark.parametrize("flags", [_shared_nesting(3), [1, 0, 1, 0], [[True], [False]],
                                   np.array([[True, False]] * 2),
                                   (True, False, True, False)])
def test_flags_must_be_a_flat_list_of_bools_or_a_1d_bool_array(tmp_path, flags):
    images, _ = synthetic_pairs(num_pairs=2, size=16)
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([png(i) for i in images], flags)))
    with pytest.raises(ValueError, match="flat list of is-same flags .bools. or a 1-D numpy "
                                         "bool array"):
        verification_sets.read_bin(path, 16)


def test_find_sets_names_missing_files(tmp_path):
    for name in ("cplfw", "lfw", "extra"):
        (tmp_path / f"{name}.bin").write_bytes(b"")
    assert list(verification_sets.find_sets(tmp_path)) == ["lfw", "cplfw", "extra"]
    assert list(verification_sets.find_sets(tmp_path, ["cplfw"])) == ["cplfw"]
    with pytest.raises(FileNotFoundError, match=r"no cfp_fp\.bin, agedb_30\.bin; present: "
                                                r"cplfw, extra, lfw"):
        verification_sets.find_sets(tmp_path, verification_sets.parse_names(
            "lfw, cfp_fp,agedb_30"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        verification_sets.find_sets(tmp_path / "nowhere")


def _brute_force_accuracy(d, same, num_folds=10):
    """The LFW protocol by hand: contiguous folds, every candidate threshold tried."""
    folds = np.array_split(np.arange(len(d)), num_folds)
    accuracies = []
    for held in folds:
        train = np.setdiff1d(np.arange(len(d)), held)
        candidates = [-np.inf] + sorted(set(d[train].tolist()))
        scores = [np.mean((d[train] <= t) == same[train]) for t in candidates]
        best = candidates[int(np.argmax(scores))]
        accuracies.append(np.mean((d[held] <= best) == same[held]))
    return np.mean(accuracies), np.std(accuracies)


def _brute_force_val(d, same, far_target, num_folds=10):
    vals = []
    for held in np.array_split(np.arange(len(d)), num_folds):
        train = np.setdiff1d(np.arange(len(d)), held)
        values = sorted(set(d[train].tolist()))
        candidates = values + [np.nextafter(v, -np.inf) for v in values]
        feasible = [t for t in candidates if np.mean(d[train][~same[train]] <= t) <= far_target]
        threshold = max(feasible)
        vals.append(np.mean(d[held][same[held]] <= threshold))
    return np.mean(vals)


def test_evaluation_matches_brute_force_protocol(py2_bin):
    path, images, flags = py2_bin
    vset = verification_sets.read_bin(path, 32)
    pairs = vset.pairs()
    assert np.bincount(pairs.fold).tolist() == [4] * 10  # 40 pairs, contiguous
    np.testing.assert_array_equal(pairs.fold, np.repeat(np.arange(10), 4))
    result = verification_sets.evaluate_set(pixel_embeddings, vset, distance="squared")
    emb = pixel_embeddings(images)
    d = np.sum((emb[0::2] - emb[1::2]) ** 2, axis=1)
    accuracy, std = _brute_force_accuracy(d, flags)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["accuracy_std"] == pytest.approx(std)
    assert result["val@far=1e-2"] == pytest.approx(_brute_force_val(d, flags, 1e-2))
    assert result["num_pairs"] == 40 and result["num_images"] == 80
    ranks = np.array([np.mean(d[~flags] > x) + 0.5 * np.mean(d[~flags] == x) for x in d[flags]])
    assert result["auc"] == pytest.approx(ranks.mean())  # Mann-Whitney form of the AUC


def test_davidsandbergs_protocol_on_a_bin_set_equals_the_port(py2_bin):
    from test_eval_protocol import sandberg_fold_accuracies

    path, images, flags = py2_bin
    vset = verification_sets.read_bin(path, 32)
    result = verification_sets.evaluate_set(pixel_embeddings, vset, distance="angular",
                                            subtract_mean=True, threshold_search="grid")
    emb = pixel_embeddings(vset.images).astype(np.float64)
    want = sandberg_fold_accuracies(emb[0::2], emb[1::2], flags, 10, 1, True)
    assert result["accuracy"] == pytest.approx(np.mean(want), abs=1e-12)
    assert result["unbalanced_folds"] == [k + 1 for k in range(10)
                                          if len(set(flags[4 * k:4 * k + 4])) < 2]


def test_uneven_pair_count_folds_like_kfold():
    vset = verification_sets.VerificationSet("x", np.zeros((46, 2, 2, 3), np.uint8),
                                             np.arange(23) % 2 == 0, 2)
    assert np.bincount(vset.pairs().fold).tolist() == [3, 3, 3] + [2] * 7  # KFold's sizes


def test_training_metrics_keys_and_table(py2_bin, tmp_path):
    path, _, _ = py2_bin
    vset = verification_sets.read_bin(path, 32)
    row = verification_sets.training_metrics(pixel_embeddings, [vset], distance="euclidean")
    assert list(row) == ["eval/lfw/accuracy"]
    result = verification_sets.evaluate_set(pixel_embeddings, vset, distance="euclidean")
    assert row["eval/lfw/accuracy"] == result["accuracy"]
    table = verification_sets.write_results({"lfw": {**result, "flip": True}},
                                            tmp_path / "eval_verification_sets.json")
    text = table.read_text()
    assert text.startswith("| lfw |") and f"{100 * result['accuracy']:.2f}" in text


def test_configured_sets_off_by_default_and_names_need_a_folder(py2_bin):
    import ml_collections

    path, _, _ = py2_bin
    config = ml_collections.ConfigDict({"verification_sets": None,
                                        "verification_set_names": None})
    assert verification_sets.configured_sets(config, 32) == []
    config.verification_set_names = "lfw"
    with pytest.raises(ValueError, match="verification_sets .* is not"):
        verification_sets.configured_sets(config, 32)
    config.verification_sets = str(path.parent)
    assert [s.name for s in verification_sets.configured_sets(config, 32)] == ["lfw"]


# ----------------------------------------------------------------------------------------------
# The run's preprocessing, alignment and output (issue 29): a .bin of the same photos as a
# folder + pairs file scores as the folder does.

NAMES = [f"Person_{chr(65 + i)}{chr(65 + i)}" for i in range(8)]


@pytest.fixture(scope="module")
def photos_two_ways(tmp_path_factory):
    """The same PNG photos (40 px, 6 per person) as an image folder with an LFW pairs file and
    as an unknown-alignment .bin and a known-name one holding those pairs in file order."""
    from facenet_jax import data

    root = tmp_path_factory.mktemp("two_ways")
    faces = data.load_synthetic(len(NAMES), 6, 40, 1.0, seed=3)
    for row, (image, label) in enumerate(zip(faces.images, faces.labels)):
        (root / "folder" / NAMES[label]).mkdir(parents=True, exist_ok=True)
        (root / "folder" / NAMES[label] / f"{NAMES[label]}_{row % 6 + 1:04d}.png").write_bytes(
            png(np.asarray(image)))
    folder = data.load_image_folder(root / "folder", 40, cache_dir=root / "cache")
    data.write_pairs(root / "pairs.txt", data.generate_pairs(folder, num_folds=10,
                                                             pairs_per_fold=2, seed=0), folder)
    pairs = data.read_pairs(root / "pairs.txt", folder)  # file order: the .bin's order
    rows = np.stack([pairs.first, pairs.second], axis=1).ravel()
    encoded = [pathlib.Path(folder.paths[i]).read_bytes() for i in rows]
    (root / "sets").mkdir()
    for name in ("lfw", "home"):
        (root / "sets" / f"{name}.bin").write_bytes(python2_pickle(encoded,
                                                                   pairs.is_same.tolist()))
    return root


class _PixelEncoder:
    """What load_encoder returns, embedding raw pixels: the folder and .bin paths then differ
    only in the images they hand it."""

    def __init__(self, config):
        self.config, self.step = config, 8

    def embed(self, images):
        return pixel_embeddings(images)


@pytest.fixture
def pixel_run(photos_two_ways, tmp_path, monkeypatch):
    """An lfw.py-like run (raw photos, data.center_crop 0.5, no data.alignment), its encoder
    replaced by raw pixels; `loads` counts the encoder loads."""
    import facenet_jax.eval.embed
    from facenet_jax.config import load_config

    config = load_config(pathlib.Path(__file__).resolve().parents[1] / "experiments" /
                         "default.py", {"data.image_size": 16, "data.center_crop": 0.5,
                                        "data.cache_dir": str(tmp_path / "cache")})
    loads = []

    def load_encoder(workdir, **kwargs):
        loads.append(workdir)
        return _PixelEncoder(config)

    monkeypatch.setattr(facenet_jax.eval.embed, "load_encoder", load_encoder)
    (tmp_path / "run").mkdir()
    return tmp_path / "run", config, loads


def test_bin_images_are_preprocessed_exactly_as_the_folder_files(photos_two_ways):
    """read_bin skipped data.center_crop: an lfw.py run scored 61 % on a .bin of the photos
    it scores 77 % on from the folder."""
    from facenet_jax import data

    folder = data.load_image_folder(photos_two_ways / "folder", 16, center_crop=0.5,
                                    cache_dir=photos_two_ways / "cache")
    pairs = data.read_pairs(photos_two_ways / "pairs.txt", folder)
    vset = verification_sets.read_bin(photos_two_ways / "sets" / "lfw.bin", 16, center_crop=0.5)
    rows = np.stack([pairs.first, pairs.second], axis=1).ravel()
    np.testing.assert_array_equal(vset.images, np.asarray(folder.images)[rows])
    assert vset.center_crop == 0.5 and vset.source_size == 40
    uncropped = verification_sets.read_bin(photos_two_ways / "sets" / "lfw.bin", 16)
    assert not np.array_equal(uncropped.images, vset.images)


def test_bin_scores_as_the_folder_with_its_pairs_and_records_alignment(photos_two_ways,
                                                                       pixel_run, caplog):
    from facenet_jax.eval import evaluate

    workdir, _, _ = pixel_run
    folder_result = evaluate.evaluate_workdir(
        workdir, data_root=str(photos_two_ways / "folder"),
        pairs_file=str(photos_two_ways / "pairs.txt"), output=workdir / "eval_folder.json")
    with caplog.at_level(logging.WARNING):
        results = verification_sets.evaluate_workdir_sets(workdir, photos_two_ways / "sets")
    for name in ("lfw", "home"):
        result = results[name]
        for key in ("accuracy", "accuracy_std", "threshold", "val@far=1e-3", "val@far=1e-2",
                    "far@far=1e-3", "auc", "eer", "num_pairs", "val@far=1e-3_resolved",
                    "val@far=1e-2_resolved"):
            assert result[key] == folder_result[key], (name, key)
        assert result["center_crop"] == 0.5
    # The run keeps the centre of raw photos: the known set's landmark crops do not match it,
    # the home-made set's crops are unknown; both said in the JSON and the log.
    lfw, home = results["lfw"], results["home"]
    assert lfw["alignment"] == "landmarks, 112 px" and home["alignment"] == "unknown"
    assert "holds 'landmarks'-aligned crops" in lfw["alignment_mismatch"]
    assert "raw, unaligned photos" in lfw["alignment_mismatch"]
    assert "records no alignment" in home["alignment_mismatch"]
    assert lfw["alignment_mismatch"] in caplog.text and home["alignment_mismatch"] in caplog.text
    saved = json.loads((workdir / verification_sets.OUTPUT_FILE).read_text())
    assert saved["lfw"]["alignment_mismatch"] == lfw["alignment_mismatch"]
    # 36 training different pairs per fold: FAR 1e-3 is not resolved, and the table says so.
    assert saved["lfw"]["val@far=1e-3_resolved"] is False
    table = (workdir / "eval_verification_sets.md").read_text()
    assert f"| {100 * lfw['val@far=1e-3']:.2f}* |" in table and "\\* unresolved" in table


def test_a_landmark_run_on_a_known_set_is_not_warned(pixel_run):
    import ml_collections

    data_config = ml_collections.ConfigDict({"alignment": "landmarks", "center_crop": None,
                                             "source": "folder", "root": None})
    assert verification_sets.alignment_facts("cfp_fp", data_config) == {
        "alignment": "landmarks, 112 px", "alignment_mismatch": None}
    data_config.alignment = "box"
    assert "expects 'box' crops" in verification_sets.alignment_facts(
        "cfp_fp", data_config)["alignment_mismatch"]


def test_sets_output_is_refused_when_it_holds_another_folder(photos_two_ways, pixel_run,
                                                              tmp_path):
    """eval_verification_sets.json was overwritten by an evaluation of another folder, and
    --output was refused for this mode."""
    import shutil
    import types

    from facenet_jax.eval import evaluators

    workdir, _, loads = pixel_run
    verification_sets.evaluate_workdir_sets(workdir, photos_two_ways / "sets", names="lfw")
    before = (workdir / verification_sets.OUTPUT_FILE).read_text()
    other = tmp_path / "other_sets"
    other.mkdir()
    shutil.copy(photos_two_ways / "sets" / "lfw.bin", other / "lfw.bin")
    loads.clear()
    with pytest.raises(FileExistsError, match=r"holds the sets lfw \(.*two_ways.*\).*--output"):
        verification_sets.evaluate_workdir_sets(workdir, other, names="lfw")
    assert loads == [] and (workdir / verification_sets.OUTPUT_FILE).read_text() == before
    # The same sets again: re-scored in place. Other names of the same folder: refused.
    verification_sets.evaluate_workdir_sets(workdir, photos_two_ways / "sets", names="lfw")
    with pytest.raises(FileExistsError):
        verification_sets.evaluate_workdir_sets(workdir, photos_two_ways / "sets")
    # Through the CLI's path, --output is taken (alone) and refused beside a second benchmark.
    flags = types.SimpleNamespace(
        workdir=str(workdir), verification_sets=str(other), names="lfw", ijb=None,
        output=str(workdir / "eval_other.json"), data_root=None, pairs=None, baseline=None,
        fold=None, threshold=None, flip=False, run_config=None)
    for _, evaluator in evaluators.select_from_flags(flags):
        evaluator.run_flags(flags)
    assert list(json.loads((workdir / "eval_other.json").read_text())) == ["lfw"]
    assert (workdir / "eval_other.md").exists()
    assert (workdir / verification_sets.OUTPUT_FILE).read_text() == before
    flags.ijb = str(tmp_path)
    with pytest.raises(ValueError, match="--output names one file"):
        evaluators.select_from_flags(flags)


def test_training_sets_take_the_runs_crop_and_log_a_mismatch(py2_bin, caplog):
    """The sets logged during training are preprocessed as the run's files too."""
    import ml_collections

    path, _, _ = py2_bin
    eval_config = ml_collections.ConfigDict({"verification_sets": str(path.parent),
                                             "verification_set_names": "lfw"})
    data_config = ml_collections.ConfigDict({"alignment": None, "center_crop": 0.5,
                                             "source": "synthetic", "root": None})
    with caplog.at_level(logging.WARNING):
        (vset,) = verification_sets.configured_sets(eval_config, 32, data_config)
    np.testing.assert_array_equal(vset.images, verification_sets.read_bin(path, 32, 0.5).images)
    assert "lfw.bin holds 'landmarks'-aligned crops" in caplog.text


def test_a_raw_photo_run_on_a_box_aligned_folder_is_warned(photos_two_ways, pixel_run,
                                                            tmp_path):
    """An lfw.py run (no data.alignment) on box-aligned crops cut its 0.5 centre crop a second
    time without a word: the warning fired only for runs that set data.alignment."""
    import shutil

    from facenet_jax.eval import evaluate
    from facenet_jax.data.alignment import ALIGNMENT_RECORD

    workdir, _, _ = pixel_run
    aligned = tmp_path / "aligned"
    shutil.copytree(photos_two_ways / "folder", aligned)
    (aligned / ALIGNMENT_RECORD).write_text(json.dumps({"mode": "box", "image_size": 40}))
    with pytest.warns(UserWarning, match="cut from these crops a second time"):
        result = evaluate.evaluate_workdir(
            workdir, data_root=str(aligned), pairs_file=str(photos_two_ways / "pairs.txt"),
            output=workdir / "eval_aligned.json")
    saved = json.loads((workdir / "eval_aligned.json").read_text())
    assert saved["alignment_mismatch"] == result["alignment_mismatch"]
    assert "holds 'box'-aligned crops" in saved["alignment_mismatch"]
