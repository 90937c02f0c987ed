"""Large-batch mining: semi-hard's sort-free default with its fall-back, and anchor-chunked sums.

References: the brute-force rules of triplet_reference.py and test_losses.py, and the unchunked
call (which those references check). Tiny shapes; each compiled function is cached.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facenet_jax import losses
from facenet_jax.losses import mining
from test_losses import B, _brute_force_semihard_columns, random_batch
from triplet_reference import reference_triplet_loss

KEY = jax.random.key(7)


def _pk_labels(identities: int, per_identity: int) -> jnp.ndarray:
    return jnp.repeat(jnp.arange(identities, dtype=jnp.int32), per_identity)


# --- semi-hard: which path the default call takes, and that both agree ----------------------

@pytest.mark.parametrize("identities, per_identity", [(6, 4), (3, 8), (2, 12), (2, 65)])
def test_default_semihard_skips_the_sort_on_pk_batches(identities, per_identity):
    """Every P×K batch with K − 1 ≤ SEMIHARD_POSITIVES_CAP (64) takes the sort-free path with
    no argument; the hint can only lower the cap."""
    labels = _pk_labels(identities, per_identity)
    positive, _ = mining.label_masks(labels, 0, labels.shape[0])
    assert per_identity - 1 <= mining.SEMIHARD_POSITIVES_CAP
    assert bool(mining.semihard_skips_sort(positive))
    assert bool(mining.semihard_skips_sort(positive, per_identity - 1))
    if per_identity > 2:
        assert not bool(mining.semihard_skips_sort(positive, per_identity - 2))


def test_semihard_falls_back_to_the_sort_beyond_the_cap():
    """One identity with cap + 2 images (its anchors have cap + 1 positives) among others: the
    default call takes the sort, and its loss equals the brute-force rule; the same batch
    forced onto the bucket path (cap raised) gives identical values and gradients."""
    cap = mining.SEMIHARD_POSITIVES_CAP
    big = cap + 2
    labels = np.concatenate([np.zeros(big, np.int32), np.repeat(np.arange(1, 5), 3)])
    rng = np.random.default_rng(0)
    emb = (rng.integers(-2, 3, size=(len(labels), 4)) / 4.0).astype(np.float32)  # exact ties
    positive, _ = mining.label_masks(jnp.asarray(labels), 0, len(labels))
    assert not bool(mining.semihard_skips_sort(positive))

    def value_and_grad(bound):
        fn = lambda e: losses.triplet_loss(e, labels, margin=0.5, strategy="semihard",  # noqa
                                           max_positives=bound)
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(emb)

    (loss, stats), grad = value_and_grad(None)
    dist = np.asarray(losses.pairwise_distances(jnp.asarray(emb), "squared"))
    ref_loss, ref_stats = reference_triplet_loss(dist, labels, margin=0.5, strategy="semihard")
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    assert stats["num_triplets"] == ref_stats["num_triplets"] == big * (big - 1) + 4 * 3 * 2
    (loss_fast, stats_fast), grad_fast = value_and_grad(len(labels))
    np.testing.assert_allclose(loss_fast, loss, rtol=1e-6)
    np.testing.assert_allclose(grad_fast, grad, rtol=1e-6, atol=1e-7)
    for name in stats:
        np.testing.assert_allclose(stats_fast[name], stats[name], rtol=1e-6, err_msg=name)


@functools.partial(jax.jit, static_argnums=3)
def _every_path(d, positive, negative, num_slots):
    """The sort, then the two sort-free paths with num_slots slots, in the pair layout."""
    return (mining.semihard_by_sort(d, positive, negative),
            *(mining.slots_as_pairs(find(d, positive, negative, num_slots), positive, negative)
              for find in (mining._semihard_by_buckets, mining._semihard_by_row_minima)))


@pytest.mark.parametrize("seed", range(6))
def test_every_semihard_path_picks_identical_triplets(seed):
    """The sort, the bucket path and the row-minima path, called directly on the same batch
    (random labels, ties on a dyadic grid, duplicated rows; then P×K), the sort-free ones with
    exactly as many slots as the most positives, with spare slots, and with more slots than
    candidates: every field equal where a term exists, the term masks equal, and the columns
    equal the brute-force rule's, tie-breaks included."""
    emb, labels = random_batch(seed)
    if seed >= 3:
        labels = np.asarray(_pk_labels(B // 4, 4))
    d = losses.pairwise_distances(jnp.asarray(emb), "squared")
    positive, negative = mining.label_masks(jnp.asarray(labels), 0, B)
    most = int(np.max(np.sum(positive, axis=1)))
    expected = _brute_force_semihard_columns(np.asarray(d), np.asarray(labels))
    for num_slots in (most, most + 3, B + 1):
        by_sort, *sort_free = _every_path(d, positive, negative, num_slots)
        for path, chosen in zip(("buckets", "row minima"), sort_free):
            np.testing.assert_array_equal(chosen.has_term, by_sort.has_term)
            for field in by_sort._fields:
                np.testing.assert_array_equal(
                    np.where(by_sort.has_term, getattr(chosen, field), 0),
                    np.where(by_sort.has_term, getattr(by_sort, field), 0),
                    err_msg=f"{path}: {field}, {num_slots} slots")
            assert {pair: int(chosen.column[pair]) for pair in expected} == expected, path
            assert int(np.sum(chosen.has_term)) == len(expected)


def test_semihard_slot_tiers():
    """The bucket path's static slot counts: 4 and 16 below the cap, then the cap; a hint at
    or below 4 is the only tier."""
    assert mining.semihard_slot_tiers() == (4, 16, mining.SEMIHARD_POSITIVES_CAP)
    assert mining.semihard_slot_tiers(39) == (4, 16, 39)
    assert mining.semihard_slot_tiers(8) == (4, 8)
    assert mining.semihard_slot_tiers(4) == (4,)
    assert mining.semihard_slot_tiers(3) == (3,)
    # A batch of B candidates has at most B positives per anchor: the cap is at most B, and the
    # sort is compiled only when B is above the cap.
    assert mining.semihard_slot_tiers(None, 12) == (4, 12)
    assert mining.semihard_slot_tiers(None, 16) == (4, 16)
    assert mining.semihard_slot_tiers(None, 3) == (3,)
    assert mining.semihard_slot_tiers(None, 200) == (4, 16, mining.SEMIHARD_POSITIVES_CAP)
    assert mining.semihard_slot_tiers(8, 200) == (4, 8)
    assert not mining.semihard_sort_reachable(jnp.zeros((4, mining.SEMIHARD_POSITIVES_CAP)))
    assert mining.semihard_sort_reachable(jnp.zeros((4, mining.SEMIHARD_POSITIVES_CAP + 1)))
    assert mining.semihard_sort_reachable(jnp.zeros((4, 9)), max_positives=8)


@pytest.mark.parametrize("per_identity", [2, 5, 6, 17, 40])
def test_default_semihard_on_every_slot_tier(per_identity):
    """P×K batches whose K − 1 lands in each tier (and on a tier's edge) give the brute-force
    rule's triplets through the default call, with ties on a dyadic grid."""
    labels = np.asarray(_pk_labels(3, per_identity))
    rng = np.random.default_rng(per_identity)
    emb = (rng.integers(-2, 3, size=(len(labels), 4)) / 4.0).astype(np.float32)
    d = losses.pairwise_distances(jnp.asarray(emb), "squared")
    positive, negative = mining.label_masks(jnp.asarray(labels), 0, len(labels))
    chosen = jax.jit(mining.mine_semihard)(d, positive, negative)
    expected = _brute_force_semihard_columns(np.asarray(d), labels)
    assert {pair: int(chosen.column[pair]) for pair in expected} == expected
    assert int(np.sum(chosen.has_term)) == len(expected)


@pytest.mark.parametrize("per_identity, soft", [(4, False), (9, True),
                                               pytest.param(70, False, marks=pytest.mark.slow)])
def test_semihard_loss_sums_equal_the_differentiated_pair_sums(per_identity, soft):
    """The loss's semi-hard sums (each path summing in its own layout and returning
    ∂loss_sum/∂d: row minima at K = 4, buckets at K = 9, the sort past the cap at K = 70)
    equal the generic pair sums of `mine_semihard`'s triplets, differentiated by JAX: counts
    exactly, values and gradients to float summation order."""
    from facenet_jax.losses import triplet

    labels = jnp.asarray(_pk_labels(3, per_identity))
    rng = np.random.default_rng(per_identity)
    emb = (rng.integers(-2, 3, size=(len(labels), 4)) / 4.0).astype(np.float32)  # ties
    positive, negative = mining.label_masks(labels, 0, len(labels))

    def slot_sums(d):
        return triplet._semihard_sums(d, positive, negative, 0.3, soft)

    def pair_sums(d):
        chosen = mining.mine_semihard(jax.lax.stop_gradient(d), positive, negative)
        return triplet._pair_sums(d, chosen, 0.3, soft)

    def scaled_loss(sums):
        return lambda d: (lambda s: (s["loss_sum"] / 7.0, s))(sums(d))

    d = losses.pairwise_distances(jnp.asarray(emb), "squared")
    ((value, stats), grad), ((ref_value, ref_stats), ref_grad) = [
        jax.jit(jax.value_and_grad(scaled_loss(f), has_aux=True))(d)
        for f in (slot_sums, pair_sums)]
    np.testing.assert_allclose(value, ref_value, rtol=2e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(ref_grad))) > 0  # the batch has active terms
    for name in ("count", "num_triplets", "num_active", "semihard_found", "semihard_pairs"):
        assert float(stats[name]) == float(ref_stats[name]), name
    for name in ("loss_sum", "d_ap_sum", "d_an_sum"):
        np.testing.assert_allclose(stats[name], ref_stats[name], rtol=2e-6, err_msg=name)


# --- anchor_chunk ---------------------------------------------------------------------------

CHUNK_CASES = [(s, False) for s in losses.STRATEGIES] + [("all", True)]


@functools.cache
def _sums_and_grad(strategy, soft, anchor_chunk, anchor_start, num_anchors):
    def total(e, l):
        sums = losses.triplet_loss_sums(
            e, l, anchor_start=anchor_start, num_anchors=num_anchors, margin=0.5,
            strategy=strategy, soft=soft, key=KEY, anchor_chunk=anchor_chunk)
        return sums["loss_sum"], sums
    return jax.jit(jax.value_and_grad(total, has_aux=True))


@pytest.mark.parametrize("strategy, soft", CHUNK_CASES)
def test_anchor_chunk_gives_the_same_triplets_values_and_gradients(strategy, soft):
    """Chunks of 5 over the 16 anchors from row 5 (3 blocks and a tail of 1), on Gaussian,
    tied and duplicated batches: counts exactly, sums to rtol 1e-6, gradients to 1e-6 of their
    largest entry (only the order of float summation differs)."""
    start, count = 5, 16
    for seed in range(3):
        emb, labels = random_batch(seed)
        (value, sums), grad = _sums_and_grad(strategy, soft, None, start, count)(emb, labels)
        (value_c, sums_c), grad_c = _sums_and_grad(strategy, soft, 5, start, count)(emb, labels)
        for name in ("count", "num_triplets", "num_active", "semihard_found",
                     "semihard_pairs", "spread_count"):
            assert float(sums_c[name]) == float(sums[name]), name
        for name in ("loss_sum", "d_ap_sum", "d_an_sum", "spread_sum"):
            np.testing.assert_allclose(sums_c[name], sums[name], rtol=1e-6, atol=1e-6,
                                       err_msg=name)
        np.testing.assert_allclose(grad_c, grad, rtol=1e-6, atol=1e-6 * np.abs(grad).max())
        assert float(sums["count"]) > 0


def test_auto_anchor_chunk_sizes():
    """anchor_chunk=None's blocks, by hand: the fewest of at most AUTO_CHUNK_ELEMENTS (2^19)
    entries on the CPU, evened out to a divisor of the anchors within twice as many blocks,
    else equal blocks and a shorter last one; one block for small batches; 2^24 entries on
    accelerators."""
    from facenet_jax.losses.triplet import AUTO_CHUNK_ELEMENTS, auto_anchor_chunk

    assert AUTO_CHUNK_ELEMENTS == 2**19
    assert auto_anchor_chunk(16, 20) == 16
    assert auto_anchor_chunk(724, 724) == 724  # 524,176 entries: still one block
    assert auto_anchor_chunk(1024, 1024) == 512  # 2 blocks
    assert auto_anchor_chunk(1800, 1800) == 225  # 3.24 M: at least 7 blocks, 8 divide 1800
    assert auto_anchor_chunk(1031, 1031) == 344  # prime: 3 blocks, the last of 343
    assert auto_anchor_chunk(8192, 8192) == 64
    assert auto_anchor_chunk(1024, 65536) == 8
    assert auto_anchor_chunk(1, 10**7) == 1
    # GPUs and TPUs: blocks of up to 2^24 entries, every batch up to 4,096 in one.
    for backend in ("gpu", "tpu"):
        assert auto_anchor_chunk(4096, 4096, backend) == 4096
        assert auto_anchor_chunk(8192, 8192, backend) == 2048
        assert auto_anchor_chunk(1024, 65536, backend) == 256
    assert auto_anchor_chunk(1024, 1024, "cpu") == 512


def test_default_call_is_the_auto_chunk_program(monkeypatch):
    """anchor_chunk=None is the auto_anchor_chunk program, bit for bit: with the threshold
    lowered to 5·B, 16 anchors go in 4 blocks of 4, and the counts equal one block's."""
    from facenet_jax.losses import triplet

    emb, labels = random_batch(0)
    chunked = _sums_and_grad("semihard", False, 4, 5, 16)(emb, labels)
    whole = _sums_and_grad("semihard", False, 16, 5, 16)(emb, labels)
    monkeypatch.setattr(triplet, "AUTO_CHUNK_ELEMENTS", 5 * B)
    assert triplet.auto_anchor_chunk(16, B) == 4
    automatic = jax.jit(jax.value_and_grad(lambda e, l: (lambda s: (s["loss_sum"], s))(
        losses.triplet_loss_sums(e, l, anchor_start=5, num_anchors=16, margin=0.5,
                                 strategy="semihard")), has_aux=True))(emb, labels)
    for a, b in zip(jax.tree.leaves(automatic), jax.tree.leaves(chunked)):
        np.testing.assert_array_equal(a, b)
    (_, sums), _ = whole
    assert float(automatic[0][1]["count"]) == float(sums["count"]) > 0


@pytest.mark.parametrize("anchor_chunk", [None, pytest.param(5, marks=pytest.mark.slow)])
@pytest.mark.parametrize("strategy", ["semihard", "hardest", "all"])
def test_margin_gradient_and_vmap_over_margins(strategy, anchor_chunk):
    """The hinge's ∂loss_sum/∂margin is the number of active terms (each adds
    d_ap + α − d_an), in one block and in blocks of 5; and under vmap over margins, the
    gradients with respect to the embeddings and the margin equal each margin's own call."""
    emb, labels = random_batch(1)

    def loss_sum(e, margin):
        sums = losses.triplet_loss_sums(e, labels, anchor_start=0, num_anchors=B,
                                        margin=margin, strategy=strategy,
                                        anchor_chunk=anchor_chunk)
        return sums["loss_sum"], sums

    gradient = jax.jit(jax.value_and_grad(loss_sum, argnums=(0, 1), has_aux=True))
    (_, sums), (_, by_margin) = gradient(emb, jnp.float32(0.5))
    assert float(by_margin) == float(sums["num_active"]) > 0
    margins = jnp.asarray([0.2, 0.5], jnp.float32)
    batched = jax.jit(jax.vmap(gradient, in_axes=(None, 0)))(emb, margins)
    for i, margin in enumerate(margins):
        (value, _), grads = gradient(emb, margin)
        np.testing.assert_allclose(batched[0][0][i], value, rtol=1e-6)
        for got, want in zip(batched[1], grads):
            np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-7)


