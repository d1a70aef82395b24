"""Option values read from text (the scheme ``LOW/HIGH`` of ``--scheme``, ``--protect``, ``--input-shape``,
``--scale-block``) and the facts about a model that resolve the ``auto`` options (``ModelFacts``)."""

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


def parse_scale_block(value: str | int) -> str | int:
    """--scale-block's value: "auto", 0, or a number of weights of at least 2 (as text or an int)."""
    if value == "auto":
        return value
    block = -1
    if isinstance(value, str) and value.strip().isdigit():
        block = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        block = value
    if block < 0 or block == 1:
        raise InputError(f"--scale-block takes 'auto', 0 or a number of weights of at least 2, not '{value}'")
    return block


def parse_input_shapes(value) -> tuple[tuple[str | None, tuple[int, ...]], ...]:
    """``input_shapes`` as (name or None, dims) pairs, from pairs, a dict, or --input-shape's text ("1,3,8,8",
    "x:1,3,8,8", or a list of them)."""
    entries = value.items() if isinstance(value, dict) else [value] if isinstance(value, str) else value
    try:
        return tuple(parse_input_shape(entry) if isinstance(entry, str) else (entry[0], tuple(int(d) for d in entry[1]))
                     for entry in entries)
    except (TypeError, ValueError, IndexError):
        raise InputError(f"input_shapes: {value!r} is not [NAME:]D0,D1,... text or (name, dims) pairs") from None


@dataclass(frozen=True)
class ModelFacts:
    """What the resolution of ``auto`` values needs to know about the model and the installation."""

    has_batchnorm: bool
    obstacle: str | None
    """Why the model cannot take synthetic inputs (several inputs, dynamic dims), or None."""
    classifier: bool = False
    """One output of shape (batch, classes), or (batch, classes, 1, 1) as a conv head with global pooling gives."""
    macs: float | None = None
    """Multiply-accumulates of the weighted layers per input, where the shapes say."""
    tokens: bool = False
    """Some MatMul applies a constant weight at every position of a sequence (an output of rank 3 or more): a
    transformer's linear layers."""
    images: bool = True
    """The input is a batch of images (rank 4), which pink noise and dead leaves fill (other inputs get white
    noise)."""


def undistilled(facts: ModelFacts) -> str:
    """The synthetic inputs of ``--synthetic auto`` where nothing is distilled: dead leaves for a transformer,
    else pink noise (README, "Vision transformers" and "Models without BatchNorm statistics": dead leaves lost
    on EfficientNet-Lite1/2 and the SqueezeNet)."""
    return "leaves" if facts.tokens and facts.images else "pink"
