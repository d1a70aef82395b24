"""Rounding with error feedback: GPTQ (Frantar et al., 2023), after Optimal Brain Quantization.

A layer computes y = W x. With H = sum over the inputs of x x^T (for a conv, x is one input patch), the
output error of a quantized W^ is sum ||(W - W^) x||^2 = tr((W - W^) H (W - W^)^T). Rounding the
columns of W one at a time, the error e_j = w_j - w^_j of column j is best absorbed by the columns not
yet rounded: with U the upper Cholesky factor of H^-1 (rows and columns in the rounding order),

    W[:, j+1:] <- W[:, j+1:] - (e_j / U_jj) U_j,j+1:

and the next column is rounded from the updated weights. The scale (the grid) of every row is kept,
so only the integer codes change. Columns are taken in decreasing order of H_jj (the inputs that carry
the most energy first), and H is damped by 1 % of its mean diagonal, both as GPTQ does.
"""

from __future__ import annotations

import numpy as np

from .quantizers import QuantizedWeight, kbit_quantize
from .statistics import im2col

DAMPING = 0.01
"""Added to H's diagonal, as a fraction of its mean diagonal (GPTQ's default, for real or distilled inputs)."""
NOISE_DAMPING = 0.1
"""The damping for H measured on noise (pink, dead leaves): a rougher stand-in for the real inputs' covariance,
so the rounding leans further towards plain rounding (H's diagonal). Measured (README, "Vision transformers"):
the ViT at 4 bits 26.7 dB against 23.9 with GPTQ's 0.01."""
BLOCK = 128
"""Columns rounded between two matrix updates of the rest (GPTQ's lazy batch: same result, fewer passes)."""
RANGE_FRACTIONS = np.linspace(0.4, 1.0, 25)
"""The fractions alpha of max|w| that ``output_fitted`` tries as a row's range M (``--kbit-range output``)."""


def code_levels(q: QuantizedWeight) -> np.ndarray:
    """The integer codes ``q``'s grid allows, ascending: ternary {-1, 0, 1} (Eq. 3), DoReFa's odd
    q in [-(2^k - 1), 2^k - 1] (Eq. 6), or the symmetric integers of the ``integer`` grid."""
    if q.bits == 2:
        return np.array([-1.0, 0.0, 1.0])
    if q.grid == "integer":
        top = 2 ** (q.bits - 1) - 1
        return np.arange(-top, top + 1, dtype=np.float64)
    top = 2**q.bits - 1
    return np.arange(-top, top + 1, 2, dtype=np.float64)


def nearest_level(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Each entry of ``x`` replaced by the nearest of ``levels`` (ascending; ties go down)."""
    index = np.clip(np.searchsorted(levels, x), 1, len(levels) - 1)
    below, above = levels[index - 1], levels[index]
    return np.where(x - below <= above - x, below, above)


def feedback_codes(rows: np.ndarray, hessian: np.ndarray, scale: np.ndarray, levels: np.ndarray,
                   damping: float = DAMPING) -> np.ndarray:
    """Codes for ``rows`` (out x d) on the grid ``levels`` x ``scale`` (one per weight, out x d:
    ``QuantizedWeight.entry_scales``), each column rounded after the errors of the columns before it were
    fed back through ``hessian`` (d x d, sum of x x^T), damped by ``damping`` of its mean diagonal."""
    d = rows.shape[1]
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0  # inputs that are always zero: any code is as good, round them plainly
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = rows.astype(np.float64)[:, order], h[np.ix_(order, order)]
    h[np.diag_indices(d)] += damping * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    step = np.where(scale > 0, scale, 1.0).astype(np.float64)[:, order]
    codes = np.empty_like(w)
    for start in range(0, d, BLOCK):
        stop = min(start + BLOCK, d)
        block, errors = w[:, start:stop].copy(), np.empty((w.shape[0], stop - start))
        for i in range(stop - start):
            j = start + i
            codes[:, j] = nearest_level(block[:, i] / step[:, j], levels)
            errors[:, i] = (block[:, i] - codes[:, j] * step[:, j]) / u[j, j]
            block[:, i:] -= np.outer(errors[:, i], u[j, j:stop])
        w[:, stop:] -= errors @ u[start:stop, stop:]
    result = np.empty_like(codes)
    result[:, order] = codes
    return result


def patch_covariance(x: np.ndarray, kernel: tuple[int, int], pads: tuple[int, int, int, int],
                     strides: tuple[int, int], dilations: tuple[int, int], group: int) -> list[np.ndarray]:
    """H = sum of p p^T over every input patch p of a 2-D conv with input ``x`` (N, C, H, W), one matrix
    per group, of side C/group x kh x kw in the order of the weight's rows (``graph.to_rows``)."""
    patches = im2col(x, kernel, strides, list(pads), dilations)
    side = patches.shape[1] // group
    grouped = patches.reshape(-1, group, side).transpose(1, 2, 0).astype(np.float64)
    return list(grouped @ grouped.transpose(0, 2, 1))


def feature_covariance(x: np.ndarray) -> list[np.ndarray]:
    """H = sum of x x^T over every row of the features ``x`` (..., d) of a Gemm or MatMul."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return [flat.T @ flat]


def output_errors(rows: np.ndarray, dequantized: np.ndarray, hessians: list[np.ndarray]) -> np.ndarray:
    """Each row's output error (w - w^) H (w - w^)^T, H the covariance of its group's input (rows split
    evenly over ``hessians``, as ``graph.to_rows`` lays out a grouped conv)."""
    error = rows.astype(np.float64) - dequantized
    return np.concatenate([np.sum((error[rows_of] @ h) * error[rows_of], axis=1)
                           for rows_of, h in zip(group_rows(rows.shape[0], len(hessians)), hessians)])


def group_rows(rows: int, groups: int) -> list[slice]:
    """The rows of each group when ``rows`` output channels are split evenly over ``groups`` (ONNX's grouped
    conv layout, as ``graph.to_rows`` keeps it)."""
    size = rows // groups
    return [slice(g * size, (g + 1) * size) for g in range(groups)]


def output_fitted(rows: np.ndarray, bits: int, grids: tuple[str, ...], fractions: np.ndarray, per_channel: bool,
                  hessians: list[np.ndarray], taps: int = 1) -> QuantizedWeight:
    """k-bit weights whose grid (one of ``grids``, for the whole layer) and range M = alpha max|w| (alpha
    one of ``fractions``, per row, or one for all rows when not ``per_channel``) give the least output
    error sum (w - w^) H (w - w^)^T on the layer's inputs (``output_errors``), rather than the least
    weight error: an input direction that carries much energy weighs in as much as it moves the output."""
    largest = np.abs(rows).max(axis=1).astype(np.float64)
    if not per_channel:
        largest = np.full_like(largest, largest.max(initial=0.0))
    best, best_total = None, np.inf
    for grid in grids:
        fitted, errors = None, np.full(rows.shape[0], np.inf)
        for alpha in fractions:
            q = kbit_quantize(rows, bits, largest * alpha, grid, taps)
            trial = output_errors(rows, q.dequantize().astype(np.float64), hessians)
            if not per_channel:
                trial = np.full_like(trial, trial.sum())
            better = trial < errors
            if fitted is None:
                fitted = q
            else:
                fitted.codes[better], fitted.scale[better] = q.codes[better], q.scale[better]
            errors = np.where(better, trial, errors)
        if errors.sum() < best_total:
            best, best_total = fitted, float(errors.sum())
    return best
