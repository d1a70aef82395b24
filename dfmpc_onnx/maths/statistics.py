"""Refinement maths (spec section 4): per-channel statistics matching, the ridge refit of a conv, and
BatchNorm-statistics bias correction. Arrays are NCHW-like: channels on axis 1."""

from __future__ import annotations

import numpy as np

from .quantizers import QuantizedWeight

RELATIVE_VARIANCE_FLOOR = 1e-3
"""A channel whose float or quantized variance on the synthetic inputs is below this fraction of the
layer's mean float variance is only shifted, not scaled: the inputs barely exercise it, so the ratio
of its variances says nothing about real inputs (on EfficientNet-Lite0, depthwise channels that pink
noise leaves nearly constant were scaled by 0 to 12 with a floor of 1e-8)."""

RIDGE = 1e-3
"""Ridge weight of the refit, relative to the mean diagonal of the Gram matrix."""


def channel_statistics(chunks: list[np.ndarray], axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean m and variance v over every sample and position of the chunks, in float64; the
    channels on ``axis`` (1 for a conv's NCHW, -1 for a transformer's tokens x features)."""
    sums = squares = 0.0
    count = 0
    for values in chunks:
        v = np.moveaxis(values.astype(np.float64), axis, -1).reshape(-1, values.shape[axis])
        sums = sums + v.sum(axis=0)
        squares = squares + np.square(v).sum(axis=0)
        count += v.shape[0]
    mean = sums / count
    return mean, np.maximum(squares / count - mean**2, 0.0)


def channel_affine(m_f: np.ndarray, v_f: np.ndarray, m_q: np.ndarray, v_q: np.ndarray) -> np.ndarray:
    """a_j = sqrt(v_f / v_q), and 1 where v_f or v_q is below the floor (``RELATIVE_VARIANCE_FLOOR``)."""
    floor = RELATIVE_VARIANCE_FLOOR * max(float(np.mean(v_f)), np.finfo(np.float64).tiny)
    measured = (v_q > floor) & (v_f > floor)
    return np.where(measured, np.sqrt(np.maximum(v_f, 0.0) / np.where(measured, v_q, 1.0)), 1.0)


def apply_affine(values: np.ndarray, a: np.ndarray, m_q: np.ndarray, m_f: np.ndarray, axis: int = 1) -> np.ndarray:
    """y <- a (y - m_q) + m_f per channel (on ``axis``): what the corrected layer would have output."""
    shape = [1] * values.ndim
    shape[axis] = -1
    return ((values - m_q.reshape(shape)) * a.reshape(shape) + m_f.reshape(shape)).astype(np.float32)


def fold_affine(q: QuantizedWeight, bias: np.ndarray | None, a: np.ndarray, m_q: np.ndarray,
                m_f: np.ndarray) -> tuple[QuantizedWeight, np.ndarray]:
    """The conv (q, bias) followed by y <- a (y - m_q) + m_f: scales a_j s_j, bias a_j (b_j - m_q_j) + m_f_j.
    The integer codes do not change."""
    b = np.zeros_like(a) if bias is None else bias.astype(np.float64)
    new_bias = a * (b - m_q) + m_f
    return q.scaled(a), new_bias.astype(np.float32)


def im2col(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int], pads: list[int],
           dilations: tuple[int, int] = (1, 1)) -> np.ndarray:
    """(N, C, H, W) -> (N * Ho * Wo, C * kh * kw): the rows a 2-D convolution multiplies by its weight."""
    kh, kw = kernel
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = (dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    n, c, ho, wo = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def ridge_refit(inputs: list[np.ndarray], outputs: list[np.ndarray], weight: np.ndarray, bias: np.ndarray | None,
                strides: tuple[int, int], pads: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The 2-D conv (weight rows, bias) that best maps ``inputs`` to ``outputs`` (chunks of NCHW arrays):

        min ||X [W b]^T - Y||^2 + r ||[W b] - [W0 b0]||^2,   r = RIDGE trace(X^T X) / size,

    X the im2col rows with a ones column, [W0 b0] the float conv: a full-matrix generalisation of c (Eq. 7).
    Returned in float32, the weight as (output channels, fan-in) rows."""
    out_channels, kernel = weight.shape[0], tuple(weight.shape[2:])
    size = int(np.prod(weight.shape[1:])) + 1
    gram = np.zeros((size, size))
    cross = np.zeros((size, out_channels))
    for x, y in zip(inputs, outputs):
        rows = im2col(x.astype(np.float64), kernel, strides, pads)
        rows = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
        target = y.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, out_channels)
        gram += rows.T @ rows
        cross += rows.T @ target
    prior = np.concatenate([weight.reshape(out_channels, -1).astype(np.float64),
                            (np.zeros(out_channels) if bias is None else bias)[:, None]], axis=1)
    ridge = RIDGE * np.trace(gram) / size
    solution = np.linalg.solve(gram + ridge * np.eye(size), cross + ridge * prior.T).T
    return solution[:, :-1].astype(np.float32), solution[:, -1].astype(np.float32)


def expected_output_error(error: np.ndarray, input_mean: np.ndarray, group: int | None) -> np.ndarray | None:
    """sum_m (sum over the kernel of (What - W)[j, m]) E[A_m] per output channel j (spec section 4).

    ``error`` is What - W: a conv weight (out, in per group, ...) when ``group`` is given, else an
    (out, in) matrix whose input features come in equal blocks per channel of ``input_mean``; None
    when the features do not divide into such blocks."""
    if group is not None:
        per_channel = error.reshape(error.shape[0], error.shape[1], -1).sum(axis=2)  # (out, in per group)
        per_group_out = error.shape[0] // group
        means = input_mean.reshape(group, -1)
        return np.concatenate([per_channel[g * per_group_out:(g + 1) * per_group_out] @ means[g]
                               for g in range(group)])
    block = error.shape[1] // input_mean.size
    if block * input_mean.size != error.shape[1]:
        return None
    return error @ np.repeat(input_mean, block)
