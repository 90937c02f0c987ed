"""Identity-disjoint splits and LFW-format pairs: reading, writing, generating."""

import json

import numpy as np
import pytest

from facenet_jax import data


def _toy(counts, paths=None):
    labels = np.repeat(np.arange(len(counts)), counts)
    return data.Dataset(images=np.zeros((len(labels), 4, 4, 3), np.uint8), labels=labels,
                        identity_names=[f"Person_{i}" for i in range(len(counts))],
                        paths=paths)


def _lfw_like():
    counts = [3, 1, 2, 4]
    paths = [f"/lfw/Person_{i}/Person_{i}_{j + 1:04d}.jpg"
             for i, c in enumerate(counts) for j in range(c)]
    return _toy(counts, paths)


# ---------------------------------------------------------------- splits

def test_fraction_split_is_identity_disjoint_complete_and_deterministic():
    ds = _toy([3] * 50)
    splits = data.split_identities(ds, fractions=(0.7, 0.2, 0.1), seed=4)
    names = {k: set(v.identity_names) for k, v in splits.items()}
    assert [len(names[k]) for k in ("train", "validation", "test")] == [35, 10, 5]
    assert not (names["train"] & names["validation"] or names["train"] & names["test"]
                or names["validation"] & names["test"])
    assert set().union(*names.values()) == set(ds.identity_names)
    again = data.split_identities(ds, fractions=(0.7, 0.2, 0.1), seed=4)
    assert all(again[k].identity_names == splits[k].identity_names for k in splits)
    other = data.split_identities(ds, fractions=(0.7, 0.2, 0.1), seed=5)
    assert other["test"].identity_names != splits["test"].identity_names
    # labels are re-indexed within each split, images follow their identity
    for split in splits.values():
        assert split.labels.max() == split.num_identities - 1
        assert np.all(split.counts() == 3)


def test_split_record_accepts_the_same_split_and_names_a_leak(tmp_path):
    """One more identity in the folder reshuffles a fraction split: the record catches the
    trained identities that the recomputed split would now hold out."""
    record = tmp_path / "split.json"
    splits = data.split_identities(_toy([3] * 100), fractions=(0.8, 0.1, 0.1), seed=0)
    data.check_split_record(record, splits)  # no record (pretrained's folders): nothing to check
    data.write_split_record(record, splits)
    assert sorted(json.loads(record.read_text())) == ["image_counts", "test", "train",
                                                      "validation"]
    data.check_split_record(record, data.split_identities(_toy([3] * 100),
                                                          fractions=(0.8, 0.1, 0.1), seed=0))
    grown = data.split_identities(_toy([3] * 101), fractions=(0.8, 0.1, 0.1), seed=0)
    trained = set(splits["train"].identity_names)
    leaked = trained & set(grown["test"].identity_names + grown["validation"].identity_names)
    assert leaked  # the hazard is real for this data
    with pytest.raises(ValueError, match=rf"differs from the one recorded in .*split\.json "
                       rf"\(train: .*; {len(leaked)} trained identities now held out, e\.g\. "
                       rf".*new --workdir"):
        data.check_split_record(record, grown)
    # Another seed with the same people is a different split too.
    with pytest.raises(ValueError, match="differs from the one recorded"):
        data.check_split_record(record, data.split_identities(
            _toy([3] * 100), fractions=(0.8, 0.1, 0.1), seed=1))


