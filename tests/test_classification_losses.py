"""facenet_jax.losses.classification against float64 numpy references and hand-worked cases.

The references below are written from the papers' formulas with numpy in float64 (arccos and
cos(θ + m) taken literally, log-softmax by hand); gradients are checked against central finite
differences of those references. The sharded tests run on the 8 host CPU devices of conftest.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from facenet_jax import losses, parallel
from facenet_jax.parallel import AXIS

HEADS = losses.HEADS
B, C, D = 6, 5, 4
# Small s so that logits and finite differences stay in a well-conditioned range.
PARAMS = {"softmax": (None, None), "normface": (4.0, None), "cosface": (4.0, 0.35),
          "arcface": (4.0, 0.5)}


# ---------------------------------------------------------------------------------------------
# float64 references (numpy, brute force)

def ref_logits(e, w, b, labels, head, s, m):
    """[B,D], [C,D], [C] | None, [B] -> [B,C] float64, one entry at a time."""
    e, w = np.asarray(e, np.float64), np.asarray(w, np.float64)
    out = np.zeros((e.shape[0], w.shape[0]))
    for i in range(e.shape[0]):
        for c in range(w.shape[0]):
            if head == "softmax":
                out[i, c] = e[i] @ w[c] + (0.0 if b is None else float(b[c]))
                continue
            cos = e[i] @ w[c] / (np.linalg.norm(e[i]) * np.linalg.norm(w[c]))
            if c == labels[i] and head == "cosface":
                cos = cos - m
            elif c == labels[i] and head == "arcface":
                theta = math.acos(min(max(cos, -1.0), 1.0))
                cos = math.cos(theta + m) if theta + m < math.pi else cos - m * math.sin(m)
            out[i, c] = s * cos
    return out


def ref_loss(logits, labels, mask=None):
    """Mean over rows of −log softmax at the label, the normaliser over mask ∪ {label}."""
    total = 0.0
    for i, row in enumerate(np.asarray(logits, np.float64)):
        keep = np.ones(len(row), bool) if mask is None else np.array(mask, bool)
        keep[labels[i]] = True
        top = row[keep].max()
        total += math.log(np.exp(row[keep] - top).sum()) + top - row[labels[i]]
    return total / len(logits)


def ref_mean_loss(e, w, b, labels, head, s, m, mask=None):
    return ref_loss(ref_logits(e, w, b, labels, head, s, m), labels, mask)


def finite_difference(fn, x, h=1e-6):
    """Central differences of the scalar fn at every entry of x (float64)."""
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (fn(up) - fn(down)) / (2 * h)
    return grad


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_problem(seed, num_rows=B, num_classes=C, dim=D):
    rng = np.random.default_rng(seed)
    e = _unit(rng.normal(size=(num_rows, dim))).astype(np.float32)
    w = rng.normal(size=(num_classes, dim)).astype(np.float32)
    b = rng.normal(size=num_classes).astype(np.float32)
    labels = rng.integers(0, num_classes, num_rows).astype(np.int32)
    return e, w, b, labels


@functools.cache
def _loss_and_grads(head, s, m, with_mask):
    def loss(e, w, b, labels, mask):
        return losses.classification_loss(e, w, b if head == "softmax" else None, labels,
                                          head=head, scale=s, margin=m,
                                          class_mask=mask if with_mask else None)[0]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


# ---------------------------------------------------------------------------------------------
# values and gradients against the references

@pytest.mark.parametrize("head", HEADS)
def test_logits_match_reference_including_a_shard_offset(head):
    s, m = PARAMS[head]
    e, w, b, _ = random_problem(1, num_classes=12)
    labels = np.array([0, 3, 4, 7, 8, 11], np.int32)
    bias = b if head == "softmax" else None
    full = ref_logits(e, w, bias, labels, head, s, m)
    got = losses.class_logits(e, w, bias, labels, head=head, scale=s, margin=m)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    # A shard holding classes [4, 8): the margin lands only where the label is inside it.
    shard = losses.class_logits(e, w[4:8], None if bias is None else bias[4:8], labels,
                                head=head, scale=s, margin=m, label_offset=4)
    np.testing.assert_allclose(shard, full[:, 4:8], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("head", HEADS)
def test_loss_and_gradients_match_float64_reference(head, with_mask):
    s, m = PARAMS[head]
    e, w, b, labels = random_problem(2)
    mask = np.array([True, False, True, False, True])
    bias = b if head == "softmax" else None
    ref_mask = mask if with_mask else None
    value, (g_e, g_w, g_b) = _loss_and_grads(head, s, m, with_mask)(e, w, b, labels, mask)
    assert value == pytest.approx(ref_mean_loss(e, w, bias, labels, head, s, m, ref_mask),
                                  rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(g_e, finite_difference(
        lambda x: ref_mean_loss(x, w, bias, labels, head, s, m, ref_mask), e), atol=2e-5)
    np.testing.assert_allclose(g_w, finite_difference(
        lambda x: ref_mean_loss(e, x, bias, labels, head, s, m, ref_mask), w), atol=2e-5)
    if head == "softmax":
        np.testing.assert_allclose(g_b, finite_difference(
            lambda x: ref_mean_loss(e, w, x, labels, head, s, m, ref_mask), b), atol=2e-5)
    else:
        np.testing.assert_array_equal(g_b, 0.0)


def test_masked_classes_get_no_gradient_and_the_target_is_always_in():
    e, w, _, labels = random_problem(3)
    mask = np.zeros(C, bool)  # excludes every class, the targets included
    fn = jax.jit(jax.value_and_grad(lambda e, w: losses.classification_loss(
        e, w, None, labels, head="cosface", scale=4.0, class_mask=mask)[0], argnums=(0, 1)))
    value, (_, g_w) = fn(e, w)
    # Each row's normaliser is its target alone: loss exactly 0, and only targets' centres move.
    assert float(value) == 0.0
    np.testing.assert_array_equal(np.abs(g_w).sum(axis=1) > 0, np.zeros(C, bool))
    all_in = losses.classification_loss(e, w, None, labels, head="arcface", scale=4.0,
                                        class_mask=np.ones(C, bool))
    assert float(all_in[0]) == pytest.approx(float(losses.classification_loss(
        e, w, None, labels, head="arcface", scale=4.0)[0]), rel=1e-6)


def test_defaults_are_the_papers():
    assert losses.resolve_head("softmax") == (None, None)
    assert losses.resolve_head("normface") == (64.0, None)
    assert losses.resolve_head("cosface") == (64.0, 0.35)
    assert losses.resolve_head("arcface") == (64.0, 0.5)
    assert losses.resolve_head("arcface", 30.0, 0.3) == (30.0, 0.3)
    e, w, _, labels = random_problem(4)
    default = losses.class_logits(e, w, None, labels, head="arcface")
    explicit = losses.class_logits(e, w, None, labels, head="arcface", scale=64.0, margin=0.5)
    np.testing.assert_array_equal(default, explicit)


# ---------------------------------------------------------------------------------------------
# hand-worked two-class cases (D = 2, centres along the axes)

EYE = np.eye(2, dtype=np.float32)


def _two_class_loss(e, head, s=None, m=None, bias=None, label=0):
    return float(losses.classification_loss(np.array([e], np.float32), EYE, bias,
                                            np.array([label], np.int32), head=head, scale=s,
                                            margin=m)[0])


def test_hand_worked_two_class_cases():
    # softmax: e = (0.6, 0.8), b = (0.1, −0.1): logits (0.7, 0.7), loss ln 2.
    assert _two_class_loss((0.6, 0.8), "softmax", bias=np.array([0.1, -0.1], np.float32)) == \
        pytest.approx(math.log(2), abs=1e-6)
    # normface: e at 60° from class 0: logits 2·(1/2, √3/2); loss ln(1 + e^{√3 − 1}).
    e60 = (0.5, math.sqrt(3) / 2)
    assert _two_class_loss(e60, "normface", s=2.0) == pytest.approx(
        math.log1p(math.exp(math.sqrt(3) - 1)), abs=1e-6)
    # cosface, m = 0.5: target 2·(1/2 − 1/2) = 0, other √3: ln(1 + e^{√3}).
    assert _two_class_loss(e60, "cosface", s=2.0, m=0.5) == pytest.approx(
        math.log1p(math.exp(math.sqrt(3))), abs=1e-6)
    # arcface, m = π/6: target 2·cos(π/3 + π/6) = 0, other √3: ln(1 + e^{√3}).
    assert _two_class_loss(e60, "arcface", s=2.0, m=math.pi / 6) == pytest.approx(
        math.log1p(math.exp(math.sqrt(3))), abs=1e-6)
    # arcface past π: θ = 0.9π, m = 0.5 (θ + m ≈ 3.33 > π): target cos θ − m·sin m
    # = −0.9510565 − 0.2397128 = −1.1907693; other class at 0.9π − π/2 = 0.4π: cos 0.4π.
    theta = 0.9 * math.pi
    logits = losses.class_logits(np.array([[math.cos(theta), math.sin(theta)]], np.float32),
                                 EYE, None, np.array([0]), head="arcface", scale=1.0, margin=0.5)
    np.testing.assert_allclose(logits, [[-1.1907693, math.cos(0.4 * math.pi)]], atol=1e-6)


@pytest.mark.parametrize("margin", [0.5, 1.0, 1.5])
def test_arcface_substitute_keeps_the_target_logit_decreasing_in_theta(margin):
    thetas = np.linspace(0.0, math.pi, 721)
    e = np.stack([np.cos(thetas), np.sin(thetas)], axis=1).astype(np.float32)
    target = losses.class_logits(e, EYE, None, np.zeros(len(e), np.int32), head="arcface",
                                 scale=1.0, margin=margin)[:, 0]
    assert np.all(np.diff(np.asarray(target)) <= 1e-6)
    # Past θ = π − m, insightface's substitute cos θ − m·sin m; before, cos(θ + m).
    past = thetas >= math.pi - margin + 1e-3
    before = thetas <= math.pi - margin - 1e-3
    np.testing.assert_allclose(target[past], np.cos(thetas[past]) - margin * math.sin(margin),
                               atol=1e-6)
    np.testing.assert_allclose(target[before], np.cos(thetas[before] + margin), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the one combined margin formula behind the cosine heads

# Angles chosen off ArcFace's switch point π − m2 (1.0, 2.642 and 2.6416 for these m2).
ANGLES = np.array([0.0, math.pi / 6, math.pi / 3, math.pi / 2, 2.0, 2.9, math.pi])


def numpy_combined(theta, m2, m3):
    """insightface's s = 1 target, m1 = 1, in float64 from θ itself: cos(θ + m2) − m3, and
    past θ + m2 > π ArcFace's substitute cos θ − m2·sin m2 (minus m3)."""
    return np.where(theta + m2 <= math.pi, np.cos(theta + m2),
                    np.cos(theta) - m2 * math.sin(m2)) - m3


