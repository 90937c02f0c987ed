"""Tests for facenet_jax.metrics: hand-worked cases, brute-force references, sklearn, edge cases."""

import itertools
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from facenet_jax.eval import metrics

BELOW = -np.inf  # np.nextafter(x, BELOW): the largest float below x


# ----------------------------------------------------------------------------------------------
# Independent references (plain loops, direct counting).


def brute_best_threshold(d, same):
    """Smallest threshold maximising accuracy, trying every distinct value and one below all,
    each by direct counting (O(M²))."""
    candidates = [-np.inf] + sorted(set(d.tolist()))  # -inf: accept nothing
    accuracies = [np.mean((d <= t) == same) for t in candidates]
    return candidates[int(np.argmax(accuracies))], max(accuracies)


def brute_largest_threshold_within_far(d, same, target):
    """Largest of {every distinct value, the float just below each} with FAR ≤ target."""
    values = sorted(set(d.tolist()))
    candidates = values + [np.nextafter(v, BELOW) for v in values]
    feasible = [t for t in candidates if np.mean(d[~same] <= t) <= target]
    return max(feasible)


def brute_roc(d, same):
    thresholds = [np.nextafter(d.min(), BELOW)] + sorted(set(d.tolist()))
    far = np.array([np.mean(d[~same] <= t) for t in thresholds])
    tar = np.array([np.mean(d[same] <= t) for t in thresholds])
    return far, tar, np.array(thresholds)


def brute_eer(d, same):
    """Walks every ROC segment and returns the first point where FAR = FRR on it."""
    far, tar, thresholds = brute_roc(d, same)
    frr = 1 - tar
    for i in range(len(far)):
        if far[i] == frr[i]:
            return far[i], thresholds[i]
        if i and far[i - 1] < frr[i - 1] and far[i] > frr[i]:
            # solve far0 + w (far1 - far0) = frr0 + w (frr1 - frr0) for w
            w = (frr[i - 1] - far[i - 1]) / ((far[i] - far[i - 1]) - (frr[i] - frr[i - 1]))
            return (far[i - 1] + w * (far[i] - far[i - 1]),
                    thresholds[i - 1] + w * (thresholds[i] - thresholds[i - 1]))
    raise AssertionError("no crossing")


def full_distance_matrix(emb, distance):
    """N×N by explicit differences / normalised dots (a different formula from the module's)."""
    if distance == "cosine":
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        return 1 - unit @ unit.T
    squared = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)
    return np.sqrt(squared) if distance == "euclidean" else squared


def brute_retrieval(emb, labels, distance, ks):
    d = full_distance_matrix(emb, distance)
    hits = {k: [] for k in ks}
    r_precisions, average_precisions = [], []
    for i in range(len(labels)):
        r = int(np.sum(labels == labels[i])) - 1
        if r == 0:
            continue
        ranked = sorted((j for j in range(len(labels)) if j != i), key=lambda j: (d[i, j], j))
        relevant = [labels[j] == labels[i] for j in ranked]
        for k in ks:
            hits[k].append(any(relevant[:k]))
        r_precisions.append(sum(relevant[:r]) / r)
        average_precisions.append(
            sum(sum(relevant[:n + 1]) / (n + 1) for n in range(r) if relevant[n]) / r)
    result = {f"recall@{k}": np.mean(hits[k]) for k in ks}
    result.update({"r_precision": np.mean(r_precisions), "map@r": np.mean(average_precisions)})
    return result


def brute_oneshot(emb, labels, distance, seed, ks):
    d = full_distance_matrix(emb, distance)
    gallery = metrics.enrolment_indices(labels, seed)
    hits = {k: [] for k in ks}
    for p in range(len(labels)):
        if p in gallery:
            continue
        ranked = sorted(gallery, key=lambda g: (d[p, g], labels[g]))
        position = [labels[g] for g in ranked].index(labels[p])
        for k in ks:
            hits[k].append(position < k)
    return {f"oneshot_top{k}": np.mean(hits[k]) for k in ks}


