import numpy as np
import pytest

from dfmpc_onnx.maths.compensation import solve_compensation
from dfmpc_onnx.maths.quantizers import ternary_quantize


def surrogate_loss(c, w, what, b, lambda1, lambda2):
    """L_j(c) of spec section 3, for one channel."""
    return np.sum((c * what - w) ** 2) + lambda1 * (c - 1) ** 2 * b**2 + lambda2 * c**2


@pytest.mark.parametrize("lambda1,lambda2", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.01), (2.0, 0.3)])
def test_closed_form_minimises_the_surrogate(lambda1, lambda2):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 27))
    what = ternary_quantize(w).dequantize().astype(np.float64)
    b = rng.normal(size=16)
    c = solve_compensation(w, what, b, lambda1, lambda2)
    grid = np.linspace(0, 3, 3001)
    for j in range(16):
        losses = [surrogate_loss(g, w[j], what[j], b[j], lambda1, lambda2) for g in grid]
        assert surrogate_loss(c[j], w[j], what[j], b[j], lambda1, lambda2) <= min(losses) + 1e-9
        assert c[j] >= 0


def test_least_squares_scale_without_regularisation():
    w = np.array([[1.0, 2.0, 3.0]])
    what = np.array([[1.0, 1.0, 1.0]])
    c = solve_compensation(w, what, None, 0.0, 0.0)
    assert c[0] == pytest.approx(2.0)


def test_negative_correlation_clamps_to_zero():
    c = solve_compensation(np.array([[1.0, 1.0]]), np.array([[-1.0, -1.0]]), np.zeros(1), 0.5, 0.0)
    assert c[0] == 0.0


def test_zero_channels_are_guarded():
    w = np.zeros((3, 4))
    what = np.zeros((3, 4))
    b = np.array([0.0, 1.5, -2.0])
    c = solve_compensation(w, what, b, 0.5, 0.0)
    np.testing.assert_array_equal(c, [0.0, 1.0, 1.0])
    c = solve_compensation(w, what, b, 0.0, 0.0)
    assert np.all(np.isfinite(c))
    np.testing.assert_array_equal(c, [0.0, 1.0, 1.0])


def test_rejects_negative_lambdas():
    with pytest.raises(ValueError):
        solve_compensation(np.ones((1, 2)), np.ones((1, 2)), None, -1.0, 0.0)