def test_combined_margin_matches_numpy_on_a_few_angles():
    cos = jnp.asarray(np.cos(ANGLES), jnp.float32)
    for m2, m3 in [(0.0, 0.0), (0.0, 0.35), (0.5, 0.0), (math.pi / 6, 0.0), (0.3, 0.2)]:
        np.testing.assert_allclose(losses.combined_margin(cos, m2, m3),
                                   numpy_combined(ANGLES, m2, m3), atol=2e-6,
                                   err_msg=f"m2={m2}, m3={m3}")
    # By hand: cos(π/3 + π/6) = 0; at θ = π with m2 = 0.5 the substitute −1 − 0.5·sin 0.5
    # = −1.2397128; CosFace at π/3: 1/2 − 0.35; NormFace at π/3: 1/2.
    np.testing.assert_allclose(losses.combined_margin(jnp.float32(0.5), math.pi / 6), 0.0,
                               atol=1e-6)
    np.testing.assert_allclose(losses.combined_margin(jnp.float32(-1.0), 0.5), -1.2397128,
                               atol=1e-6)
    np.testing.assert_allclose(losses.combined_margin(jnp.float32(0.5), 0.0, 0.35), 0.15,
                               atol=1e-7)
    assert float(losses.combined_margin(jnp.float32(0.5))) == 0.5


