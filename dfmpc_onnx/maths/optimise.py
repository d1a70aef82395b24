"""The Adam optimiser (Kingma and Ba 2015), as PyTorch's ``torch.optim.Adam`` computes it."""

from __future__ import annotations

import numpy as np


class Adam:
    """x <- x - lr m_hat / (sqrt(v_hat) + eps), m and v the running first and second moments of the
    gradient, m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)."""

    def __init__(self, learning_rate: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.learning_rate, self.beta1, self.beta2, self.eps = learning_rate, beta1, beta2, eps
        self.m = self.v = None
        self.t = 0

    def step(self, x: np.ndarray, gradient: np.ndarray, learning_rate: float | None = None) -> np.ndarray:
        """``x`` moved one step against ``gradient`` (float32, as the model takes it), at ``learning_rate``
        (default: the constructor's)."""
        learning_rate = self.learning_rate if learning_rate is None else learning_rate
        if self.m is None:
            self.m, self.v = np.zeros_like(x), np.zeros_like(x)
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * gradient
        self.v = self.beta2 * self.v + (1 - self.beta2) * gradient * gradient
        denominator = np.sqrt(self.v) / np.sqrt(1 - self.beta2**self.t) + self.eps
        return (x - learning_rate / (1 - self.beta1**self.t) * self.m / denominator).astype(np.float32)


def cosine_rate(learning_rate: float, step: int, steps: int) -> float:
    """The learning rate at ``step`` (0-based) of ``steps``, decayed from ``learning_rate`` to 0 on a
    half cosine."""
    return 0.5 * learning_rate * (1 + np.cos(np.pi * step / steps))
