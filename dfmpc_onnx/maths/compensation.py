"""The closed-form compensation coefficients (spec section 3, Eqs. 7-10).

For each output channel j of the low-bit producer P, with W_j and b_j its
(BatchNorm-folded) float weight row and bias and What_j its quantized row,
the data-free surrogate of the reconstruction loss (Eq. 9)

    L_j(c) = ||c What_j - W_j||^2 + lambda1 (c - 1)^2 b_j^2 + lambda2 c^2

is minimised, subject to c >= 0, by

    c_j = max(0, (<What_j, W_j> + lambda1 b_j^2) / (<What_j, What_j> + lambda1 b_j^2 + lambda2)).

The consumer C then uses Vtilde[:, j] = c_j Q_hi(V[:, j]) (Eq. 7), or,
equivalently, P's row j and bias b_j are multiplied by c_j.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def _closed_form(weight: np.ndarray, quantized: np.ndarray, bias: np.ndarray,
                 lambda1: float, lambda2: float) -> np.ndarray:
    channels, size = weight.shape
    c = np.empty(channels)
    for j in prange(channels):
        cross = 0.0
        energy = 0.0
        for k in range(size):
            q = np.float64(quantized[j, k])
            cross += q * np.float64(weight[j, k])
            energy += q * q
        theta = lambda1 * bias[j] * bias[j]
        numerator = cross + theta
        denominator = energy + theta + lambda2
        if denominator > 0.0:
            c[j] = max(0.0, numerator / denominator)
        elif bias[j] == 0.0:
            c[j] = 0.0  # What_j = 0 and b_j = 0: the channel is zero whatever c is
        else:
            c[j] = 1.0  # What_j = 0, lambda1 = lambda2 = 0: L_j is flat, keep the float bias
    return c


def solve_compensation(weight_rows: np.ndarray, quantized_rows: np.ndarray, bias: np.ndarray | None,
                       lambda1: float = 0.5, lambda2: float = 0.0) -> np.ndarray:
    """The compensation vector c (one entry per producer output channel) of the closed form above.

    ``weight_rows`` is W and ``quantized_rows`` What, both (channels, fan-in);
    ``bias`` is b (None means zero). lambda1 = 0.5, lambda2 = 0 are the
    paper's best values (ResNet-56, CIFAR-10).
    """
    if lambda1 < 0 or lambda2 < 0:
        raise ValueError("lambda1 and lambda2 must be non-negative")
    w = np.ascontiguousarray(weight_rows)  # float32 or float64; the kernel sums in float64 without a copy
    q = np.ascontiguousarray(quantized_rows)
    b = np.zeros(w.shape[0]) if bias is None else np.ascontiguousarray(bias, dtype=np.float64)
    return _closed_form(w, q, b, float(lambda1), float(lambda2))