def test_identity_files_and_exclusion_by_pairs_file(tmp_path):
    ds = _toy([2] * 6)
    (tmp_path / "train.txt").write_text("Person_0\nPerson_1\nPerson_2\n# a comment\n")
    (tmp_path / "validation.txt").write_text("Person_3\n")
    (tmp_path / "test.txt").write_text("Person_4\n")
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("1\t1\nPerson_1\t1\t2\nPerson_2\t1\tPerson_4\t2\n")
    splits = data.split_identities(ds, identity_files=tmp_path, exclude_pairs_file=pairs_file)
    assert splits["train"].identity_names == ["Person_0"]
    assert splits["validation"].identity_names == ["Person_3"]
    assert sorted(splits["test"].identity_names) == ["Person_1", "Person_2", "Person_4"]
    # Person_5 is in no list: left out everywhere

    (tmp_path / "test.txt").write_text("Person_0\n")
    with pytest.raises(ValueError, match="also listed in train.txt"):
        data.split_identities(ds, identity_files=tmp_path)
    (tmp_path / "test.txt").write_text("Nobody\n")
    with pytest.raises(ValueError, match="Nobody"):
        data.split_identities(ds, identity_files=tmp_path)


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5)])
def test_bad_fractions_are_clear_errors(fractions):
    with pytest.raises(ValueError, match="fractions"):
        data.split_identities(_toy([2] * 4), fractions=fractions)


# ---------------------------------------------------------------- reading and writing

def test_read_lfw_format_resolves_by_stem_and_assigns_folds_in_file_order(tmp_path):
    ds = _lfw_like()
    path = tmp_path / "pairs.txt"
    path.write_text("2\t1\nPerson_0\t1\t3\nPerson_0\t2\tPerson_3\t4\n"
                    "Person_3\t2\t4\n\nPerson_2\t2\tPerson_1\t1\n")
    pairs = data.read_pairs(path, ds)
    np.testing.assert_array_equal(pairs.first, [0, 1, 7, 5])
    np.testing.assert_array_equal(pairs.second, [2, 9, 9, 3])
    np.testing.assert_array_equal(pairs.is_same, [True, False, True, False])
    np.testing.assert_array_equal(pairs.fold, [0, 0, 1, 1])


def test_read_single_number_header_and_orl_style_numbers(tmp_path):
    paths = [f"/orl/s{i}/{j}.pgm" for i in (1, 2) for j in (1, 2, 10)]
    ds = data.Dataset(np.zeros((6, 4, 4, 3), np.uint8), np.repeat([0, 1], 3), ["s1", "s2"],
                      paths)
    path = tmp_path / "pairs.txt"
    path.write_text("1\ns1\t10\t2\ns1\t1\ts2\t10\n")
    pairs = data.read_pairs(path, ds)
    np.testing.assert_array_equal(pairs.first, [2, 0])
    np.testing.assert_array_equal(pairs.second, [1, 5])


