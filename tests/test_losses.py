"""facenet_jax.losses against brute-force references, hand-worked cases and degenerate batches.

Shapes are fixed (B = 24, D = 8 for random batches; B = 4, D = 2 for the hand-worked ones) so
each (strategy, distance, soft) combination compiles once.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from tiers import slow_beyond_first
from facenet_jax import losses
from facenet_jax.losses import mining
from triplet_reference import (distance_weighted_probabilities, reference_triplet_loss,
                                     tfa_semihard_loss)

B, D = 24, 8
NUM_IDENTITIES = 6
RANDOM = ("semihard_facenet", "random", "distance_weighted")
KEY = jax.random.key(42)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit Gaussian rows, or ties: a coarse dyadic grid, or duplicated rows (by seed % 3)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_IDENTITIES, B).astype(np.int32)
    kind = seed % 3
    if kind == 0:
        emb = _unit(rng.normal(size=(B, D)))
    elif kind == 1:  # exact float arithmetic: squared distances tie exactly
        emb = rng.integers(-2, 3, size=(B, D)) / 4.0
    else:
        emb = _unit(rng.normal(size=(B // 3, D)))[rng.integers(0, B // 3, B)]
    return emb.astype(np.float32), labels


@functools.cache
def _loss_and_grad(strategy, distance, soft):
    """jit of ((loss, stats), ∂loss/∂emb) with the margin traced: one compile per
    (strategy, distance, soft) serves every margin and every test on these shapes."""
    def loss(e, l, k, margin):
        return losses.triplet_loss(e, l, margin=margin, strategy=strategy, distance=distance,
                                   soft=soft, key=k)
    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return lambda e, l, k, margin: compiled(e, l, k, jnp.float32(margin))  # one dtype: one compile


def _loss_fn(strategy, distance, soft, margin):
    """(emb, labels, key) -> (loss, stats), through the shared compiled `_loss_and_grad`."""
    def loss(e, l, k):
        return _loss_and_grad(strategy, distance, soft)(e, l, k, margin)[0]
    return loss


@functools.cache
def _distances_fn(distance):
    return jax.jit(lambda e: losses.pairwise_distances(e, distance))


@functools.cache
def _chosen_fn(strategy, distance, margin):
    """The JAX miner's chosen negative per pair, with the uniforms `triplet_loss` draws."""
    def chosen(e, l, k):
        d = losses.pairwise_distances(e, distance)
        positive, negative = mining.label_masks(l, 0, e.shape[0])
        uniform = mining.row_uniforms(k, 0, e.shape[0], e.shape[0])
        if strategy == "semihard_facenet":
            return mining.mine_semihard_facenet(d, positive, negative, margin, uniform).column
        if strategy == "random":
            return mining.mine_random(positive, negative, uniform).column
        return mining.mine_distance_weighted(
            d, positive, negative, uniform, distance=distance, embedding_dim=e.shape[1],
            cutoff=0.5, nonzero_loss_cutoff=1.4).column
    return jax.jit(chosen)


