import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dfmpc_onnx.maths.quantizers import dorefa_quantize, kernel_sum_round, quantize_rows, sqnr_db, ternary_quantize

finite = st.floats(min_value=-10, max_value=10, allow_nan=False, width=32)
weights = arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 20)), elements=finite)


@given(weights, st.booleans())
def test_ternary_has_three_levels_per_channel(w, per_channel):
    q = ternary_quantize(w, per_channel)
    assert set(np.unique(q.codes)) <= {-1, 0, 1}
    values = q.dequantize()
    for row in values:
        assert len(np.unique(row)) <= 3
    assert np.all(np.sign(values) * np.sign(w) >= 0)  # never flips a sign


@given(weights, st.booleans())
def test_ternary_matches_eqs_3_4(w, per_channel):
    q = ternary_quantize(w, per_channel)
    a = np.abs(w.astype(np.float64))
    groups = a if per_channel else a.reshape(1, -1)
    codes = q.codes if per_channel else q.codes.reshape(1, -1)
    for row, code, alpha in zip(groups, codes, q.scale if per_channel else q.scale[:1]):
        delta = 0.7 * row.mean()
        assert np.array_equal(code != 0, row > delta)
        expected = row[row > delta].mean() if np.any(row > delta) else 0.0
        assert alpha == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(weights, st.integers(3, 8), st.booleans())
def test_dorefa_levels_and_error_bound(w, bits, per_channel):
    q = dorefa_quantize(w, bits, per_channel)
    levels = 2**bits - 1
    assert np.all(np.abs(q.codes) <= levels) and np.all(q.codes % 2 == 1)  # odd codes, zero is not a level
    assert q.storage_bits == bits + 1
    values = q.dequantize()
    groups = [values] if not per_channel else list(values)
    for g in groups:
        assert len(np.unique(g)) <= 2**bits
    m = np.abs(w).max(axis=1 if per_channel else None, keepdims=per_channel)
    step = 2 * m / levels  # distance between adjacent levels
    assert np.all(np.abs(values - w) <= step / 2 + 1e-6 * (1 + np.abs(w)))


@given(weights, st.integers(3, 8), st.booleans())
@settings(max_examples=50)
def test_dorefa_is_idempotent(w, bits, per_channel):
    once = dorefa_quantize(w, bits, per_channel).dequantize()
    twice = dorefa_quantize(once, bits, per_channel).dequantize()
    np.testing.assert_allclose(twice, once, rtol=1e-5, atol=1e-7)


@given(weights, st.booleans())
@settings(max_examples=50)
def test_ternary_is_idempotent(w, per_channel):
    once = ternary_quantize(w, per_channel).dequantize()
    twice = ternary_quantize(once, per_channel).dequantize()
    np.testing.assert_allclose(twice, once, rtol=1e-5, atol=1e-7)


def test_zero_weights_do_not_divide_by_zero():
    zeros = np.zeros((4, 9), np.float32)
    for q in (ternary_quantize(zeros), ternary_quantize(zeros, True), dorefa_quantize(zeros, 6),
              dorefa_quantize(zeros, 6, True)):
        assert np.all(np.isfinite(q.scale))
        assert np.all(q.dequantize() == 0)


def test_dorefa_extremes_hit_the_outer_levels():
    w = np.array([[-2.0, -1.0, 0.0, 1.0, 2.0]], np.float32)
    q = dorefa_quantize(w, 3)
    assert q.codes[0, 0] == -7 and q.codes[0, -1] == 7
    np.testing.assert_allclose(q.dequantize()[0, [0, -1]], [-2.0, 2.0])


def test_quantize_rows_dispatches_by_bits():
    w = np.random.default_rng(0).normal(size=(3, 27)).astype(np.float32)
    assert quantize_rows(w, 2, False).storage_bits == 2
    assert quantize_rows(w, 6, False).storage_bits == 7


def test_sqnr():
    w = np.ones(4)
    assert sqnr_db(w, w) == float("inf")
    assert sqnr_db(w, w * 0.9) == pytest.approx(20.0)


@given(weights, st.booleans())
@settings(max_examples=60)
def test_optimal_ternary_is_no_worse_than_twn_and_beats_every_threshold(w, per_channel):
    from dfmpc_onnx.maths.quantizers import optimal_ternary_quantize
    best = optimal_ternary_quantize(w, per_channel)
    assert set(np.unique(best.codes)) <= {-1, 0, 1}
    error = lambda q: np.sum((q.dequantize().astype(np.float64) - w) ** 2, axis=1 if per_channel else None)
    assert np.all(error(best) <= error(ternary_quantize(w, per_channel)) + 1e-6 * (1 + np.sum(w.astype(np.float64) ** 2)))
    # brute force over every threshold of one group
    group = np.abs(w[0] if per_channel else w.ravel()).astype(np.float64)
    brute = min(np.sum(group**2) - (np.sum(group[group >= t]) ** 2 / np.sum(group >= t)) for t in group if t > 0) \
        if np.any(group > 0) else 0.0
    got = error(best)[0] if per_channel else error(best)
    assert got <= brute + 1e-6 * (1 + np.sum(group**2))


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 8), st.booleans(), st.integers(0, 2**16))
def test_mse_range_never_has_more_error_than_max_range(bits, per_channel, seed):
    w = np.random.default_rng(seed).standard_t(3, size=(6, 40)).astype(np.float32)
    plain = dorefa_quantize(w, bits, per_channel)
    clipped = dorefa_quantize(w, bits, per_channel, "mse")
    error = lambda q: np.square(w - q.dequantize()).sum(axis=1 if per_channel else None)
    assert np.all(error(clipped) <= error(plain) * (1 + 1e-9) + 1e-12)
    assert len(np.unique(clipped.codes)) <= 2**bits


@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.sampled_from([1, 2, 9, 25]), st.integers(1, 4)),
              elements=st.floats(-7, 7, allow_nan=False)))
@settings(max_examples=80, deadline=None)
def test_kernel_sum_round_keeps_each_kernel_sum(x):
    rows, taps, inputs = x.shape
    x = x.transpose(0, 2, 1).reshape(rows, inputs * taps)  # each input channel's taps consecutive, as to_rows
    q = kernel_sum_round(x, taps)
    assert np.array_equal(q, np.rint(q)) and q.min() >= -7 and q.max() <= 7  # integers within the grid
    assert np.all(np.abs(q - x) < 1 + 1e-9)  # at most one step from x
    assert np.all(np.abs((q - x).reshape(-1, taps).sum(axis=1)) <= 0.5 + 1e-9)
    moved = np.sum(q != np.rint(x))
    assert moved <= np.sum(np.abs(np.rint((np.rint(x) - x).reshape(-1, taps).sum(axis=1))))  # the fewest moves
    if taps == 1:
        assert np.array_equal(q, np.rint(x))


def test_kernel_sum_rounding_keeps_a_near_cancelling_kernel_sign():
    """A depthwise edge kernel whose taps nearly cancel (EfficientNet-Lite0's second depthwise conv holds
    one): rounding each tap flips the sign of its sum; the kernel-sum rounding keeps it."""
    kernel = np.array([[0.1258, 15.671, -1.357, -5.470, 0.2227, 0.9468, -2.290, -7.853, 0.4278]])
    for grid in ("integer", "dorefa"):
        nearest = quantize_rows(kernel, 6, True, kbit_grid=grid).dequantize().sum()
        kept = quantize_rows(kernel, 6, True, kbit_grid=grid, taps=9).dequantize().sum()
        assert abs(kept - kernel.sum()) < abs(nearest - kernel.sum())
        assert np.sign(kept) == np.sign(kernel.sum())
