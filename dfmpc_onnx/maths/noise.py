"""Noise inputs (spec section 4): white, or 1/f^beta ("pink").

Natural images have a power spectrum close to 1/f^beta with beta about 2;
noise with that spectrum drives a CNN's channels much closer to their real
statistics than white noise does.
"""

from __future__ import annotations

import numpy as np

PINK_BETA = 2.0


def pink_noise(shape: tuple[int, ...], rng: np.random.Generator, beta: float = PINK_BETA) -> np.ndarray:
    """Noise whose 2-D power spectrum falls as 1/f^beta over the last two axes,
    standardised to zero mean and unit variance per image and channel."""
    *lead, height, width = shape
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    frequency = np.sqrt(fx**2 + fy**2)
    frequency[0, 0] = 1.0 / max(height, width)
    amplitude = frequency ** (-beta / 2.0)
    spectrum_shape = (*lead, height, width // 2 + 1)
    spectrum = (rng.standard_normal(spectrum_shape) + 1j * rng.standard_normal(spectrum_shape)) * amplitude
    images = np.fft.irfft2(spectrum, s=(height, width))
    return _standardise(images).astype(np.float32)


def white_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def noise_batch(input_shape: list, kind: str, samples: int, seed: int) -> np.ndarray:
    """``samples`` inputs of the model's input shape (dims after the first must be static).

    ``kind`` "pink" for 1/f^beta images (rank-4 inputs; other ranks get white
    noise), "noise" for white Gaussian noise.
    """
    dims = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else None for d in input_shape[1:]]
    if any(d is None for d in dims):
        raise ValueError(f"input shape {input_shape} has dynamic dims after the batch dim")
    shape = (samples, *dims)
    rng = np.random.default_rng(seed)
    if kind == "pink" and len(shape) == 4:
        return pink_noise(shape, rng)
    return white_noise(shape, rng)


def _standardise(images: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    mean = images.mean(axis=axes, keepdims=True)
    std = images.std(axis=axes, keepdims=True)
    return (images - mean) / np.where(std > 0, std, 1.0)
