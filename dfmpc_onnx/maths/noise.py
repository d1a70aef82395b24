"""Noise inputs (spec section 4): white, 1/f^beta ("pink"), or dead leaves.

Natural images have a power spectrum close to 1/f^beta with beta about 2;
noise with that spectrum drives a CNN's channels much closer to their real
statistics than white noise does. Dead leaves (occluding disks) have that
spectrum too, and also what Gaussian noise of any spectrum lacks: flat
regions bounded by sharp edges, and colours shared across the channels.
Photographs also differ from one another in contrast and mean colour,
which noise standardised image by image lacks (``photographic_spread``).
"""

from __future__ import annotations

import numpy as np

PINK_BETA = 2.0
LEAVES = 300
"""Disks per dead-leaves image."""
LEAF_RADII = (0.02, 0.02 / np.sqrt(0.02))
"""The smallest and largest disk radius, as fractions of the image side (1/50 and about 1/7)."""
LEAF_LUMINANCE = 0.8
"""The share of a colour's variance common to all channels (a natural colour's channels move together)."""
CONTRAST_SPREAD = 1.0
"""The standard deviation of the log of an image's contrast (log-normal: photographs range from hazy to harsh)."""
MEAN_SPREAD = 0.5
"""The standard deviation of an image's mean colour per channel, before ``photographic_spread`` rescales."""


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


def dead_leaves(shape: tuple[int, ...], rng: np.random.Generator, leaves: int = LEAVES) -> np.ndarray:
    """Dead-leaves images (Lee, Mumford and Huang, 2001) of ``shape`` (N, C, H, W): ``leaves`` opaque disks of
    uniform colour dropped one over another onto a background of uniform colour. The radii have density
    proportional to r^-3 between ``LEAF_RADII`` (scale invariance, which gives the 1/f^2 spectrum); each
    colour is normal with unit variance per channel, ``LEAF_LUMINANCE`` of it common to the channels. The
    images are not standardised one by one: like photographs, each has its own mean colour and contrast."""
    count, channels, height, width = shape
    side = np.sqrt(height * width)
    low, high = LEAF_RADII
    images = np.empty(shape, dtype=np.float32)
    for n in range(count):
        colours = _leaf_colours(rng, leaves + 1, channels)
        image = np.broadcast_to(colours[0][:, None, None], (channels, height, width)).copy()
        radii = side * low / np.sqrt(rng.uniform((low / high) ** 2, 1.0, leaves))
        centres = rng.uniform(0.0, 1.0, (leaves, 2)) * (height, width)
        for radius, (y, x), colour in zip(radii, centres, colours[1:]):
            top, left = max(int(y - radius), 0), max(int(x - radius), 0)
            bottom, right = min(int(y + radius) + 1, height), min(int(x + radius) + 1, width)
            rows, cols = np.arange(top, bottom)[:, None], np.arange(left, right)[None, :]
            box = image[:, top:bottom, left:right]  # a view: writing the disk into it paints the image
            box[:, (rows - y) ** 2 + (cols - x) ** 2 < radius**2] = colour[:, None]
        images[n] = image
    return images


def _leaf_colours(rng: np.random.Generator, count: int, channels: int) -> np.ndarray:
    """``count`` colours, unit variance per channel, ``LEAF_LUMINANCE`` of it shared by the channels."""
    shared = rng.standard_normal((count, 1))
    own = rng.standard_normal((count, channels))
    return np.sqrt(LEAF_LUMINANCE) * shared + np.sqrt(1.0 - LEAF_LUMINANCE) * own


def photographic_spread(images: np.ndarray, rng: np.random.Generator, channel_axis: int = 1) -> np.ndarray:
    """Standardised ``images`` (N, ..., channels on ``channel_axis``) each given its own contrast s and mean
    colour m, as photographs have: x <- (s z + m) / sqrt(E[s^2] + E[m^2]), log s normal with standard
    deviation ``CONTRAST_SPREAD``, m normal with ``MEAN_SPREAD`` per channel (``LEAF_LUMINANCE`` of it shared
    by the channels), so that the batch keeps unit variance per channel in expectation. An input domain's
    std is a whole data set's, most of an image's pixels lie closer to its own mean, and images differ in
    how far: a model's channel statistics on such a batch mix every contrast, as on real inputs."""
    z = np.moveaxis(images, channel_axis, 1)
    count, channels, ones = z.shape[0], z.shape[1], (1,) * (z.ndim - 2)
    contrast = np.exp(CONTRAST_SPREAD * rng.standard_normal((count, 1) + ones))
    mean = MEAN_SPREAD * _leaf_colours(rng, count, channels).reshape((count, channels) + ones)
    spread = (z * contrast + mean) / np.sqrt(np.exp(2 * CONTRAST_SPREAD**2) + MEAN_SPREAD**2)
    return np.moveaxis(spread, 1, channel_axis).astype(np.float32)


def white_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def noise_batch(input_shape: list, kind: str, samples: int, seed: int) -> np.ndarray:
    """``samples`` inputs of the model's input shape (dims after the first must be static).

    ``kind`` "pink" for 1/f^beta images, "leaves" for dead leaves (both for
    rank-4 inputs; other ranks get white noise), "noise" for white Gaussian noise.
    """
    dims = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else None for d in input_shape[1:]]
    if any(d is None for d in dims):
        raise ValueError(f"input shape {input_shape} has dynamic dims after the batch dim")
    shape = (samples, *dims)
    rng = np.random.default_rng(seed)
    if kind == "pink" and len(shape) == 4:
        return pink_noise(shape, rng)
    if kind == "leaves" and len(shape) == 4:
        return dead_leaves(shape, rng)
    return white_noise(shape, rng)


def _standardise(images: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    mean = images.mean(axis=axes, keepdims=True)
    std = images.std(axis=axes, keepdims=True)
    return (images - mean) / np.where(std > 0, std, 1.0)
