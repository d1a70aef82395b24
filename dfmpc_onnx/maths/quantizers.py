"""Weight quantizers (spec section 2): ternary (Eqs. 3-4) and DoReFa k-bit (Eq. 6).

Both work on a weight laid out as rows, one row per output channel (see
``graph.to_rows``), and return integer codes and one scale per row (or per
block of a row, ``quantize_rows``), so that the quantized weight is exactly
``codes * QuantizedWeight.entry_scales()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

TERNARY_THRESHOLD = 0.7
"""Delta = 0.7 mean(|W|) (Eq. 4, Ternary Weight Networks)."""


@dataclass(frozen=True)
class QuantizedWeight:
    """``codes * scale[:, None]`` is the quantized weight, in rows.

    ``bits`` is the scheme's bit width (2 means ternary); ``storage_bits``
    the signed integer width that holds every code.
    """

    codes: np.ndarray
    scale: np.ndarray
    bits: int
    storage_bits: int
    grid: str = "dorefa"
    """For k-bit codes: "dorefa" (Eq. 6's odd codes) or "integer" (symmetric integers, ``integer_quantize``)."""
    block: int = 0
    """Weights per scale along a row (``quantize_rows``'s ``block``): ``scale`` is rows x (row length / block);
    0: one scale per row, ``scale`` has one entry per row."""

    def entry_scales(self) -> np.ndarray:
        """The scale of every weight, rows x row length, in float32."""
        scale = self.scale.astype(np.float32)
        return np.repeat(scale, self.block, axis=1) if self.block else np.broadcast_to(scale[:, None], self.codes.shape)

    def dequantize(self) -> np.ndarray:
        """codes x scale in float32, exactly as DequantizeLinear computes it."""
        return self.codes.astype(np.float32) * self.entry_scales()

    def with_scale(self, scale: np.ndarray) -> QuantizedWeight:
        return dataclasses.replace(self, scale=np.asarray(scale, dtype=np.float64))

    def scaled(self, factor: np.ndarray) -> QuantizedWeight:
        """Every scale of row j multiplied by ``factor[j]`` (a per-channel gain: c of Eq. 7, statistics matching)."""
        return self.with_scale(self.scale * (factor[:, None] if self.block else factor))

    def sqnr_db(self, rows: np.ndarray) -> float:
        """``sqnr_db(rows, self.dequantize())``, in one pass without forming the dequantized weight for row scales."""
        if self.block:
            return sqnr_db(rows, self.dequantize())
        signal, noise = _signal_and_noise(np.ascontiguousarray(rows), self.codes, self.scale.astype(np.float32))
        return decibels(signal, noise)


def ternary_quantize(rows: np.ndarray, per_channel: bool = False) -> QuantizedWeight:
    """Ternary weights, Eqs. 3-4: What = alpha * T, T in {-1, 0, +1}.

    Delta = 0.7 mean(|W|), T = sign(W) [|W| > Delta], alpha = mean(|W| over
    |W| > Delta); per tensor (the paper) or per output channel (row).
    An all-zero tensor or row gets alpha = 0.
    """
    rows = np.ascontiguousarray(rows)
    channels, size = rows.shape
    abs_sums, _ = _row_abs_sum_and_max(rows)
    if per_channel:
        delta = TERNARY_THRESHOLD * abs_sums / max(size, 1)
    else:
        delta = np.full(channels, TERNARY_THRESHOLD * abs_sums.sum() / max(rows.size, 1))
    codes, kept_counts, kept_sums = _ternary_codes(rows, delta)
    if not per_channel:
        kept_counts, kept_sums = np.full(channels, kept_counts.sum()), np.full(channels, kept_sums.sum())
    scale = np.divide(kept_sums, kept_counts, out=np.zeros(channels), where=kept_counts > 0)
    return QuantizedWeight(codes, scale, bits=2, storage_bits=2)


def optimal_ternary_quantize(rows: np.ndarray, per_channel: bool = False) -> QuantizedWeight:
    """Ternary weights with the threshold that minimises ||alpha T - W||^2 exactly (spec section 4).

    Sorting |W| in decreasing order, keeping the n largest gives the error
    sum|W|^2 - (sum of kept |w|)^2 / n, so n maximises (sum of kept |w|)^2 / n;
    alpha is the mean of the kept |w|. Per tensor or per output channel.
    """
    w = np.abs(rows.astype(np.float64))
    groups = w if per_channel else w.reshape(1, -1)
    ordered = -np.sort(-groups, axis=1)
    kept_sums = np.cumsum(ordered, axis=1)
    counts = np.arange(1, groups.shape[1] + 1)
    best = np.argmax(kept_sums**2 / counts, axis=1)
    threshold = ordered[np.arange(len(best)), best]
    threshold = threshold[:, None] if per_channel else threshold.reshape(1, 1)
    kept = (w >= threshold) & (w > 0)
    count = kept.sum(axis=1 if per_channel else None, keepdims=True)
    total = np.where(kept, w, 0.0).sum(axis=1 if per_channel else None, keepdims=True)
    alpha = np.divide(total, count, out=np.zeros_like(total, dtype=np.float64), where=count > 0)
    codes = (np.sign(rows) * kept).astype(np.int8)
    scale = np.broadcast_to(alpha.reshape(-1), (rows.shape[0],)).copy()
    return QuantizedWeight(codes, scale, bits=2, storage_bits=2)


def dorefa_quantize(rows: np.ndarray, bits: int, per_channel: bool = False, kbit_range: str = "max",
                    taps: int = 1) -> QuantizedWeight:
    """k-bit uniform weights, Eq. 6 (DoReFa-Net):

        Q_k(W) = M (2/(2^k - 1) round((2^k - 1)(W/(2M) + 1/2)) - 1),  M = max(|W|)

    The 2^k levels are M q / (2^k - 1) for odd q in [-(2^k - 1), 2^k - 1]:
    codes are q (held in a signed (k+1)-bit type; ``emit.storage_parts`` stores
    them in k bits), scale is M / (2^k - 1).
    M is taken per tensor (the paper) or per output channel. ``kbit_range``
    "mse" replaces M = max|W| by the alpha M (alpha in [0.3, 1]) that
    minimises the squared error, clipping the few largest weights. With
    ``taps`` > 1 the grid index is rounded by ``kernel_sum_round``.
    """
    if bits < 1:
        raise ValueError(f"bit width must be at least 1, got {bits}")
    levels = 2**bits - 1
    rows = np.ascontiguousarray(rows)
    _, row_max = _row_abs_sum_and_max(rows)
    m = row_max if per_channel else np.full(rows.shape[0], row_max.max(initial=0.0))
    if kbit_range == "mse" and rows.size:
        axis = 1 if per_channel else None
        m = np.broadcast_to(mse_range(rows.astype(np.float64), m[:, None] if per_channel else m[:1, None], levels,
                                      axis).reshape(-1), m.shape).copy()
    return kbit_quantize(rows, bits, m, "dorefa", taps)


def _dorefa_steps(w: np.ndarray, m: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 6's grid index round((2^k - 1)(W/(2M) + 1/2)), clipped to [0, 2^k - 1], and M with 0 read as 1."""
    safe = np.where(m > 0, m, 1.0)
    return np.clip(np.rint(levels * (w / (2 * safe) + 0.5)), 0, levels), safe


def mse_range(w: np.ndarray, m: np.ndarray, levels: int, axis: int | None, grid: int = 36) -> np.ndarray:
    """The range alpha M, alpha on a grid in [0.3, 1], with the least squared error of Eq. 6 (per row or tensor)."""
    best, best_error = m.copy(), np.full(m.shape, np.inf)
    for alpha in np.linspace(0.3, 1.0, grid):
        trial = m * alpha
        steps, safe = _dorefa_steps(w, trial, levels)
        error = np.square(w - (2 * steps - levels) * safe / levels).sum(axis=axis, keepdims=True)
        better = error < best_error
        best, best_error = np.where(better, trial, best), np.where(better, error, best_error)
    return best


def integer_quantize(rows: np.ndarray, bits: int, per_channel: bool = False, kbit_range: str = "max",
                     taps: int = 1) -> QuantizedWeight:
    """k-bit symmetric integer weights, plain rounding as users know it (not the paper's grid):

        What = s clip(round(W / s), -L, L),  s = M / L,  L = 2^(k-1) - 1,  M = max(|W|)

    2L + 1 levels with zero among them (Eq. 6 has 2^k levels and no zero). M per tensor or per output
    channel; ``kbit_range`` "mse" takes the alpha M (alpha in [0.3, 1]) with the least squared error. With
    ``taps`` > 1 W / s is rounded by ``kernel_sum_round``.
    """
    if bits < 2:
        raise ValueError(f"bit width must be at least 2, got {bits}")
    limit = 2 ** (bits - 1) - 1
    w = np.ascontiguousarray(rows).astype(np.float64)
    _, row_max = _row_abs_sum_and_max(np.ascontiguousarray(rows))
    m = row_max if per_channel else np.full(w.shape[0], row_max.max(initial=0.0))
    if kbit_range == "mse" and w.size:
        m = _integer_mse_range(w, m, limit, per_channel)
    return kbit_quantize(w, bits, m, "integer", taps)


def kbit_quantize(rows: np.ndarray, bits: int, m: np.ndarray, grid: str = "dorefa", taps: int = 1) -> QuantizedWeight:
    """k-bit weights on ``grid`` ("dorefa": Eq. 6's odd codes; "integer": the symmetric integers) with the
    range M given per row (``m``, rows x 1 of it), rounded by ``kernel_sum_round`` over ``taps``."""
    m = np.asarray(m, dtype=np.float64)
    if grid == "integer":
        limit = 2 ** (bits - 1) - 1
        scale = np.where(m > 0, m, 1.0) / limit
        codes = kernel_sum_round(np.clip(rows / scale[:, None], -limit, limit), taps).astype(_int_type(bits))
        return QuantizedWeight(codes, np.where(m > 0, scale, 0.0), bits=bits, storage_bits=bits, grid="integer")
    levels = 2**bits - 1
    codes = np.empty(rows.shape, dtype=_int_type(bits + 1))
    if taps > 1:
        safe = np.where(m > 0, m, 1.0)[:, None]
        index = np.clip(levels * (rows.astype(np.float64) / (2 * safe) + 0.5), 0, levels)
        codes[...] = 2 * kernel_sum_round(index, taps) - levels
    else:
        _dorefa_codes(np.ascontiguousarray(rows), m, levels, codes)
    return QuantizedWeight(codes, m / levels, bits=bits, storage_bits=bits + 1)


def _integer_mse_range(w: np.ndarray, m: np.ndarray, limit: int, per_channel: bool, grid: int = 36) -> np.ndarray:
    """alpha M per row (or tensor), alpha on a grid in [0.3, 1], with the least squared error of the integer grid."""
    best, best_error = m.copy(), np.full(m.shape, np.inf)
    for alpha in np.linspace(0.3, 1.0, grid):
        scale = np.where(m > 0, m * alpha, 1.0) / limit
        error = np.square(w - np.clip(np.rint(w / scale[:, None]), -limit, limit) * scale[:, None]).sum(axis=1)
        if not per_channel:
            error = np.full(m.shape, error.sum())
        better = error < best_error
        best, best_error = np.where(better, m * alpha, best), np.where(better, error, best_error)
    return best


def quantize_rows(rows: np.ndarray, bits: int, per_channel: bool, ternary_threshold: str = "twn",
                  kbit_range: str = "max", kbit_grid: str = "dorefa", taps: int = 1, block: int = 0) -> QuantizedWeight:
    """Ternary for 2 bits (Eqs. 3-4, or the optimal threshold); for 3 bits and more DoReFa (Eq. 6) or the
    symmetric integer grid (``integer_quantize``), rounded to keep the sum of every ``taps`` consecutive
    weights of a row (``kernel_sum_round``; 1: plain rounding). With ``block`` (which divides the row
    length) every ``block`` consecutive weights of a row are quantized as a row of their own, with their
    own scale (block-wise scales, ONNX's ``block_size``); ``per_channel`` then does not apply."""
    if block:
        channels, length = rows.shape
        q = quantize_rows(rows.reshape(channels * length // block, block), bits, True, ternary_threshold,
                          kbit_range, kbit_grid, taps)
        return dataclasses.replace(q, codes=q.codes.reshape(channels, length),
                                   scale=q.scale.reshape(channels, length // block), block=block)
    if bits == 2:
        if ternary_threshold == "optimal":
            return optimal_ternary_quantize(rows, per_channel)
        return ternary_quantize(rows, per_channel)
    if kbit_grid == "integer":
        return integer_quantize(rows, bits, per_channel, kbit_range, taps)
    return dorefa_quantize(rows, bits, per_channel, kbit_range, taps)


def kernel_sum_round(x: np.ndarray, taps: int) -> np.ndarray:
    """round(x), then in each run of ``taps`` consecutive entries (one kernel's spatial taps for one input
    channel, as ``graph.to_rows`` lays out a Conv weight) the fewest entries moved one step towards x, those
    nearest a tie, until the run's sum is within 1/2 of x's sum.

    The sum of a kernel's taps is its response to a constant input (its DC gain). Rounding each tap alone
    can move it by up to taps/2 steps, and flip its sign where the taps nearly cancel, as they do in the
    edge-detecting depthwise kernels of mobile networks; this keeps it, at most one step per weight. x must
    lie within the grid's integer bounds, which the result keeps. ``taps`` <= 1: plain rounding."""
    rounded = np.rint(x)
    if taps <= 1 or x.size == 0:
        return rounded
    runs = x.reshape(-1, taps)
    q = rounded.reshape(-1, taps)
    residual = runs - q
    error = np.rint(residual.sum(axis=1))
    direction = np.sign(error)[:, None]
    order = np.argsort(-residual * direction, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(taps), order.shape), axis=1)
    return (q + (rank < np.abs(error)[:, None]) * direction).reshape(x.shape)


def _int_type(storage_bits: int) -> type:
    return np.int8 if storage_bits <= 8 else np.int16 if storage_bits <= 16 else np.int32


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|W|^2 / |W - What|^2) in dB (inf if exact)."""
    signal = float(np.sum(np.square(reference, dtype=np.float64)))
    noise = float(np.sum(np.square(reference.astype(np.float64) - approx.astype(np.float64))))
    return decibels(signal, noise)


def decibels(signal: float, noise: float) -> float:
    """10 log10(signal / noise) of two energies: inf when the noise is zero, -inf when the signal is."""
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


# Numba kernels: one pass over the weight per call, one thread per output channel (row), float64 sums;
# per-row results are combined in row order, so the result does not depend on the thread count.

@njit(cache=True, parallel=True)
def _row_abs_sum_and_max(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: sum |w| and max |w|."""
    channels, size = rows.shape
    sums = np.zeros(channels)
    maxima = np.zeros(channels)
    for j in prange(channels):
        total = 0.0
        largest = 0.0
        for k in range(size):
            a = abs(np.float64(rows[j, k]))
            total += a
            largest = max(largest, a)
        sums[j] = total
        maxima[j] = largest
    return sums, maxima


@njit(cache=True, parallel=True)
def _ternary_codes(rows: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T = sign(W) [|W| > Delta_j] (Eq. 3) and, per row, the count and sum of the kept |W|."""
    channels, size = rows.shape
    codes = np.zeros((channels, size), dtype=np.int8)
    counts = np.zeros(channels)
    sums = np.zeros(channels)
    for j in prange(channels):
        count = 0.0
        total = 0.0
        for k in range(size):
            w = np.float64(rows[j, k])
            if abs(w) > delta[j]:
                codes[j, k] = 1 if w > 0 else -1
                count += 1.0
                total += abs(w)
        counts[j] = count
        sums[j] = total
    return codes, counts, sums


@njit(cache=True, parallel=True)
def _dorefa_codes(rows: np.ndarray, m: np.ndarray, levels: int, codes: np.ndarray) -> None:
    """Eq. 6's odd codes 2 round((2^k - 1)(W/(2M_j) + 1/2)) - (2^k - 1), clipped, written into ``codes``."""
    channels, size = rows.shape
    for j in prange(channels):
        safe = m[j] if m[j] > 0 else 1.0
        for k in range(size):
            step = np.rint(levels * (np.float64(rows[j, k]) / (2 * safe) + 0.5))
            step = min(max(step, 0.0), float(levels))
            codes[j, k] = int(2 * step - levels)


@njit(cache=True, parallel=True)
def _signal_and_noise(rows: np.ndarray, codes: np.ndarray, scale: np.ndarray) -> tuple[float, float]:
    """sum W^2 and sum (W - codes scale_j)^2, with codes scale_j rounded to float32 as DequantizeLinear does."""
    channels, size = rows.shape
    signal = np.zeros(channels)
    noise = np.zeros(channels)
    for j in prange(channels):
        s = 0.0
        e = 0.0
        for k in range(size):
            w = np.float64(rows[j, k])
            q = np.float64(np.float32(codes[j, k]) * scale[j])
            s += w * w
            e += (w - q) * (w - q)
        signal[j] = s
        noise[j] = e
    return signal.sum(), noise.sum()