@pytest.mark.parametrize("head,m2,m3", [("normface", 0.0, 0.0), ("cosface", 0.0, 0.35),
                                        ("arcface", 0.5, 0.0)])
def test_each_cosine_head_is_the_combined_formula_at_its_margins(head, m2, m3):
    """A unit embedding at angle θ from its class centre (D = 2): the target logit is
    s·(cos(θ + m2) − m3) with the head's paper m as m2 (ArcFace) or m3 (CosFace), NormFace
    m = 0; the other class's logit s·cos of its own angle, untouched."""
    s = 3.0
    e = np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1).astype(np.float32)
    logits = np.asarray(losses.class_logits(e, EYE, None, np.zeros(len(e), np.int32),
                                            head=head, scale=s))
    np.testing.assert_allclose(logits[:, 0], s * numpy_combined(ANGLES, m2, m3), atol=1e-5)
    np.testing.assert_allclose(logits[:, 1], s * np.sin(ANGLES), atol=1e-5)
    if head == "arcface":  # both sides of the switch are exercised
        assert (ANGLES + m2 > math.pi).any() and (ANGLES + m2 < math.pi).any()


def test_unknown_head_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown classification head 'sphereface'; valid "
                                         "heads: softmax, normface, cosface, arcface"):
        losses.class_logits(np.eye(2, dtype=np.float32), EYE, None, np.zeros(2, np.int32),
                            head="sphereface")


