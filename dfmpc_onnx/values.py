"""Option values read from text: the scheme ``LOW/HIGH`` (``--scheme``), ``--protect`` and ``--input-shape``."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

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
            if len(parts) > 2:
                raise ValueError
            low, high = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
        except ValueError:
            raise ValueError(f"scheme '{text}' is not LOW/HIGH or B, e.g. 2/6 or 4") from None
        if not 2 <= low <= high <= MAX_BITS:
            raise ValueError(f"scheme '{text}' needs 2 <= LOW <= HIGH <= {MAX_BITS}")
        return cls(low, high)

    def __str__(self) -> str:
        return f"{self.low}/{self.high}"


def parse_protect(text: str) -> float | None:
    """A ``--protect`` value: a number of dB, or "off"."""
    if str(text).strip().lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--protect: '{text}' is not a number of dB or 'off'") from None


def parse_input_shape(spec: str) -> tuple[str | None, tuple[int, ...]]:
    """An ``--input-shape`` value, "1,3,224,224", "3,224,224" or "input:1,3,224,224", as (name or None, dims)."""
    name, _, dims = str(spec).rpartition(":")
    try:
        return name or None, tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"--input-shape: '{spec}' is not [NAME:]D0,D1,... with integer dims") from None