def _assert_matches_reference(emb, labels, *, strategy, distance, soft, margin, key=KEY):
    loss, stats = _loss_fn(strategy, distance, soft, margin)(emb, labels, key)
    dist = np.asarray(_distances_fn(distance)(emb))
    chosen = (np.asarray(_chosen_fn(strategy, distance, margin)(emb, labels, key))
              if strategy in RANDOM else None)
    ref_loss, ref_stats = reference_triplet_loss(
        dist, labels, margin=margin, strategy=strategy, soft=soft, chosen_negative=chosen,
        distance=distance, dim=emb.shape[1])
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=2e-6)
    assert set(stats) == set(losses.STATS_KEYS)
    for name, value in ref_stats.items():
        np.testing.assert_allclose(stats[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
    return ref_stats


# --- distances ------------------------------------------------------------------------------

def _numpy_distances(x, y, distance):
    x, y = x.astype(np.float64), y.astype(np.float64)
    diff = x[:, None, :] - y[None, :, :]
    squared = (diff**2).sum(-1)
    if distance == "squared":
        return squared
    if distance == "euclidean":
        return np.sqrt(squared)
    return 1 - (x @ y.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1))


@pytest.mark.parametrize("distance", losses.DISTANCES)
def test_pairwise_distances_match_numpy(distance):
    emb, _ = random_batch(0)
    emb = emb * 1.7  # not unit norm: the formulas must not assume it
    dist = np.asarray(_distances_fn(distance)(emb))
    np.testing.assert_allclose(dist, _numpy_distances(emb, emb, distance), atol=2e-6)
    assert np.all(np.diag(dist) == 0) and np.all(dist >= 0)
    between = losses.pairwise_distances_between(emb[:5], emb, distance)
    np.testing.assert_allclose(between, _numpy_distances(emb[:5], emb, distance), atol=2e-6)


@pytest.mark.parametrize("distance", losses.DISTANCES)
def test_distance_gradients_finite_for_duplicates_collapse_and_zero_rows(distance):
    rng = np.random.default_rng(1)
    base = _unit(rng.normal(size=(B, D))).astype(np.float32)
    cases = {"duplicates": np.repeat(base[:B // 2], 2, axis=0),
             "collapsed": np.repeat(base[:1], B, axis=0),
             "zero rows": np.concatenate([np.zeros((2, D), np.float32), base[2:]])}
    grad = jax.jit(jax.grad(lambda e: jnp.sum(losses.pairwise_distances(e, distance) * (
        1.0 + jnp.arange(B)[:, None]))))  # weights, so the gradient is not trivially 0
    for name, emb in cases.items():
        g = np.asarray(grad(emb))
        assert np.all(np.isfinite(g)), f"{distance} {name}"


def test_unknown_distance_is_an_error():
    with pytest.raises(ValueError, match="squared, euclidean, cosine"):
        losses.pairwise_distances(jnp.zeros((2, 2)), "manhattan")


# --- every strategy against the brute-force reference ----------------------------------------

@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("distance", slow_beyond_first(losses.DISTANCES))
@pytest.mark.parametrize("strategy", losses.STRATEGIES)
def test_matches_brute_force_on_random_batches_with_ties(strategy, distance, soft):
    margin = {"squared": 0.5, "euclidean": 0.25, "cosine": 0.25}[distance]
    saw_active = False
    for seed in range(9):
        emb, labels = random_batch(seed)
        key = jax.random.fold_in(KEY, seed)
        ref_stats = _assert_matches_reference(emb, labels, strategy=strategy, distance=distance,
                                              soft=soft, margin=margin, key=key)
        saw_active |= ref_stats["num_active"] > 0
    assert saw_active, "the batches must exercise non-zero losses"


@functools.cache
def _semihard_value_and_grad(distance, max_positives):
    def loss(e, l):
        return losses.triplet_loss(e, l, margin=0.25, strategy="semihard", distance=distance,
                                   max_positives=max_positives)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("distance", slow_beyond_first(losses.DISTANCES))
def test_semihard_max_positives_path_equals_the_sort_path_and_brute_force(distance):
    """The same loss, stats and gradient whatever the bound: m = 2 leaves most batches
    with anchors of more positives (the sort fall-back), m = B - 1 always takes the
    positives-only path; random labels, ties, duplicates and a collapsed batch."""
    batches = [random_batch(seed) for seed in range(9)]
    collapsed = np.repeat(batches[0][0][:1], B, axis=0)
    batches.append((collapsed, batches[0][1]))
    for emb, labels in batches:
        (loss, stats), grad = _semihard_value_and_grad(distance, None)(emb, labels)
        ref_loss, _ = reference_triplet_loss(np.asarray(_distances_fn(distance)(emb)), labels,
                                             margin=0.25, strategy="semihard", soft=False)
        np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=2e-6)
        for bound in (2, B - 1):
            (loss_m, stats_m), grad_m = _semihard_value_and_grad(distance, bound)(emb, labels)
            # Same triplets; the two compiled programs may sum in another order (1 ulp).
            np.testing.assert_allclose(loss_m, loss, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(grad_m, grad, rtol=1e-6, atol=1e-7)
            for name in stats:
                np.testing.assert_allclose(stats_m[name], stats[name], rtol=1e-6, err_msg=name)


def test_semihard_max_positives_path_picks_the_same_negatives_on_pk_batches():
    """P×K layouts with exact ties (dyadic grid), where m = K - 1 takes the fast path on every
    anchor: the chosen negative columns equal the sort path's, including the tie-breaks
    (lowest column for the closest farther negative, highest for the farthest)."""
    rng = np.random.default_rng(3)
    for identities, per_identity in ((6, 4), (3, 8), (12, 2)):
        labels = jnp.repeat(jnp.arange(identities), per_identity)
        emb = rng.integers(-1, 2, size=(identities * per_identity, 3)) / 2.0
        d = losses.pairwise_distances(jnp.asarray(emb, jnp.float32), "squared")
        positive, negative = mining.label_masks(labels, 0, labels.shape[0])
        by_sort = mining.mine_semihard(d, positive, negative)
        fast = mining.mine_semihard(d, positive, negative, max_positives=per_identity - 1)
        for field in by_sort._fields:
            np.testing.assert_array_equal(
                np.where(by_sort.has_term, getattr(fast, field), 0),
                np.where(by_sort.has_term, getattr(by_sort, field), 0), err_msg=field)
        np.testing.assert_array_equal(fast.has_term, by_sort.has_term)
        expected = _brute_force_semihard_columns(np.asarray(d), np.asarray(labels))
        for path in (by_sort, fast):
            chosen = {(a, p): int(path.column[a, p]) for a, p in expected}
            assert chosen == expected
            assert int(np.sum(path.has_term)) == len(expected)


def _brute_force_semihard_columns(d: np.ndarray, labels: np.ndarray) -> dict:
    """{(a, p): n} by the documented rule, one candidate at a time: the closest negative with
    d(a,n) > d(a,p), the lowest column among ties; else the farthest, the highest column."""
    chosen = {}
    for a in range(len(labels)):
        negatives = [n for n in range(len(labels)) if labels[n] != labels[a]]
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a] or not negatives:
                continue
            farther = [n for n in negatives if d[a, n] > d[a, p]]
            if farther:
                best = farther[0]
                for n in farther[1:]:
                    if d[a, n] < d[a, best]:
                        best = n
            else:
                best = negatives[0]
                for n in negatives[1:]:
                    if d[a, n] >= d[a, best]:
                        best = n
            chosen[(a, p)] = best
    return chosen


def test_semihard_equals_tf_addons_formula_on_nondegenerate_batches():
    for distance in ("squared", "euclidean"):  # TF-Addons' "squared-L2" and "L2"
        for seed in range(6):
            emb, _ = random_batch(seed)
            labels = np.repeat(np.arange(NUM_IDENTITIES), B // NUM_IDENTITIES).astype(np.int32)
            loss, _ = _loss_fn("semihard", distance, False, 1.0)(emb, labels, KEY)
            dist = np.asarray(_distances_fn(distance)(emb))
            np.testing.assert_allclose(loss, tfa_semihard_loss(dist, labels, 1.0), rtol=2e-5)


# --- hand-worked cases ------------------------------------------------------------------------
# Points on a line x = 0, 1, 1.5, 3 with labels 0, 0, 1, 1; squared distances d01 = 1,
# d02 = 2.25, d03 = 9, d12 = 0.25, d13 = 4, d23 = 2.25; margin 0.5.
HAND_EMB = np.array([[0, 0], [1, 0], [1.5, 0], [3, 0]], np.float32)
HAND_LABELS = np.array([0, 0, 1, 1], np.int32)
HAND_CASES = {
    # pairs (0,1): n=2 (2.25 > 1), loss 0; (1,0): n=3 (4), 0; (2,3): nothing > 2.25, farthest
    # negative 2.25, loss 0.5; (3,2): n=1 (4), 0.
    "semihard": (0.5 / 4, dict(num_triplets=4, num_active=1, mean_d_ap=1.625,
                               mean_d_an=(2.25 + 4 + 2.25 + 4) / 4,
                               semihard_found_fraction=0.75)),
    # anchors: 0: (1, 2.25) -> 0; 1: (1, 0.25) -> 1.25; 2: (2.25, 0.25) -> 2.5; 3: (2.25, 4) -> 0.
    "hardest": (3.75 / 4, dict(num_triplets=4, num_active=2, mean_d_ap=1.625,
                               mean_d_an=(2.25 + 0.25 + 0.25 + 4) / 4,
                               semihard_found_fraction=0.0)),
    # active triplets (1,0,2): 1.25, (2,3,0): 0.5, (2,3,1): 2.5 of 8 triplets.
    "all": (4.25 / 3, dict(num_triplets=8, num_active=3, mean_d_ap=1.625, mean_d_an=31 / 8,
                           semihard_found_fraction=0.0)),
    # band (d_ap, d_ap + 0.5) is empty for every pair: no term at all.
    "semihard_facenet": (0.0, dict(num_triplets=0, num_active=0, mean_d_ap=0.0, mean_d_an=0.0,
                                   semihard_found_fraction=0.0)),
}


@pytest.mark.parametrize("strategy", list(HAND_CASES))
def test_hand_worked_cases(strategy):
    expected_loss, expected = HAND_CASES[strategy]
    loss, stats = losses.triplet_loss(HAND_EMB, HAND_LABELS, margin=0.5, strategy=strategy,
                                      key=KEY)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    for name, value in expected.items():
        np.testing.assert_allclose(stats[name], value, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(stats["embedding_spread"], 2 * 18.75 / 12, rtol=1e-6)


def test_semihard_facenet_band_hand_worked_with_single_candidates():
    # margin 2: (0,1) band (1, 3) holds only n=2 (2.25) -> 0.75; (3,2) band (2.25, 4.25) holds
    # only n=1 (4) -> 0.25; (1,0) and (2,3) have empty bands.
    for seed in range(5):  # any key picks the single candidate
        loss, stats = losses.triplet_loss(HAND_EMB, HAND_LABELS, margin=2.0,
                                          strategy="semihard_facenet",
                                          key=jax.random.key(seed))
        np.testing.assert_allclose(loss, 0.5, rtol=1e-6)
        np.testing.assert_allclose(stats["semihard_found_fraction"], 0.5)
        np.testing.assert_allclose(stats["mean_d_an"], (2.25 + 4) / 2, rtol=1e-6)


def test_soft_hardest_is_hermans_softplus_without_margin():
    loss, _ = losses.triplet_loss(HAND_EMB, HAND_LABELS, margin=0.5, strategy="hardest",
                                  soft=True)
    expected = np.mean(np.log1p(np.exp([1 - 2.25, 1 - 0.25, 2.25 - 0.25, 2.25 - 4])))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


# --- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("strategy", losses.STRATEGIES)
def test_gradient_matches_finite_differences(strategy, soft):
    # float64, so a step of 1e-6 is accurate and far too small to flip any mining choice.
    emb, labels = random_batch(0)
    direction = np.random.default_rng(3).normal(size=emb.shape)
    with jax.enable_x64(True):
        f = jax.jit(jax.value_and_grad(lambda e: losses.triplet_loss(
            e, labels, margin=0.25, strategy=strategy, distance="euclidean", soft=soft,
            key=KEY)[0]))  # one program for the gradient and the differences
        x = jnp.asarray(emb, jnp.float64)
        analytic = float(jnp.sum(f(x)[1] * direction))
        eps = 1e-6
        numeric = (float(f(x + eps * direction)[0]) - float(f(x - eps * direction)[0])) / (2 * eps)
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


@pytest.mark.parametrize("strategy", losses.STRATEGIES)
def test_only_chosen_distances_carry_gradient(strategy):
    # One positive pair (rows 0, 1): every strategy but "all" picks one negative per term, so
    # at most 4 rows get a gradient; the pair's rows get one whenever a term is active.
    emb, _ = random_batch(0)
    labels = np.array([0, 0] + list(range(1, B - 1)), np.int32)  # one positive pair only
    (loss, _), grad = _loss_and_grad(strategy, "squared", False)(emb, labels, KEY, 0.5)
    touched = np.flatnonzero(np.abs(np.asarray(grad)).sum(1) > 0)
    if float(loss) > 0:
        assert set(touched) >= {0, 1}, touched
    else:
        assert len(touched) == 0, touched
    if strategy != "all":  # one negative per pair: 2 pairs -> at most 2 negatives
        assert len(touched) <= 4, touched


# --- additive sums over a partition of the anchors ---------------------------------------------

@pytest.mark.parametrize("start, count, message", [
    (B - 3, 4, rf"anchors \[{B - 3}, {B + 1}\) overhang the batch of {B}.*<= {B - 4}"),
    (-1, 2, r"overhang"),
    (0, 0, rf"num_anchors=0 must lie in \[1, {B}\]"),
    (0, B + 1, r"must lie in"),
])
def test_anchor_rows_outside_the_batch_are_an_error(start, count, message):
    """dynamic_slice would shift an overhanging slice inside and mine other anchors."""
    emb, labels = random_batch(0)
    with pytest.raises(ValueError, match=message):
        losses.triplet_loss_sums(emb, labels, anchor_start=start, num_anchors=count,
                                 margin=0.2, strategy="hardest")
    losses.triplet_loss_sums(emb, labels, anchor_start=B - 4, num_anchors=4, margin=0.2,
                             strategy="hardest")  # the last rows exactly: fine


@pytest.mark.parametrize("strategy", losses.STRATEGIES)
def test_sums_over_anchor_slices_equal_the_whole_batch(strategy):
    emb, labels = random_batch(0)
    slices = 4
    num_anchors = B // slices

    @jax.jit
    def slice_sums(e, l, start, k):
        return losses.triplet_loss_sums(e, l, anchor_start=start, num_anchors=num_anchors,
                                        margin=0.5, strategy=strategy, key=k)

    def total_objective(e):
        parts = [slice_sums(e, labels, jnp.int32(i * num_anchors), KEY) for i in range(slices)]
        total = jax.tree.map(lambda *xs: sum(xs), *parts)
        return losses.reduce_triplet_sums(total)

    (loss, stats), grad = jax.value_and_grad(total_objective, has_aux=True)(emb)
    (whole, whole_stats), whole_grad = _loss_and_grad(strategy, "squared", False)(
        emb, labels, KEY, 0.5)
    assert float(whole) > 0
    np.testing.assert_allclose(loss, whole, rtol=1e-6)
    for name in losses.STATS_KEYS:
        np.testing.assert_allclose(stats[name], whole_stats[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(grad, whole_grad, rtol=1e-5, atol=1e-6)
    assert set(slice_sums(emb, labels, 0, KEY)) == set(losses.SUM_KEYS)


# --- degenerate batches ----------------------------------------------------------------------

def _value_and_grad(strategy, distance, soft, margin, emb, labels):
    (loss, stats), grad = _loss_and_grad(strategy, distance, soft)(emb, labels, KEY, margin)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert all(np.isfinite(float(v)) for v in stats.values())
    return float(loss), {k: float(v) for k, v in stats.items()}, np.asarray(grad)


@pytest.mark.parametrize("distance", slow_beyond_first(losses.DISTANCES))
@pytest.mark.parametrize("strategy", losses.STRATEGIES)
def test_batches_without_a_valid_term_give_zero_loss_and_zero_gradient(strategy, distance):
    emb, _ = random_batch(0)
    for labels in (np.arange(B, dtype=np.int32),          # no positive pair
                   np.zeros(B, np.int32)):                 # one identity: no negative
        for soft in (False, True):
            loss, stats, grad = _value_and_grad(strategy, distance, soft, 0.25, emb, labels)
            assert loss == 0.0 and not grad.any()
            assert stats["num_triplets"] == stats["num_active"] == 0
            assert stats["mean_d_ap"] == stats["mean_d_an"] == stats["active_fraction"] == 0
            assert stats["embedding_spread"] > 0


@pytest.mark.parametrize("distance", losses.DISTANCES)
@pytest.mark.parametrize("strategy", losses.STRATEGIES)
def test_collapsed_embeddings_give_margin_or_ln2_with_finite_gradients(strategy, distance):
    emb = np.repeat(_unit(np.ones((1, D))), B, axis=0).astype(np.float32)
    labels = np.repeat(np.arange(NUM_IDENTITIES), B // NUM_IDENTITIES).astype(np.int32)
    for soft, expected in ((False, 0.25), (True, np.log(2.0))):
        loss, stats, _ = _value_and_grad(strategy, distance, soft, 0.25, emb, labels)
        assert stats["embedding_spread"] < 1e-6  # cosine: 1 - cos rounds to ~6e-8
        if strategy == "semihard_facenet":  # band d_ap < d_an needs d_an > 0: no candidate
            assert loss == 0.0 and stats["num_triplets"] == 0
            assert stats["semihard_found_fraction"] == 0.0
        else:
            np.testing.assert_allclose(loss, expected, rtol=1e-6)
            assert stats["active_fraction"] == 1.0 and stats["mean_d_an"] < 1e-6


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("strategy", losses.STRATEGIES)
def test_duplicated_images_give_finite_gradients(strategy, distance):
    emb, labels = random_batch(2)  # kind 2: duplicated rows, also across identities
    loss, stats, _ = _value_and_grad(strategy, distance, False, 0.25, emb, labels)
    assert np.isfinite(loss) and stats["num_triplets"] > 0


def test_semihard_anchor_without_semihard_candidate_uses_farthest_negative():
    # Anchor 2's positive (d 2.25) is as far as its farthest negative: case checked in the hand
    # table; here: every pair lacks a candidate when negatives are all closer.
    emb = np.array([[0, 0], [3, 0], [1, 0], [2, 0]], np.float32)
    labels = np.array([0, 0, 1, 1], np.int32)
    loss, stats = losses.triplet_loss(emb, labels, margin=0.5, strategy="semihard")
    # (0,1): d_ap 9, negs 1, 4 -> farthest 4: 5.5; (1,0): negs 4, 1 -> 4: 5.5;
    # (2,3): d_ap 1, negs 1, 4 -> closest > 1: 4 -> 0; (3,2): negs 4, 1 -> 4 -> 0.
    np.testing.assert_allclose(loss, 11 / 4, rtol=1e-6)
    np.testing.assert_allclose(stats["semihard_found_fraction"], 0.5)


# --- random strategies: reproducible, distributed as intended --------------------------------

@pytest.mark.parametrize("strategy", RANDOM)
def test_random_strategies_are_reproducible_and_need_a_key(strategy):
    emb, labels = random_batch(0)
    fn = _loss_fn(strategy, "squared", False, 0.5)
    first, second = fn(emb, labels, KEY), fn(emb, labels, KEY)
    assert float(first[0]) == float(second[0])
    chosen = _chosen_fn(strategy, "squared", 0.5)
    draws = {tuple(np.asarray(chosen(emb, labels, jax.random.key(s))).ravel())
             for s in range(4)}
    assert len(draws) > 1, "different keys must give different draws"
    with pytest.raises(ValueError, match="key"):
        losses.triplet_loss(emb, labels, margin=0.5, strategy=strategy)


def _sample_counts(sampler, weights_row, num_draws):
    uniform = jax.random.uniform(jax.random.key(0), (num_draws, weights_row.shape[0]))
    columns = sampler(jnp.broadcast_to(weights_row, uniform.shape), uniform)
    return np.bincount(np.asarray(columns).ravel(), minlength=weights_row.shape[0])


def test_random_negative_is_uniform_over_negatives():
    labels = np.array([0] * 4 + list(range(1, B - 3)), np.int32)
    positive, negative = mining.label_masks(jnp.asarray(labels), 0, B)
    uniform = jax.random.uniform(jax.random.key(1), (400, B, B))
    columns = jax.jit(jax.vmap(lambda u: mining.mine_random(positive, negative, u).column))(
        uniform)
    counts = np.bincount(np.asarray(columns[:, 0, 1:4]).ravel(), minlength=B)  # anchor 0
    assert counts[:4].sum() == 0  # never a positive or the anchor
    assert scipy_stats.chisquare(counts[4:]).pvalue > 1e-3


def test_semihard_facenet_is_uniform_inside_the_band():
    d_row = np.linspace(0.0, 2.0, B, dtype=np.float32)  # anchor 0, positive column 1 at d=0.087
    d = jnp.broadcast_to(jnp.asarray(d_row), (B, B))
    labels = np.array([0, 0] + list(range(1, B - 1)), np.int32)
    positive, negative = mining.label_masks(jnp.asarray(labels), 0, B)
    margin = 0.8  # band (0.087, 0.887): columns 2..10
    uniform = jax.random.uniform(jax.random.key(2), (3000, B, B))
    chosen = jax.jit(jax.vmap(lambda u: mining.mine_semihard_facenet(
        d, positive, negative, margin, u).column[0, 1]))(uniform)
    counts = np.bincount(np.asarray(chosen), minlength=B)
    band = (d_row > d_row[1]) & (d_row < d_row[1] + np.float32(margin))
    assert counts[~band].sum() == 0 and band.sum() == 9
    assert scipy_stats.chisquare(counts[band]).pvalue > 1e-3


def test_distance_weighted_sampling_follows_inverse_sphere_density():
    rng = np.random.default_rng(5)
    dim = 16
    emb = _unit(rng.normal(size=(B, dim))).astype(np.float32)
    emb[5:] = _unit(emb[0] + 0.6 * rng.normal(size=(B - 5, dim)) / np.sqrt(dim))  # spread d
    labels = np.array([0, 0] + list(range(1, B - 1)), np.int32)
    dist = losses.pairwise_distances(emb, "euclidean")
    positive, negative = mining.label_masks(jnp.asarray(labels), 0, B)
    weights = mining.distance_weighted_weights(dist, negative, distance="euclidean",
                                               embedding_dim=dim, cutoff=0.5,
                                               nonzero_loss_cutoff=1.4)
    counts = _sample_counts(jax.jit(mining.sample_by_weight), weights[0], 20000)
    expected = distance_weighted_probabilities(
        np.asarray(dist[0]), list(range(2, B)), distance="euclidean", dim=dim, cutoff=0.5,
        nonzero_loss_cutoff=1.4)
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    assert support.sum() >= 5 and len(np.unique(np.round(expected[support], 4))) > 3
    assert scipy_stats.chisquare(counts[support], expected[support] * counts.sum()).pvalue > 1e-3


def test_sample_by_weight_never_picks_a_zero_weight_column_at_large_batch():
    """At B >= 1024 XLA's CPU cumsum adds in a tree order, so the running total can change at
    a zero-weight column (even step down): uniforms aimed just at such a column's total must
    still give a weighted column (a zero-weight one would be the anchor or a positive)."""
    rng = np.random.default_rng(0)
    rows, columns = 64, 1024
    weights = rng.random((rows, columns)).astype(np.float32) ** 8
    weights[rng.random((rows, columns)) < 0.3] = 0
    cumulative = np.asarray(jax.jit(lambda w: jnp.cumsum(w, axis=1))(jnp.asarray(weights)))
    jumps = np.argwhere((cumulative[:, 1:] != cumulative[:, :-1]) & (weights[:, 1:] == 0))
    assert len(jumps) > 0  # the hazard exists on this backend, so the test can fail
    eps = np.finfo(np.float32).eps
    uniform = np.empty((rows, 100), np.float32)
    for a in range(rows):  # each row aims around one of its own jumps, else at random
        own = jumps[jumps[:, 0] == a]
        if len(own):
            j = own[0, 1] + 1
            aim = np.float32(cumulative[a, j - 1] / cumulative[a, -1])
            uniform[a] = aim * (1 + np.arange(-50, 50, dtype=np.float32) * eps)
        else:
            uniform[a] = rng.random(100)
    uniform = np.clip(uniform, 0, np.nextafter(np.float32(1), np.float32(0)))
    picked = np.asarray(jax.jit(mining.sample_by_weight)(jnp.asarray(weights),
                                                          jnp.asarray(uniform)))
    assert (np.take_along_axis(weights, picked, axis=1) > 0).all()


# --- memory: no B³ array in the program ------------------------------------------------------

def _largest_array(jaxpr) -> tuple[int, str]:
    """Largest number of elements of any value in the jaxpr, sub-jaxprs included."""
    largest = (0, "")
    for eqn in jaxpr.eqns:
        for var in list(eqn.outvars) + list(eqn.invars):
            shape = getattr(var.aval, "shape", ())
            largest = max(largest, (int(np.prod(shape)), f"{eqn.primitive} {shape}"))
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_array(inner))
    return largest


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("strategy", losses.STRATEGIES)
def test_memory_is_quadratic_in_forward_and_backward(strategy, soft):
    b = 512
    emb = jnp.ones((b, 128))
    labels = jnp.repeat(jnp.arange(b // 4), 4)
    grad = jax.grad(lambda e: losses.triplet_loss(e, labels, margin=0.2, strategy=strategy,
                                                  soft=soft, key=KEY)[0])
    size, where = _largest_array(jax.make_jaxpr(grad)(emb).jaxpr)
    assert size >= b * b  # the walk sees the distance matrix
    assert size < b**3 // 4, f"{where} has {size} elements"


def test_the_memory_walk_finds_a_cubic_array_inside_a_loop_body():
    b = 64
    hidden = lambda e: jnp.sum(jax.lax.map(  # noqa: E731
        lambda row: jnp.sum(e[:, :, None] * e[None, :, :] * row[0]), e))
    size, where = _largest_array(jax.make_jaxpr(jax.grad(hidden))(jnp.ones((b, b))).jaxpr)
    assert size >= b**3, where


# --- argument checks -------------------------------------------------------------------------

def test_validate_loss_args():
    ok = dict(margin=0.2, strategy="semihard", distance="squared", soft=False,
              strategy_options={})
    losses.validate_loss_args(**ok)
    with pytest.raises(ValueError, match="margin"):
        losses.validate_loss_args(**{**ok, "margin": -0.1})
    with pytest.raises(ValueError, match="semihard, semihard_facenet, hardest"):
        losses.validate_loss_args(**{**ok, "strategy": "semi-hard"})
    with pytest.raises(ValueError, match="squared, euclidean, cosine"):
        losses.validate_loss_args(**{**ok, "distance": "l2"})
    with pytest.raises(ValueError, match="cutoff, nonzero_loss_cutoff"):
        losses.validate_loss_args(**{**ok, "strategy": "distance_weighted",
                                     "strategy_options": {"cut_off": 0.3}})
    with pytest.raises(ValueError, match="valid options: none"):
        losses.validate_loss_args(**{**ok, "strategy": "hardest",
                                     "strategy_options": {"cutoff": 0.3}})
    with pytest.raises(ValueError, match="valid options: max_positives"):
        losses.validate_loss_args(**{**ok, "strategy_options": {"cutoff": 0.3}})
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="max_positives must be None or an int >= 1"):
            losses.validate_loss_args(**{**ok, "strategy_options": {"max_positives": bad}})
    with pytest.raises(ValueError, match="0 < cutoff < nonzero_loss_cutoff"):
        losses.validate_loss_args(**{**ok, "strategy": "distance_weighted",
                                     "strategy_options": {"cutoff": 1.5}})
    with pytest.warns(UserWarning, match="collapsed"):
        losses.validate_loss_args(**{**ok, "margin": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses.validate_loss_args(**{**ok, "margin": 0.0, "soft": True})


def test_triplet_loss_checks_its_arguments_before_any_work():
    with pytest.raises(ValueError, match="valid strategies"):
        losses.triplet_loss(jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32), margin=0.2,
                            strategy="batch_hard")
    with pytest.raises(ValueError, match="margin"):
        losses.triplet_loss(jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32), margin=-1.0,
                            strategy="hardest")
    with pytest.raises(ValueError, match="unknown option"):
        losses.triplet_loss(jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32), margin=0.2,
                            strategy="distance_weighted", key=KEY, beta=1.2)