def test_a_registered_head_needs_nothing_else():
    """Both margins at once (ArcFace's m2 and CosFace's m3 from one m), added to the registry
    only: validation, defaults and logits follow from the entry."""
    both = losses.MarginHead(default_scale=2.0, default_margin=0.2, angular=True, additive=True,
                             formula="cos(θ + m) − m")
    with losses.CLASSIFICATION_HEADS.temporary("arc_cos", both):
        assert losses.resolve_head("arc_cos") == (2.0, 0.2)
        with pytest.raises(ValueError, match="arc_cos margin must be >= 0"):
            losses.validate_classification_args("arc_cos", None, -1.0)
        e = np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1).astype(np.float32)
        logits = losses.class_logits(e, EYE, None, np.zeros(len(e), np.int32), head="arc_cos")
        np.testing.assert_allclose(logits[:, 0], 2.0 * numpy_combined(ANGLES, 0.2, 0.2),
                                   atol=1e-5)
    assert "arc_cos" not in losses.CLASSIFICATION_HEADS


# ---------------------------------------------------------------------------------------------
# θ = 0, θ = π, bfloat16, degenerate inputs

@pytest.mark.parametrize("head", HEADS)
def test_finite_values_and_gradients_at_theta_zero_and_pi(head):
    s, m = PARAMS[head]
    w = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    e = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    labels = np.array([0, 0, 1], np.int32)  # θ = 0, θ = π, θ = 0
    value, grads = _loss_and_grads(head, s, m, False)(e, w, np.zeros(3, np.float32), labels,
                                                      np.ones(3, bool))
    assert np.isfinite(float(value))
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad)))
    logits = losses.class_logits(e, w, None if head != "softmax" else np.zeros(3, np.float32),
                                 labels, head=head, scale=s, margin=m)
    if head == "arcface":  # cos(0 + m) at θ = 0; the substitute −1 − m·sin m at θ = π
        np.testing.assert_allclose(logits[[0, 1, 2], [0, 0, 1]],
                                   s * np.array([math.cos(m), -1 - m * math.sin(m),
                                                 math.cos(m)]), atol=1e-4)
    else:
        np.testing.assert_allclose(logits, ref_logits(e, w, None, labels, head, s, m),
                                   atol=1e-5)


@pytest.mark.parametrize("head", HEADS)
def test_bfloat16_inputs_give_finite_float32_close_to_float32(head):
    e, w, b, labels = random_problem(5, num_rows=16, num_classes=12, dim=8)
    bias = b if head == "softmax" else None
    f32, grads32 = _bf16_case(head)(e, w, bias, labels)
    bf16, grads16 = _bf16_case(head)(*(None if x is None else jnp.asarray(x, jnp.bfloat16)
                                       for x in (e, w, bias)), labels)
    assert bf16.dtype == jnp.float32 and np.isfinite(float(bf16))
    assert float(bf16) == pytest.approx(float(f32), rel=2e-2)
    for g16, g32 in zip(grads16, grads32):
        assert np.all(np.isfinite(np.asarray(g16, np.float32)))
        np.testing.assert_allclose(np.asarray(g16, np.float32), g32, atol=5e-2)


def _bf16_case(head):
    def loss(e, w, bias, labels):
        return losses.classification_loss(e, w, bias, labels, head=head)[0]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("head", HEADS)
def test_a_single_class_has_zero_loss_and_gradient(head):
    e, w, b, _ = random_problem(6, num_classes=1)
    labels = np.zeros(B, np.int32)
    bias = b if head == "softmax" else None
    value, grads = _loss_and_grads(head, *PARAMS[head], False)(e, w, b, labels, np.ones(1, bool))
    assert float(value) == 0.0
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)
    sums = losses.classification_loss_sums(e, w, bias, labels, head=head)
    assert float(sums["count"]) == B and float(sums["correct"]) == B