def test_anchor_chunk_is_checked():
    emb, labels = jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="anchor_chunk must be None"):
            losses.triplet_loss(emb, labels, margin=0.2, strategy="hardest", anchor_chunk=bad)
    with pytest.raises(ValueError, match="candidate_mask has shape"):
        losses.triplet_loss_sums(emb, labels, anchor_start=0, num_anchors=4, margin=0.2,
                                 strategy="hardest", candidate_mask=jnp.ones(3, bool))


@pytest.mark.parametrize("strategy", ["semihard", "all"])
def test_anchor_chunk_memory_is_chunk_times_candidates(strategy):
    """XLA's compiled temp memory of fwd+bwd for 256 anchors against 4,096 candidates: with
    chunks of 16 it stays within a few [16, 4096] float arrays (plus the [B, D] gradient), far
    below the unchunked program's [256, 4096] arrays."""
    candidates, anchors, chunk, dim = 4096, 256, 16, 8
    emb = jax.ShapeDtypeStruct((candidates, dim), jnp.float32)
    labels = jax.ShapeDtypeStruct((candidates,), jnp.int32)

    def temp_bytes(anchor_chunk):
        grad = jax.grad(lambda e, l: losses.triplet_loss_sums(
            e, l, anchor_start=0, num_anchors=anchors, margin=0.2, strategy=strategy,
            key=KEY, anchor_chunk=anchor_chunk)["loss_sum"])
        return jax.jit(grad).lower(emb, labels).compile().memory_analysis().temp_size_in_bytes

    block = chunk * candidates * 4  # one [chunk, B] float32 array
    chunked, whole = temp_bytes(chunk), temp_bytes(anchors)
    assert chunked <= 24 * block + 4 * candidates * dim * 4, chunked / block
    assert whole >= 8 * chunked, (whole, chunked)