def random_pairs(seed, num_pairs=240, num_folds=6, levels=12):
    """Integer-valued distances (many ties), same pairs shifted lower, equal-size folds."""
    rng = np.random.default_rng(seed)
    same = rng.random(num_pairs) < 0.5
    d = rng.integers(0, levels, num_pairs) - 3 * same
    return d.astype(float) / levels + 1.0, same, np.repeat(np.arange(num_folds),
                                                           num_pairs // num_folds)


def tied_embeddings(seed, n=61, dim=3, num_labels=14):
    """Small-integer embeddings (exact distances, many ties and duplicates) with singletons."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, n)
    labels[:3] = [100, 101, 102]  # three identities of one image
    return rng.integers(-2, 3, (n, dim)).astype(np.float32), labels


# ----------------------------------------------------------------------------------------------
# Verification.

# Two folds. Fold 0: same 0.1, 0.3; different 0.4, 0.5. Fold 1: same 0.2, 0.7; different 0.35,
# 0.6.
HAND_D = np.array([0.1, 0.4, 0.3, 0.5, 0.2, 0.6, 0.35, 0.7])
HAND_SAME = np.array([1, 0, 1, 0, 1, 0, 0, 1], bool)
HAND_FOLDS = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_verification_hand_case():
    # Held fold 0, trained on fold 1 (0.2S 0.35D 0.6D 0.7S): correct pairs at t = below-all 2,
    # 0.2 → 3, 0.35 → 2, 0.6 → 1, 0.7 → 2: t = 0.2. Fold 0 at 0.2: 0.1S yes, 0.4D no, 0.3S no
    # (wrong), 0.5D no → 3/4.
    # Held fold 1, trained on fold 0 (0.1S 0.3S 0.4D 0.5D): t = 0.3 → 4/4. Fold 1 at 0.3: 0.2S
    # yes, 0.6D no, 0.35D no, 0.7S no (wrong) → 3/4.
    result = metrics.verification_kfold(HAND_D, HAND_SAME, HAND_FOLDS)
    assert result["fold_thresholds"] == [0.2, 0.3]
    assert result["fold_accuracies"] == [0.75, 0.75]
    assert result["accuracy"] == 0.75 and result["accuracy_std"] == 0.0
    assert result["threshold"] == pytest.approx(0.25)
    assert result["num_folds"] == 2


def test_verification_tie_rule_smallest_threshold_and_inclusive_boundary():
    # Training fold 1: 0.1S 0.2D 0.3S 0.4D: correct at below-all 2, 0.1 → 3, 0.2 → 2, 0.3 → 3,
    # 0.4 → 2: the maximisers are 0.1 and 0.3; the smallest, 0.1, is chosen. Held fold 0 has a
    # same pair at exactly 0.1 (accepted: ≤) and one at 0.2 (rejected), a different pair at 0.3.
    d = np.array([0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.4])
    same = np.array([1, 1, 0, 1, 0, 1, 0], bool)
    folds = np.array([0, 0, 0, 1, 1, 1, 1])
    result = metrics.verification_kfold(d, same, folds)
    assert result["fold_thresholds"][0] == 0.1
    assert result["fold_accuracies"][0] == pytest.approx(2 / 3)


def test_verification_accept_nothing_rejects_held_pairs_closer_than_every_training_pair():
    # Training fold 1 has only different pairs: the best is to accept nothing. The held same
    # pair at 0.1 is closer than every training pair (0.2, 0.3); a threshold just below 0.2
    # would still accept it, "accept nothing" (-inf) rejects it: held accuracy 1/2, not 1.
    d = np.array([0.1, 0.5, 0.2, 0.3])
    same = np.array([1, 0, 0, 0], bool)
    folds = np.array([0, 0, 1, 1])
    result = metrics.verification_kfold(d, same, folds)
    assert result["fold_thresholds"][0] == -np.inf
    assert result["fold_accuracies"][0] == 0.5
    # The ROC sweep keeps its finite first point (FAR = TAR = 0 just below every distance).
    _, _, thresholds = metrics.roc_curve(d, same)
    assert thresholds[0] == np.nextafter(0.1, BELOW)


@pytest.mark.parametrize("seed", range(4))
def test_verification_matches_brute_force_with_ties(seed):
    d, same, folds = random_pairs(seed)
    result = metrics.verification_kfold(d, same, folds)
    for fold in range(folds.max() + 1):
        held = folds == fold
        threshold, _ = brute_best_threshold(d[~held], same[~held])
        assert result["fold_thresholds"][fold] == threshold
        assert result["fold_accuracies"][fold] == np.mean((d[held] <= threshold) == same[held])
    assert result["accuracy"] == pytest.approx(np.mean(result["fold_accuracies"]))
    assert result["accuracy_std"] == pytest.approx(np.std(result["fold_accuracies"], ddof=0))


def test_verification_squared_and_euclidean_agree():
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(80, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.repeat(np.arange(20), 4)
    first, second = rng.integers(0, 80, (2, 300))
    same, folds = labels[first] == labels[second], np.arange(300) % 10
    squared = metrics.verification_kfold(
        metrics.pair_distances(emb, first, second, "squared"), same, folds)
    euclidean = metrics.verification_kfold(
        metrics.pair_distances(emb, first, second, "euclidean"), same, folds)
    assert euclidean["fold_accuracies"] == squared["fold_accuracies"]
    np.testing.assert_allclose(euclidean["fold_thresholds"],
                               np.sqrt(squared["fold_thresholds"]), rtol=1e-12)


def test_verification_fold_of_only_same_pairs():
    d, same, folds = random_pairs(1, num_pairs=60, num_folds=3)
    same[folds == 2] = True
    result = metrics.verification_kfold(d, same, folds)
    threshold, _ = brute_best_threshold(d[folds != 2], same[folds != 2])
    assert result["fold_accuracies"][2] == np.mean(d[folds == 2] <= threshold)


# ----------------------------------------------------------------------------------------------
# VAL@FAR.

# Fold A: same 0.2, 0.3, 0.4; different 0.1, 0.8, 0.9 (its smallest different-pair distance is
# below every same-pair distance). Fold B: same 0.05, 0.1, 0.5; different 0.7, 0.95, 0.99.
FAR_D = np.array([0.2, 0.3, 0.4, 0.1, 0.8, 0.9, 0.05, 0.1, 0.5, 0.7, 0.95, 0.99])
FAR_SAME = np.array([1, 1, 1, 0, 0, 0] * 2, bool)
FAR_FOLDS = np.repeat([0, 1], 6)


def test_val_at_unreachable_far_uses_threshold_just_below_smallest_different_distance():
    # FAR 1e-3 with 3 training different pairs means accepting none of them.
    # Held A, trained on B: t = below 0.7; A's same 0.2, 0.3, 0.4 all accepted → VAL 1; A's
    # different 0.1 accepted → FAR 1/3.
    # Held B, trained on A: t = below 0.1 (A's smallest different, below all of A's same pairs);
    # B's same 0.05 accepted, 0.1 and 0.5 not → VAL 1/3 (threshold 0 would give 0); FAR 0.
    result = metrics.val_at_far(FAR_D, FAR_SAME, FAR_FOLDS, 1e-3)
    assert result["fold_thresholds"] == [np.nextafter(0.7, BELOW), np.nextafter(0.1, BELOW)]
    assert result["fold_vals"] == [1.0, pytest.approx(1 / 3)]
    assert result["fold_fars"] == [pytest.approx(1 / 3), 0.0]
    assert result["val"] == pytest.approx(2 / 3) and result["val_std"] == pytest.approx(1 / 3)
    assert result["far"] == pytest.approx(1 / 6) and result["far_std"] == pytest.approx(1 / 6)


def test_val_at_far_reachable_target():
    # Target 0.5: one of three training different pairs may be accepted (1/3 ≤ 0.5 < 2/3).
    # Held A, trained on B: t = below 0.95: A's same all in → VAL 1; A's 0.1, 0.8, 0.9 → FAR 1.
    # Held B, trained on A: t = below 0.8: B's same all in → VAL 1; B's 0.7 → FAR 1/3.
    result = metrics.val_at_far(FAR_D, FAR_SAME, FAR_FOLDS, 0.5)
    assert result["fold_thresholds"] == [np.nextafter(0.95, BELOW), np.nextafter(0.8, BELOW)]
    assert result["fold_vals"] == [1.0, 1.0]
    assert result["fold_fars"] == [1.0, pytest.approx(1 / 3)]


@pytest.mark.parametrize("seed,target", list(itertools.product(range(3), (0.0, 1e-3, 0.05, 0.3))))
def test_val_at_far_matches_brute_force_with_ties(seed, target):
    d, same, folds = random_pairs(seed)
    result = metrics.val_at_far(d, same, folds, target)
    for fold in range(folds.max() + 1):
        held = folds == fold
        threshold = brute_largest_threshold_within_far(d[~held], same[~held], target)
        assert result["fold_thresholds"][fold] == threshold
        assert result["fold_vals"][fold] == np.mean(d[held & same] <= threshold)
        assert result["fold_fars"][fold] == np.mean(d[held & ~same] <= threshold)


def test_val_at_far_fold_without_different_pairs_has_no_far():
    d, same, folds = FAR_D.copy(), FAR_SAME.copy(), np.array([0] * 6 + [1] * 3 + [2] * 3)
    # fold 1: B's three same pairs only; fold 2: B's three different pairs only.
    result = metrics.val_at_far(d, same, folds, 1e-3)
    assert np.isnan(result["fold_fars"][1]) and np.isnan(result["fold_vals"][2])
    assert result["far"] == pytest.approx(np.mean([result["fold_fars"][i] for i in (0, 2)]))
    assert result["val"] == pytest.approx(np.mean(result["fold_vals"][:2]))


# ----------------------------------------------------------------------------------------------
# ROC, AUC, EER.

# d: 0.1S 0.2D 0.3S 0.3D 0.5S. Thresholds below-0.1, 0.1, 0.2, 0.3, 0.5: TAR 0, 1/3, 1/3, 2/3, 1;
# FAR 0, 0, 1/2, 1, 1.
ROC_D = np.array([0.1, 0.2, 0.3, 0.3, 0.5])
ROC_SAME = np.array([1, 0, 1, 0, 1], bool)


def test_roc_hand_case():
    far, tar, thresholds = metrics.roc_curve(ROC_D, ROC_SAME)
    np.testing.assert_array_equal(thresholds, [np.nextafter(0.1, BELOW), 0.1, 0.2, 0.3, 0.5])
    np.testing.assert_allclose(tar, [0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(far, [0, 0, 0.5, 1, 1])
    # Trapezoids: 0.5·1/3 + 0.5·(1/3 + 2/3)/2 = 5/12; Mann–Whitney: same 0.1 beats both
    # different pairs, same 0.3 ties one (1/2): 2.5 of 6 pairs.
    assert metrics.roc_auc(ROC_D, ROC_SAME) == pytest.approx(5 / 12)


def test_eer_hand_cases():
    # FRR = 1 − TAR: 1, 2/3, 2/3, 1/3, 0; FAR − FRR goes −1/6 → 2/3 between 0.2 and 0.3:
    # w = (1/6)/(5/6) = 1/5, EER = 0.5 + 0.5/5 = 0.6, threshold 0.2 + 0.1/5 = 0.22.
    eer, threshold = metrics.equal_error_rate(ROC_D, ROC_SAME)
    assert eer == pytest.approx(0.6) and threshold == pytest.approx(0.22)
    # 0.1S 0.2D 0.3S 0.4D: at 0.2, FAR = FRR = 1/2 exactly.
    assert metrics.equal_error_rate([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0]) == (0.5, 0.2)


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_eer_match_references_with_ties(seed):
    d, same, _ = random_pairs(seed)
    far, tar, thresholds = metrics.roc_curve(d, same)
    for got, want in zip((far, tar, thresholds), brute_roc(d, same)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert metrics.roc_auc(d, same) == pytest.approx(roc_auc_score(same, -d), abs=1e-12)
    np.testing.assert_allclose(metrics.equal_error_rate(d, same), brute_eer(d, same),
                               atol=1e-12)


def test_perfect_separation():
    d, same = np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0], bool)
    assert metrics.roc_auc(d, same) == 1.0
    assert metrics.equal_error_rate(d, same) == (0.0, 0.2)
    # Held fold 0 (0.1S 0.8D), trained on 0.2S 0.9D: t = 0.2 → both right. Held fold 1 (0.2S
    # 0.9D), trained on 0.1S 0.8D: every t in [0.1, 0.8) is perfect there; the documented rule
    # takes the smallest, 0.1, which rejects the held 0.2S → 1/2.
    result = metrics.verification_kfold(d, same, [0, 1, 0, 1])
    assert result["fold_thresholds"] == [0.2, 0.1] and result["fold_accuracies"] == [1.0, 0.5]


# ----------------------------------------------------------------------------------------------
# Distances.


def test_pair_distances_hand_values():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    first, second = [0, 2, 0, 3, 0], [1, 2, 4, 1, 0]
    np.testing.assert_allclose(metrics.pair_distances(emb, first, second, "squared"),
                               [2, 0, 4, 1, 0])
    np.testing.assert_allclose(metrics.pair_distances(emb, first, second, "euclidean"),
                               [np.sqrt(2), 0, 2, 1, 0])
    # cosine: orthogonal 1, identical 0, opposite 2, zero vector 1 (as in losses.distances).
    np.testing.assert_allclose(metrics.pair_distances(emb, first, second, "cosine"),
                               [1, 0, 2, 1, 0], atol=1e-15)


# ----------------------------------------------------------------------------------------------
# Retrieval and one-shot identification.

# 1-D points: 0:A@0, 1:A@1, 2:B@2, 3:A@4, 4:C@10 (B and C have one image: no query).
HAND_EMB = np.array([[0.0], [1.0], [2.0], [4.0], [10.0]])
HAND_LABELS = np.array([0, 0, 1, 0, 2])


def test_retrieval_hand_case():
    # Squared distances. Query 0: 1(1,A) 2(4) 3(16,A) 4 → relevant 1 0 1 0, R = 2:
    #   R-precision 1/2, MAP@R (1/2)(1/1) = 1/2.
    # Query 1: 0(1,A) and 2(1) tie → index order 0 then 2; 3(9,A) → 1 0 1 0: 1/2, 1/2.
    # Query 3: 2(4) 1(9,A) 0(16,A) 4 → 0 1 1 0: recall@1 0, R-precision 1/2, MAP@R (1/2)(1/2).
    result = metrics.retrieval_metrics(HAND_EMB, HAND_LABELS, ks=(1, 2, 5), chunk_size=2)
    assert result == {"recall@1": pytest.approx(2 / 3), "recall@2": 1.0, "recall@5": 1.0,
                      "r_precision": 0.5, "map@r": pytest.approx(5 / 12), "num_queries": 3,
                      "num_excluded_queries": 2}


def test_oneshot_hand_case_and_tie_rule():
    # Identity 1: (1,0,0) and (0,1,0); whichever enrols, the probe is at squared distance 2 from
    # it and also from the singleton identity (0,0,1). Identity 3: (5,5,5), (5,5,6): probe at 1.
    emb = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [5, 5, 5], [5, 5, 6]], float)
    # Singleton labelled 0 wins the tie (lower label): identity 1's probe ranks second.
    labels = np.array([1, 1, 0, 3, 3])
    for seed in range(3):
        result = metrics.oneshot_identification(emb, labels, seed=seed, ks=(1, 2))
        assert result == {"oneshot_top1": 0.5, "oneshot_top2": 1.0, "num_probes": 2,
                          "num_gallery": 3}
    # Singleton labelled 2 loses the tie: both probes rank first.
    labels = np.array([1, 1, 2, 3, 3])
    assert metrics.oneshot_identification(emb, labels, ks=(1,))["oneshot_top1"] == 1.0


def test_enrolment_indices():
    labels = np.array([5, 2, 5, 5, 9, 2, 7])
    for seed in range(5):
        gallery = metrics.enrolment_indices(labels, seed)
        np.testing.assert_array_equal(labels[gallery], [2, 5, 7, 9])
        permutation = np.random.default_rng(seed).permutation(len(labels)).tolist()
        for row in gallery:  # the identity's first row in the seeded permutation
            rows = [r for r in permutation if labels[r] == labels[row]]
            assert rows[0] == row
    assert len({tuple(metrics.enrolment_indices(labels, s)) for s in range(20)}) > 1


@pytest.mark.parametrize("distance", ["squared", "euclidean"])
@pytest.mark.parametrize("chunk_size", [7, 61, 1000])
def test_retrieval_and_oneshot_match_brute_force_with_ties(distance, chunk_size):
    emb, labels = tied_embeddings(3)
    got = metrics.retrieval_metrics(emb, labels, distance=distance, chunk_size=chunk_size)
    want = brute_retrieval(emb.astype(float), labels, distance, (1, 5, 10))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["num_excluded_queries"] == np.sum(np.unique(labels, return_counts=True)[1] == 1)
    got = metrics.oneshot_identification(emb, labels, distance=distance, seed=4,
                                         chunk_size=chunk_size)
    assert got == pytest.approx({**brute_oneshot(emb.astype(float), labels, distance, 4, (1, 5)),
                                 "num_probes": len(labels) - len(set(labels)),
                                 "num_gallery": len(set(labels))})


def test_retrieval_and_oneshot_cosine_match_brute_force():
    rng = np.random.default_rng(5)
    emb, labels = rng.normal(size=(50, 6)), rng.integers(0, 9, 50)
    got = metrics.retrieval_metrics(emb, labels, distance="cosine", chunk_size=13)
    for key, value in brute_retrieval(emb, labels, "cosine", (1, 5, 10)).items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    got = metrics.oneshot_identification(emb, labels, distance="cosine", seed=1, chunk_size=13)
    for key, value in brute_oneshot(emb, labels, "cosine", 1, (1, 5)).items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_retrieval_and_oneshot_memory_is_chunked(monkeypatch):
    shapes = []
    original = metrics._distances_between

    def recording(queries, candidates, distance):
        shapes.append((len(queries), len(candidates)))
        return original(queries, candidates, distance)

    monkeypatch.setattr(metrics, "_distances_between", recording)
    emb, labels = tied_embeddings(0)
    metrics.retrieval_metrics(emb, labels, chunk_size=8)
    metrics.oneshot_identification(emb, labels, chunk_size=8)
    # 58 retrieval queries (3 singletons excluded) and 61 − 17 identities = 44 probes, by 8.
    assert max(rows for rows, _ in shapes) == 8 and len(shapes) == 8 + 6


def test_all_identical_embeddings_rank_by_index():
    # Every distance ties, so each query's neighbours come in index order. Labels 0 1 0 1 0 1,
    # R = 2 for every query; relevance of the ranked neighbours, R-precision, MAP@R:
    #   q0: 1 2 3 4 5 → 0 1 0 1 0: 1/2, (1/2)(1/2) = 1/4     q1: 0 2 3 4 5 → 0 0 1 0 1: 0, 0
    #   q2: 0 1 3 4 5 → 1 0 0 1 0: 1/2, 1/2                  q3: 0 1 2 4 5 → 0 1 0 0 1: 1/2, 1/4
    #   q4: 0 1 2 3 5 → 1 0 1 0 0: 1/2, 1/2                  q5: 0 1 2 3 4 → 0 1 0 1 0: 1/2, 1/4
    # recall@1: q2 and q4 → 2/6; R-precision 2.5/6; MAP@R 1.75/6.
    result = metrics.retrieval_metrics(np.zeros((6, 4)), np.arange(6) % 2, ks=(1,),
                                       chunk_size=4)
    assert result["recall@1"] == pytest.approx(1 / 3)
    assert result["r_precision"] == pytest.approx(5 / 12)
    assert result["map@r"] == pytest.approx(7 / 24)


# ----------------------------------------------------------------------------------------------
# evaluate_embeddings.

EVAL_KEYS = {"accuracy", "accuracy_std", "threshold", "val@far=1e-3", "val@far=1e-3_std",
             "far@far=1e-3", "val@far=1e-2", "val@far=1e-2_std", "far@far=1e-2", "auc", "eer",
             "num_pairs", "num_folds", "unbalanced_folds"}
IDENTIFICATION_KEYS = {"recall@1", "recall@5", "recall@10", "r_precision", "map@r",
                       "oneshot_top1", "oneshot_top5"}


def eval_inputs(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(12), 5)
    centres = rng.normal(size=(12, 16))
    emb = centres[labels] + 0.7 * rng.normal(size=(60, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    first, second = rng.integers(0, 60, (2, 200))
    return emb.astype(np.float32), labels, first, second, labels[first] == labels[second], \
        np.arange(200) // 20


def test_evaluate_embeddings_keys_types_and_values():
    emb, labels, first, second, same, folds = eval_inputs()
    result = metrics.evaluate_embeddings(emb, labels, first, second, same, folds,
                                         distance="euclidean")
    assert set(result) == EVAL_KEYS | IDENTIFICATION_KEYS
    json.dumps(result, allow_nan=False)
    # Random pairs: fold 10 happens to draw no same pair.
    assert result.pop("unbalanced_folds") == [k + 1 for k in range(10)
                                              if len(set(same[folds == k])) < 2] == [10]
    for key, value in result.items():
        assert type(value) is (int if key.startswith("num_") else float), key
        if key != "threshold":
            assert key.startswith("num_") or 0.0 <= value <= 1.0, key
    d = metrics.pair_distances(emb, first, second, "euclidean")
    assert result["accuracy"] == metrics.verification_kfold(d, same, folds)["accuracy"]
    assert result["val@far=1e-2"] == metrics.val_at_far(d, same, folds, 1e-2)["val"]
    assert result["auc"] == metrics.roc_auc(d, same)
    assert result["map@r"] == metrics.retrieval_metrics(emb, labels, distance="euclidean")["map@r"]
    assert result["num_pairs"] == 200 and result["num_folds"] == 10
    assert result["accuracy"] > 0.8  # clustered embeddings: a sanity floor, not a reference


def test_evaluate_embeddings_without_identification():
    emb, labels, first, second, same, folds = eval_inputs()
    result = metrics.evaluate_embeddings(emb, labels, first, second, same, folds,
                                         include_identification=False)
    assert set(result) == EVAL_KEYS
    # Every identity with one image: no retrieval query, no probe → the keys are left out.
    result = metrics.evaluate_embeddings(emb, np.arange(60), first, second, same, folds)
    assert set(result) == EVAL_KEYS


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors before any work.


@pytest.mark.parametrize("function", [
    lambda d, s, f: metrics.verification_kfold(d, s, f),
    lambda d, s, f: metrics.val_at_far(d, s, f, 1e-3),
    lambda d, s, f: metrics.roc_auc(d, s),
    lambda d, s, f: metrics.equal_error_rate(d, s),
])
def test_bad_pairs_raise(function):
    d, same, folds = HAND_D.copy(), HAND_SAME, HAND_FOLDS
    d[3] = np.nan
    with pytest.raises(ValueError, match="non-finite.*index 3"):
        function(d, same, folds)
    with pytest.raises(ValueError, match="all 8 pairs are same"):
        function(HAND_D, np.ones(8, bool), folds)
    with pytest.raises(ValueError, match="7 entries but is_same/labels have 8"):
        function(HAND_D[:7], same, folds)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="at least 2 distinct fold"):
        metrics.verification_kfold(HAND_D, HAND_SAME, np.zeros(8, int))
    with pytest.raises(ValueError, match=r"far_target must be in \[0, 1\)"):
        metrics.val_at_far(HAND_D, HAND_SAME, HAND_FOLDS, 1.0)
    with pytest.raises(ValueError, match="boolean"):
        metrics.roc_auc(HAND_D, np.arange(8))
    with pytest.raises(ValueError, match="no different-identity pair"):
        metrics.val_at_far([0.1, 0.2, 0.3], [True, True, False], [0, 1, 2], 1e-3)
    with pytest.raises(ValueError, match="unknown distance"):
        metrics.retrieval_metrics(HAND_EMB, HAND_LABELS, distance="l2")
    with pytest.raises(ValueError, match="ks must be positive"):
        metrics.retrieval_metrics(HAND_EMB, HAND_LABELS, ks=(0,))
    with pytest.raises(ValueError, match="chunk_size"):
        metrics.oneshot_identification(HAND_EMB, HAND_LABELS, chunk_size=0)
    with pytest.raises(ValueError, match="no query"):
        metrics.retrieval_metrics(HAND_EMB, np.arange(5))
    with pytest.raises(ValueError, match="no probe"):
        metrics.oneshot_identification(HAND_EMB, np.arange(5))
    bad = HAND_EMB.copy()
    bad[2] = np.inf
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        metrics.retrieval_metrics(bad, HAND_LABELS)
    with pytest.raises(ValueError, match="indexes rows"):
        metrics.pair_distances(HAND_EMB, [0, 5], [1, 2], "squared")