def test_bad_labels_and_shapes_are_clear_errors():
    e, w, _, labels = random_problem(7)
    with pytest.raises(ValueError, match=r"outside the classes \[0, 5\)"):
        losses.classification_loss(e, w, None, np.array([0, 1, 2, 3, 4, 5]), head="cosface")
    with pytest.raises(ValueError, match=r"outside the classes"):
        losses.classification_loss(e, w, None, np.array([-1, 1, 2, 3, 4, 0]), head="arcface")
    with pytest.raises(ValueError, match="one class id per embedding row"):
        losses.class_logits(e, w, None, labels[:3], head="normface")
    with pytest.raises(ValueError, match="integer class ids"):
        losses.class_logits(e, w, None, labels.astype(np.float32), head="normface")
    with pytest.raises(ValueError, match="same D"):
        losses.class_logits(e, w[:, :3], None, labels, head="normface")
    with pytest.raises(ValueError, match="takes no bias"):
        losses.class_logits(e, w, np.zeros(C), labels, head="arcface")
    with pytest.raises(ValueError, match=r"it must be \(5,\)"):
        losses.class_logits(e, w, np.zeros(4), labels, head="softmax")
    with pytest.raises(ValueError, match="class_mask has shape"):
        losses.softmax_cross_entropy_sums(np.zeros((B, C)), labels, class_mask=np.ones(4, bool))


def test_traced_out_of_range_labels_count_nowhere():
    """Inside jit labels cannot be checked: such a row adds nothing (documented), so the count
    falls short of the batch and the loss is the mean over the valid rows."""
    e, w, _, labels = random_problem(8)
    bad = labels.copy()
    bad[0] = C + 3
    fn = jax.jit(lambda e, w, l: losses.classification_loss_sums(e, w, None, l, head="arcface"))
    sums, valid = fn(e, w, bad), fn(e[1:], w, labels[1:])
    assert float(sums["count"]) == B - 1
    assert float(sums["loss_sum"]) == pytest.approx(float(valid["loss_sum"]), rel=1e-6)


@pytest.mark.parametrize("head,scale,margin,message", [
    ("sphereface", None, None, "unknown classification head"),
    ("softmax", 64.0, None, "has no scale or margin"),
    ("softmax", None, 0.2, "has no scale or margin"),
    ("normface", None, 0.2, "has no margin"),
    ("cosface", -1.0, None, "scale must be > 0"),
    ("cosface", 0.0, None, "scale must be > 0"),
    ("arcface", float("nan"), None, "finite number"),
    ("arcface", None, float("inf"), "finite number"),
    ("cosface", None, -0.1, "margin must be >= 0"),
    ("arcface", None, math.pi / 2, "must be < π/2"),
    ("arcface", True, None, "finite number"),
])
def test_bad_head_arguments_name_the_problem(head, scale, margin, message):
    with pytest.raises(ValueError, match=message):
        losses.validate_classification_args(head, scale, margin)


def test_split_batch_sums_give_the_full_batch_mean():
    e, w, _, labels = random_problem(9, num_rows=10)
    fn = jax.jit(lambda e, l: losses.classification_loss_sums(e, w, None, l, head="arcface",
                                                              scale=8.0))
    parts = [fn(e[:3], labels[:3]), fn(e[3:], labels[3:])]
    added = jax.tree.map(lambda a, b: a + b, *parts)
    full_loss, full_stats = losses.reduce_classification_sums(fn(e, labels))
    loss, stats = losses.reduce_classification_sums(added)
    assert float(added["count"]) == 10
    assert float(loss) == pytest.approx(float(full_loss), rel=1e-6)
    assert float(stats["accuracy"]) == float(full_stats["accuracy"])
    assert float(loss) == pytest.approx(
        ref_mean_loss(e, w, None, labels, "arcface", 8.0, 0.5), rel=1e-5)


def test_accuracy_counts_rows_whose_target_logit_is_the_largest():
    logits = np.array([[3.0, 1.0], [0.0, 2.0], [1.0, 1.0]], np.float32)
    sums = losses.softmax_cross_entropy_sums(logits, np.array([0, 0, 1]))
    assert float(sums["correct"]) == 2.0  # row 0 and the tie in row 2
    loss, stats = losses.reduce_classification_sums(sums)
    assert float(stats["accuracy"]) == pytest.approx(2 / 3)
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(2)) + math.log(2)) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# class centres sharded over 8 devices == one device holding every class

