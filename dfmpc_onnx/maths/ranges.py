"""Activation ranges for uniform affine quantization (``--activations``): the range estimators and the
(scale, zero point) of a B-bit unsigned grid. Values are one tensor's samples, flattened."""

from __future__ import annotations

import numpy as np

SAMPLES_PER_TENSOR = 1 << 18
"""Values of each activation kept for the percentile and MSE estimators (a random subset)."""
PERCENTILE = 99.99
CLIP_FACTORS = np.linspace(0.2, 1.0, 41)
"""Fractions of the min/max range that the MSE estimator tries."""


def affine_grid(low: float, high: float, bits: int) -> tuple[float, int]:
    """(s, z) of the unsigned grid x ~ s (q - z), q in [0, 2^B - 1], covering [low, high] and 0 exactly
    (zero padding and Relu outputs stay exact)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    levels = (1 << bits) - 1
    scale = (high - low) / levels if high > low else 1.0
    zero_point = int(np.clip(np.round(-low / scale), 0, levels))
    return scale, zero_point


def fake_quantize(values: np.ndarray, scale: float, zero_point: int, bits: int) -> np.ndarray:
    """Quantize and dequantize ``values`` on the grid (s, z) (ONNX QuantizeLinear rounds half to even)."""
    q = np.clip(np.round(values / scale) + zero_point, 0, (1 << bits) - 1)
    return (q - zero_point) * scale


def minmax_range(values: np.ndarray) -> tuple[float, float]:
    """[min x, max x]."""
    return float(values.min()), float(values.max())


def percentile_range(values: np.ndarray, percent: float = PERCENTILE) -> tuple[float, float]:
    """[the (100 - p)th, the pth percentile of x]: a few outliers do not stretch the grid."""
    low, high = np.percentile(values, [100.0 - percent, percent])
    return float(low), float(high)


def mse_range(values: np.ndarray, bits: int) -> tuple[float, float]:
    """The min/max range shrunk by the factor in ``CLIP_FACTORS`` that gives the least squared error of
    ``fake_quantize`` on ``values``."""
    low, high = minmax_range(values)
    errors = []
    for factor in CLIP_FACTORS:
        scale, zero_point = affine_grid(low * factor, high * factor, bits)
        errors.append(float(np.mean(np.square(fake_quantize(values, scale, zero_point, bits) - values))))
    best = CLIP_FACTORS[int(np.argmin(errors))]
    return low * best, high * best


def estimate_range(values: np.ndarray, estimator: str, bits: int) -> tuple[float, float]:
    """The range of ``values`` by ``estimator``: minmax, percentile or mse."""
    if estimator == "minmax":
        return minmax_range(values)
    if estimator == "percentile":
        return percentile_range(values)
    if estimator == "mse":
        return mse_range(values, bits)
    raise ValueError(f"no range estimator '{estimator}'")
