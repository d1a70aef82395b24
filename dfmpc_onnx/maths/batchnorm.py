"""BatchNormalization maths: folding into the conv before it (spec section 1) and the expected input of
the next layer (Nagel et al. 2019, sec. 4.2; spec section 4)."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


def fold_batchnorm_params(
    weight: np.ndarray,
    bias: np.ndarray | None,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold y = gamma (x - mu) / sigma + beta into a conv's W and b.

    W_j <- W_j gamma_j / sigma_j,  b_j <- beta_j + (b_j - mu_j) gamma_j / sigma_j,
    sigma_j = sqrt(var_j + eps). Computed in float64, returned as float32.
    """
    sigma = np.sqrt(var.astype(np.float64) + epsilon)
    scale = gamma.astype(np.float64) / sigma
    b = np.zeros_like(scale) if bias is None else bias.astype(np.float64)
    rows = np.ascontiguousarray(weight).reshape(weight.shape[0], int(np.prod(weight.shape[1:])))
    new_weight = _scale_rows(rows, scale).reshape(weight.shape)
    new_bias = beta.astype(np.float64) + (b - mean.astype(np.float64)) * scale
    return new_weight, new_bias.astype(np.float32)


@njit(cache=True, parallel=True)
def _scale_rows(rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32(W_j scale_j), the product taken in float64: one pass, no float64 copy of the weight."""
    out = np.empty(rows.shape, dtype=np.float32)
    for j in prange(rows.shape[0]):
        for k in range(rows.shape[1]):
            out[j, k] = np.float32(np.float64(rows[j, k]) * scale[j])
    return out


def relu_mean(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """E[max(0, x)] for x ~ N(mean, std^2): mean Phi(mean/std) + std phi(mean/std) (std = 0: max(0, mean)).

    A folded BatchNorm says its conv's output channel m is about N(beta_m, gamma_m^2) on the data it saw,
    so this is E[A_m] after a Relu."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    safe = np.where(std > 0, std, 1.0)
    z = mean / safe
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z**2) / math.sqrt(2.0 * math.pi)
    return np.where(std > 0, mean * cdf + std * pdf, np.maximum(mean, 0.0))