NUM_DEVICES, GLOBAL_B, GLOBAL_C, INPUT_DIM = 8, 16, 16, 5


def _objective(params, delta, x, centres, bias, labels, mask, *, head, offset, axis_name):
    """A tiny encoder (linear + L2-normalise, replicated params) and the head's loss.
    delta (zeros) is added to the embeddings so their gradient can be read off."""
    embeddings = x @ params
    embeddings = embeddings / jnp.linalg.norm(embeddings, axis=1, keepdims=True) + delta
    if axis_name is not None:
        embeddings = lax.all_gather(embeddings, axis_name, tiled=True)
        labels = lax.all_gather(labels, axis_name, tiled=True)
    s, m = PARAMS[head]
    sums = losses.classification_loss_sums(
        embeddings, centres, bias if head == "softmax" else None, labels, head=head, scale=s,
        margin=m, label_offset=offset, axis_name=axis_name, class_mask=mask)
    count = lax.stop_gradient(sums["count"])
    if axis_name is not None:
        count = lax.psum(count, axis_name)
    return sums["loss_sum"] / jnp.maximum(count, 1.0), sums


@functools.cache
def _sharded_step(head, fraction):
    mesh = parallel.make_mesh(NUM_DEVICES)
    c_local = GLOBAL_C // NUM_DEVICES

    def per_device(params, delta, x, centres, bias, labels, key):
        offset = lax.axis_index(AXIS) * c_local
        mask = None
        if fraction is not None:
            global_labels = lax.all_gather(labels, AXIS, tiled=True)
            mask = losses.partial_fc_mask(key, global_labels, GLOBAL_C, fraction,
                                          shard_start=offset, shard_size=c_local)
        grads, sums = jax.grad(_objective, argnums=(0, 1, 3, 4), has_aux=True)(
            params, delta, x, centres, bias, labels, mask, head=head, offset=offset,
            axis_name=AXIS)
        loss, stats = losses.reduce_classification_sums(lax.psum(sums, AXIS))
        g_params, g_delta, g_centres, g_bias = grads
        # The replicated encoder's gradient is the psum of the devices' (as the train step does).
        return lax.psum(g_params, AXIS), g_delta, g_centres, g_bias, loss, stats["accuracy"]

    sharded = P(AXIS)
    return parallel.shard_per_device(
        per_device, mesh, in_specs=(P(), sharded, sharded, sharded, sharded, sharded, P()),
        out_specs=(P(), sharded, sharded, sharded, P(), P()))


@functools.cache
def _one_device_step(head, fraction):
    def step(params, delta, x, centres, bias, labels, key):
        mask = None if fraction is None else losses.partial_fc_mask(key, labels, GLOBAL_C,
                                                                    fraction)
        grads, sums = jax.grad(_objective, argnums=(0, 1, 3, 4), has_aux=True)(
            params, delta, x, centres, bias, labels, mask, head=head, offset=0, axis_name=None)
        loss, stats = losses.reduce_classification_sums(sums)
        return (*grads, loss, stats["accuracy"])
    return jax.jit(step)