def test_missing_images_are_all_listed(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("1\t2\nPerson_0\t1\t9\nPerson_5\t1\t2\n"
                    "Person_0\t1\tPerson_3\t1\nPerson_1\t1\tPerson_2\t1\n")
    with pytest.raises(FileNotFoundError) as error:
        data.read_pairs(path, _lfw_like())
    message = str(error.value)
    assert "3 paired images" in message
    for missing in ("Person_0/Person_0_0009", "Person_5/Person_5_0001", "Person_5_0002"):
        assert missing in message


@pytest.mark.parametrize("text, match", [
    ("", "empty file"),
    ("ten 3\n", ":1: header"),
    ("1\t1\nPerson_0\t1\t2\nPerson_0\n", ":3: expected 3 fields"),
    ("1\t1\nPerson_0\t1\tx\nPerson_0\t1\tPerson_3\t1\n", ":2: image number 'x'"),
    ("2\t1\nPerson_0\t1\t2\nPerson_0\t1\tPerson_3\t1\n", "promises 2 folds"),
])
def test_malformed_files_report_the_line(tmp_path, text, match):
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        data.read_pairs(path, _lfw_like())


def _alice_and_bob(alice_files, bob_files=("Bob_0001.jpg", "Bob_0002.jpg")):
    files = [f"Alice/{f}" for f in alice_files] + [f"Bob/{f}" for f in bob_files]
    return data.Dataset(np.zeros((len(files), 4, 4, 3), np.uint8),
                        np.repeat([0, 1], [len(alice_files), len(bob_files)]),
                        ["Alice", "Bob"], [f"/faces/{f}" for f in files])


@pytest.mark.parametrize("alice_files, offending", [
    (["Alice_0001.png", "Alice_0002.png", "Alice_0002_crop.png", "Alice_0003.png"],
     ["Alice_0002_crop.png"]),
    (["Alice_0001.png", "Alice_0002.jpg", "Alice_0002.png", "Alice_0003.png"],
     ["Alice_0002.jpg", "Alice_0002.png"]),
])
def test_partly_numbered_or_repeated_numbers_are_an_error_naming_the_files(
        tmp_path, alice_files, offending):
    ds = _alice_and_bob(alice_files)
    path = tmp_path / "pairs.txt"
    path.write_text("1\nAlice\t1\t3\nAlice\t1\tBob\t2\n")
    with pytest.raises(ValueError, match="identity 'Alice'") as error:
        data.read_pairs(path, ds)  # "Alice 1 3" must never resolve to a file by its position
    message = str(error.value)
    assert f"{len(offending)} of its 4 files" in message and "Rename" in message
    assert all(name in message for name in offending)
    assert "Alice_0001.png" not in message
    pairs = data.Pairs(np.array([0, 0]), np.array([3, 5]), np.array([True, False]),
                       np.array([0, 0]))
    with pytest.raises(ValueError, match="identity 'Alice'"):
        data.write_pairs(tmp_path / "out.txt", pairs, ds)


def test_only_identities_the_pairs_use_must_be_numbered_and_unnumbered_ones_count_by_position(
        tmp_path):
    ds = _alice_and_bob(["Alice_0001.png", "Alice_0002.png", "notes_scan.png"],
                        ["P00A+000E+00.png", "P00A+005E+10.png", "P00A+010E-20.png"])
    path = tmp_path / "pairs.txt"
    path.write_text("1\nBob\t1\t3\nBob\t2\tBob\t3\n")  # is_same by field count only
    pairs = data.read_pairs(path, ds)  # Alice is badly numbered but unused: no error
    np.testing.assert_array_equal(pairs.first, [3, 4])
    np.testing.assert_array_equal(pairs.second, [5, 5])
    path.write_text("1\nAlice\t1\t2\nAlice\t1\tBob\t2\n")
    with pytest.raises(ValueError, match="notes_scan.png"):
        data.read_pairs(path, ds)


def test_write_then_read_round_trips_generated_pairs(tmp_path):
    for ds in (_toy([4] * 30), _lfw_like()):  # positional numbers and LFW stems
        pairs = data.generate_pairs(ds, num_folds=2, pairs_per_fold=3, seed=0)
        data.write_pairs(tmp_path / "p.txt", pairs, ds)
        back = data.read_pairs(tmp_path / "p.txt", ds)
        for field in ("first", "second", "is_same", "fold"):
            np.testing.assert_array_equal(getattr(back, field), getattr(pairs, field))
    bad = data.Pairs(np.array([0]), np.array([1]), np.array([True]), np.array([0]))
    with pytest.raises(ValueError, match="LFW layout"):
        data.write_pairs(tmp_path / "p.txt", bad, _lfw_like())


def test_restricting_to_the_pairs_identities_keeps_every_pair_and_their_people_only():
    """Persons 0..3 with 3, 1, 2, 4 images (rows 0-2, 3, 4-5, 6-9); the pairs name persons 0
    and 2 only, so rows 0-2 and 4-5 stay (5 images) and the pairs point at the same images."""
    ds = _lfw_like()
    ds.images = np.arange(len(ds.labels), dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 4, 4, 3), np.uint8)  # image r is filled with r: where a pair points is readable
    pairs = data.Pairs(first=np.array([5, 0]), second=np.array([4, 1]),
                       is_same=np.array([True, True]), fold=np.array([0, 1]))
    kept, moved = data.restrict_to_pair_identities(ds, pairs)
    assert kept.identity_names == ["Person_0", "Person_2"]
    np.testing.assert_array_equal(kept.images[:, 0, 0, 0], [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(kept.labels, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(moved.first, [4, 0])
    np.testing.assert_array_equal(moved.second, [3, 1])
    np.testing.assert_array_equal(kept.images[moved.first], ds.images[pairs.first])
    np.testing.assert_array_equal(moved.fold, pairs.fold)
    assert kept.paths == [ds.paths[r] for r in (0, 1, 2, 4, 5)]
    none = data.Pairs(*(np.zeros(0, np.int64),) * 2, np.zeros(0, bool), np.zeros(0, np.int64))
    empty, _ = data.restrict_to_pair_identities(ds, none)
    assert len(empty.labels) == 0 and empty.num_identities == 0


# ---------------------------------------------------------------- generating

def _check_valid(pairs, ds):
    same_label = ds.labels[pairs.first] == ds.labels[pairs.second]
    np.testing.assert_array_equal(same_label, pairs.is_same)
    assert np.all(pairs.first != pairs.second)
    keys = {tuple(sorted(p)) for p in zip(pairs.first, pairs.second)}
    assert len(keys) == len(pairs)  # no pair repeats


def test_generated_pairs_are_balanced_disjoint_folds_and_deterministic():
    ds = _toy(np.random.default_rng(0).integers(2, 8, 80))
    pairs = data.generate_pairs(ds, num_folds=10, pairs_per_fold=20, seed=3)
    assert len(pairs) == 400
    _check_valid(pairs, ds)
    for fold in range(10):
        in_fold = pairs.fold == fold
        assert pairs.is_same[in_fold].sum() == 20 and (~pairs.is_same[in_fold]).sum() == 20
        ids = set(ds.labels[pairs.first[in_fold]]) | set(ds.labels[pairs.second[in_fold]])
        others = set(ds.labels[pairs.first[~in_fold]]) | set(ds.labels[pairs.second[~in_fold]])
        assert not ids & others  # identity-disjoint folds
    again = data.generate_pairs(ds, num_folds=10, pairs_per_fold=20, seed=3)
    np.testing.assert_array_equal(again.first, pairs.first)
    np.testing.assert_array_equal(again.second, pairs.second)
    assert not np.array_equal(data.generate_pairs(ds, num_folds=10, pairs_per_fold=20,
                                                  seed=4).first, pairs.first)


def test_few_identities_share_the_pool_and_give_fewer_pairs_per_fold():
    ds = _toy([3, 3, 2])  # 3+3+1 = 7 same pairs, 21 different pairs in total
    pairs = data.generate_pairs(ds, num_folds=3, pairs_per_fold=300, seed=0)
    _check_valid(pairs, ds)
    assert len(pairs) == 3 * 2 * 2  # 7 // 3 = 2 same (and 2 different) per fold


@pytest.mark.parametrize("counts, num_folds, expected", [
    # 7 same pairs for 10 folds: the shared pool gave 7 // 10 = 0 pairs per fold
    ([3, 3, 2], 10, ["3 identities and 8 images", "7 same-identity and 21 different",
                     "lower data.pairs.num_folds to 7 or less"]),
    ([10, 1], 12, ["10 different-identity pairs", "num_folds to 10 or less"]),
    # the synthetic test split of 4 identities × 2 images (40 × 2 in all, 10 % held out)
    ([2] * 4, 10, ["4 identities and 8 images", "4 same-identity", "num_folds to 4 or less"]),
])
def test_a_fold_without_a_same_or_different_pair_is_an_error(counts, num_folds, expected):
    with pytest.raises(ValueError, match="each of the") as error:
        data.generate_pairs(_toy(counts), num_folds=num_folds, pairs_per_fold=20, seed=0)
    message = str(error.value)
    assert all(text in message for text in expected), message
    assert all(key in message for key in ("data.split.", "images_per_identity"))


def test_identities_without_images_never_leave_a_fold_without_pairs():
    # Dealing 2 + 2 identities into 2 folds often puts each with-images identity beside an
    # empty one: a fold with no different pair (identity-disjoint folds are not possible).
    ds = _toy([3, 3, 0, 0])
    for seed in range(6):
        pairs = data.generate_pairs(ds, num_folds=2, pairs_per_fold=5, seed=seed)
        _check_valid(pairs, ds)
        for fold in range(2):
            assert pairs.is_same[pairs.fold == fold].sum() == 3
            assert (~pairs.is_same[pairs.fold == fold]).sum() == 3


def test_large_identities_use_rejection_sampling_without_repeats():
    ds = _toy([700, 700, 5])  # ~490k candidate same pairs: above the enumeration limit
    pairs = data.generate_pairs(ds, num_folds=2, pairs_per_fold=500, seed=0)
    assert len(pairs) == 2000
    _check_valid(pairs, ds)


def test_generate_pairs_rejects_unusable_datasets():
    with pytest.raises(ValueError, match="give only 10 same-identity and 0 different"):
        data.generate_pairs(_toy([5]), seed=0)
    with pytest.raises(ValueError, match="give only 0 same-identity and 3 different"):
        data.generate_pairs(_toy([1, 1, 1]), seed=0)
    with pytest.raises(ValueError, match="0 different"):  # an identity without images
        data.generate_pairs(_toy([3, 0]), num_folds=1, seed=0)


# ---------------------------------------------------------------- audit fixes (issue 15)

def test_write_pairs_refuses_identity_names_with_whitespace(tmp_path):
    ds = _toy([2] * 4)
    ds.identity_names[1] = "Jean Paul"  # would be written as 4 fields: a "different" pair
    pairs = data.Pairs(np.array([2, 0]), np.array([3, 4]), np.array([True, False]),
                       np.array([0, 0]))
    with pytest.raises(ValueError, match=r"\['Jean Paul'\] contain whitespace.*rename"):
        data.write_pairs(tmp_path / "p.txt", pairs, ds)
    assert not (tmp_path / "p.txt").exists()
    ds.identity_names[1] = "Jean_Paul"  # the fix the message proposes round-trips
    data.write_pairs(tmp_path / "p.txt", pairs, ds)
    back = data.read_pairs(tmp_path / "p.txt", ds)
    np.testing.assert_array_equal(back.first, pairs.first)
    np.testing.assert_array_equal(back.is_same, pairs.is_same)


def test_pairs_file_people_leave_validation_as_well_as_training(tmp_path):
    ds = _toy([2] * 6)
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.txt").write_text(
            {"train": "Person_0\nPerson_1\n", "validation": "Person_2\nPerson_3\n",
             "test": "Person_4\n"}[split])
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("1\t1\nPerson_1\t1\t2\nPerson_3\t1\tPerson_4\t2\n")
    splits = data.split_identities(ds, identity_files=tmp_path, exclude_pairs_file=pairs_file)
    assert splits["train"].identity_names == ["Person_0"]
    assert splits["validation"].identity_names == ["Person_2"]
    assert sorted(splits["test"].identity_names) == ["Person_1", "Person_3", "Person_4"]


@pytest.mark.parametrize("bad_line, problem", [
    ("Jean Paul\t1\t2", r":3: image number 'Paul'"),  # a spaced name: 4 fields, misparsed
    ("Person_1\t1", r":3: expected 3 fields .* got 2"),
    ("Person_1\t1\t2\tPerson_2\t3", r":3: expected 3 fields .* got 5"),
])
def test_exclude_pairs_file_parses_as_read_pairs_does_and_names_the_bad_line(
        tmp_path, bad_line, problem):
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text(f"1\t2\nPerson_1\t1\t2\n{bad_line}\nPerson_2\t1\tPerson_4\t2\n"
                          "Person_3\t1\tPerson_5\t1\n")
    with pytest.raises(ValueError, match=problem):
        data.split_identities(_toy([2] * 6), exclude_pairs_file=pairs_file)
    with pytest.raises(ValueError, match=problem):  # the same parser, the same message
        data.read_pairs(pairs_file, _toy([2] * 6))
    # Before: the bad line was skipped (or split wrongly) and its identities stayed in train.
    pairs_file.write_text("1\t2\nPerson_1\t1\t2\nPerson_0\t1\t2\n\n"
                          "Person_2\t1\tPerson_4\t2\nPerson_3\t1\tPerson_5\t1\n")
    assert data.splits.pair_file_identities(pairs_file) == {f"Person_{i}" for i in range(6)}
