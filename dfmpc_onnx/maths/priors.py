"""Image priors for inputs synthesised without BatchNorm statistics (DeepInversion, Yin et al. 2020;
SynQ's low-pass filter, seed 004): smoothness and size penalties and a low-pass projection."""

from __future__ import annotations

import numpy as np


def total_variation(x: np.ndarray) -> tuple[float, np.ndarray]:
    """TV(x) = sum of squared differences of horizontally and vertically adjacent pixels (the last two
    axes), per sample summed, divided by the batch size; and its gradient."""
    dh = x[..., 1:, :] - x[..., :-1, :]
    dw = x[..., :, 1:] - x[..., :, :-1]
    n = x.shape[0]
    gradient = np.zeros_like(x)
    gradient[..., 1:, :] += 2 * dh
    gradient[..., :-1, :] -= 2 * dh
    gradient[..., :, 1:] += 2 * dw
    gradient[..., :, :-1] -= 2 * dw
    return float((np.sum(dh * dh) + np.sum(dw * dw)) / n), gradient / n


def squared_norm(x: np.ndarray) -> tuple[float, np.ndarray]:
    """||x||^2 per sample, averaged over the batch, and its gradient."""
    n = x.shape[0]
    return float(np.sum(x * x) / n), 2 * x / n


def low_pass(x: np.ndarray, cutoff: float) -> np.ndarray:
    """``x`` with every spatial frequency above ``cutoff`` (cycles per pixel, at most 0.5) removed."""
    height, width = x.shape[-2:]
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    keep = np.sqrt(fx**2 + fy**2) <= cutoff
    return np.fft.irfft2(np.fft.rfft2(x) * keep, s=(height, width)).astype(x.dtype)