# --- the benchmark script (no timings asserted) ---------------------------------------------

def test_mining_benchmark_plans_rows_and_tabulates_them():
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks import mining as bench

    without = bench.plan([512], ["semihard"], None, 1, None, 512, 512)
    assert [s["impl"] for s in without] == ["imports", "ours"]
    specs = bench.plan([512, 1024], ["semihard", "all"], "/anchors", 2, (64, 256, 8), 512, 512)
    impls = [(s["impl"], s.get("batch")) for s in specs]
    assert impls[:3] == [("imports", None)] * 3
    assert ("tfa_semihard", 512) in impls and ("tfa_semihard", 1024) not in impls
    assert ("pml_all", 512) in impls and ("pml_all", 1024) not in impls
    assert [s["chunk"] for s in specs if s["impl"] == "ours_chunked"] == [8, 64]
    assert all(s["repeats"] == 2 for s in specs)
    with pytest.raises(ValueError, match="not a multiple of K=4"):
        bench.layout(30)

    row = bench.run_one({"impl": "ours", "strategy": "semihard", "batch": 8, "repeats": 1})
    assert row["seconds"] > 0 and row["peak_rss_mb"] > 0
    rows = [{"impl": "imports", "framework": "jax", "peak_rss_mb": 100.0},
            {"impl": "imports", "framework": "torch", "peak_rss_mb": 300.0},
            {**row, "seconds": 0.01, "peak_rss_mb": 150.0},
            {"impl": "pml_semihard", "strategy": "semihard", "batch": 8, "seconds": 0.5,
             "peak_rss_mb": 400.0},
            {"impl": "tfa_semihard", "strategy": "semihard", "batch": 8,
             "error": "killed by signal 9 (out of memory)"}]
    table = bench.markdown(rows)
    assert "| semihard | 8 (2×4) | ours | 10.0 |  | 150 | 50 |" in table
    assert "| semihard | 8 (2×4) | pml_semihard | 500.0 | 50.0× | 400 | 100 |" in table
    assert "failed: killed by signal 9 (out of memory)" in table
    chunked = {"impl": "ours_chunked", "strategy": "semihard", "batch": 1800, "anchors": 64,
               "chunk": 8, "seconds": 0.02, "peak_rss_mb": 120.0}
    assert "| semihard | 1800 (450×4) | ours, 64 anchors, anchor_chunk=8 |" in bench.markdown(
        [chunked])
    for bad in ("64x1802x8", "2000x1800x8"):
        with pytest.raises(SystemExit):
            bench.main(["--chunked", bad, "--sizes", "8"])
