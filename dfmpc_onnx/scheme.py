"""A fixed bit-width scheme, ``LOW/HIGH`` (``--scheme``)."""

from __future__ import annotations

from dataclasses import dataclass

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
