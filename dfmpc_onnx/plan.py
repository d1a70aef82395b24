"""The bit-width plan: which layer gets which bit width, and the quantized result per layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Layer
from .pairs import Pair
from .quantizers import QuantizedWeight

MAX_BITS = 16


@dataclass(frozen=True)
class Scheme:
    """``LOW/HIGH``: pair producers get LOW bits (2 = ternary), consumers and unpaired layers HIGH."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> Scheme:
        parts = str(text).split("/")
        try:
            low, high = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
        except ValueError:
            raise ValueError(f"scheme '{text}' is not LOW/HIGH, e.g. 2/6") from None
        if not 2 <= low <= high <= MAX_BITS:
            raise ValueError(f"scheme '{text}' needs 2 <= LOW <= HIGH <= {MAX_BITS}")
        return cls(low, high)

    def __str__(self) -> str:
        return f"{self.low}/{self.high}"


@dataclass(frozen=True)
class QuantizedLayer:
    """One layer's outcome: role ``low`` (pair producer), ``high`` (pair consumer) or ``kept``
    (in no pair, at HIGH bits); ``quantized`` is before compensation, ``compensation``
    the producer's c (Eq. 7), None for other roles; ``refined`` the (codes and scales,
    bias) after the refinement stage, None when there was none."""

    layer: Layer
    role: str
    partner: str | None
    quantized: QuantizedWeight
    compensation: np.ndarray | None = None
    refined: tuple[QuantizedWeight, np.ndarray | None] | None = None


def assign_roles(layer_names: list[str], pairs: tuple[Pair, ...]) -> dict[str, tuple[str, str | None]]:
    """(role, partner) for every layer name: producers low, consumers high, the rest kept.

    A consumer fed by several producers through a Concat names them all, comma-separated.
    """
    roles: dict[str, tuple[str, str | None]] = {name: ("kept", None) for name in layer_names}
    for pair in pairs:
        roles[pair.producer] = ("low", pair.consumer)
        earlier = roles[pair.consumer][1] if roles[pair.consumer][0] == "high" else None
        roles[pair.consumer] = ("high", f"{earlier}, {pair.producer}" if earlier else pair.producer)
    return roles