@pytest.mark.parametrize("fraction", [None, 0.5])
@pytest.mark.parametrize("head", HEADS)
def test_centres_sharded_over_8_devices_equal_one_device(head, fraction):
    rng = np.random.default_rng(10)
    params = rng.normal(size=(INPUT_DIM, D)).astype(np.float32)
    x = rng.normal(size=(GLOBAL_B, INPUT_DIM)).astype(np.float32)
    centres = rng.normal(size=(GLOBAL_C, D)).astype(np.float32)
    bias = rng.normal(size=GLOBAL_C).astype(np.float32)
    # 5 classes on 4 of the 8 shards, with repeats; rows 0-3 all target device 0's classes.
    labels = np.array([0, 1, 1, 0, 5, 9, 9, 15, 0, 1, 5, 15, 9, 9, 5, 0], np.int32)
    delta = np.zeros((GLOBAL_B, D), np.float32)
    key = jax.random.key(3)
    args = (params, delta, x, centres, bias, labels, key)
    got = _sharded_step(head, fraction)(*args)
    want = _one_device_step(head, fraction)(*args)
    names = ("encoder grad", "embedding grad", "centre grad", "bias grad", "loss", "accuracy")
    for name, g, w in zip(names, got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert np.abs(np.asarray(want[2])).sum() > 0
    if fraction is not None:  # the sample really dropped classes: their centres got no gradient
        mask = np.asarray(losses.partial_fc_mask(key, labels, GLOBAL_C, fraction))
        assert mask.sum() == 8
        np.testing.assert_array_equal(np.abs(np.asarray(got[2])).sum(axis=1) > 0, mask)


# ---------------------------------------------------------------------------------------------
# Partial FC's class sample

def test_partial_fc_mask_is_the_same_for_every_shard_layout():
    labels = jnp.array([3, 3, 17, 40, 41, 63, 0, 22], jnp.int32)
    key = jax.random.key(11)
    full = np.asarray(losses.partial_fc_mask(key, labels, 64, 0.25))
    for shards in (1, 2, 4, 8):
        size = 64 // shards
        pieces = [losses.partial_fc_mask(key, labels, 64, 0.25, shard_start=i * size,
                                         shard_size=size) for i in range(shards)]
        np.testing.assert_array_equal(np.concatenate(pieces), full)
    traced = jax.jit(lambda start: losses.partial_fc_mask(key, labels, 64, 0.25,
                                                          shard_start=start, shard_size=16))
    np.testing.assert_array_equal(traced(32), full[32:48])


def test_partial_fc_mask_keeps_the_batch_classes_and_the_exact_count():
    key = jax.random.key(12)
    labels = jnp.array([5, 5, 9, 2, 29], jnp.int32)
    for fraction, expected in ((0.1, 4), (0.3, 9), (0.5, 15), (0.99, 30), (1.0, 30)):
        mask = np.asarray(losses.partial_fc_mask(key, labels, 30, fraction))
        assert mask.sum() == max(expected, 4), fraction
        assert mask[[2, 5, 9, 29]].all()
    # More batch classes than the fraction allows: all of them, nothing else.
    many = jnp.arange(12, dtype=jnp.int32)
    assert np.asarray(losses.partial_fc_mask(key, many, 30, 0.1)).tolist() == [True] * 12 + \
        [False] * 18
    # Labels outside [0, C) (e.g. a padding −1) select nothing.
    mask = np.asarray(losses.partial_fc_mask(key, jnp.array([-1, 30, 7]), 30, 1 / 30))
    assert mask.tolist() == [c == 7 for c in range(30)]
    assert losses.partial_fc_num_active(30, 0.1) == 3  # 0.1·30 is 3.0000000000000004


def test_partial_fc_mask_is_deterministic_per_key_and_uniform_over_the_others():
    labels = jnp.array([0, 1], jnp.int32)
    sample = jax.jit(jax.vmap(lambda k: losses.partial_fc_mask(k, labels, 40, 0.25)))
    keys = jax.random.split(jax.random.key(13), 4000)
    masks = np.asarray(sample(keys))
    np.testing.assert_array_equal(masks[0], np.asarray(sample(keys[:1]))[0])
    assert len({m.tobytes() for m in masks[:50]}) == 50  # different keys, different samples
    assert masks[:, :2].all() and (masks.sum(axis=1) == 10).all()
    # Each of the 38 others is in 8 of 38 samples: 4000·8/38 ≈ 842 ± 26 (binomial sd); 6 sd.
    counts = masks[:, 2:].sum(axis=0)
    assert np.abs(counts - 4000 * 8 / 38).max() < 6 * math.sqrt(4000 * 8 / 38 * 30 / 38)


@pytest.mark.parametrize("kwargs,message", [
    ({"num_classes": 0, "sample_fraction": 0.5}, "num_classes must be an int >= 1"),
    ({"num_classes": 10, "sample_fraction": 0.0}, r"sample_fraction must be a number in \(0, 1\]"),
    ({"num_classes": 10, "sample_fraction": 1.5}, r"sample_fraction must be a number in \(0, 1\]"),
    ({"num_classes": 10, "sample_fraction": 0.5, "shard_size": 11}, "shard_size must be an int"),
    ({"num_classes": 10, "sample_fraction": 0.5, "shard_start": 6, "shard_size": 5},
     "overhangs"),
])
def test_partial_fc_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        losses.partial_fc_mask(jax.random.key(0), jnp.array([1, 2]), **kwargs)
