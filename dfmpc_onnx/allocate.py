"""``--target-bits B``: bit widths per pair and per unpaired layer, chosen for an average budget.

In the spirit of the retraining-free mixed-precision search (seed 002), the
choice is made by inference alone: each unit (a consumer with its pair
producers, or an unpaired layer) is quantized at each of its options on
its own, the rest of the model float, and the output noise it causes on the
synthetic inputs is measured (``sensitivity.OutputProbe``). Treating the
noises as additive, a greedy search starts every unit at its widest option
and repeatedly takes the narrowing that costs the least noise per stored bit
saved, until the average stored bits per weight reach the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from .pairs import Pair

WIDTHS = (2, 4, 6, 8)
"""Bit widths the search uses: 3 and 5 bits are stored in 4 and 6 (``emit.storage_parts``), so never cheaper."""


@dataclass(frozen=True)
class Unit:
    """Layers whose widths are chosen together: (producers, consumer) of one consumer's pairs, or one layer."""

    producers: tuple[str, ...]
    consumer: str

    @property
    def layers(self) -> tuple[str, ...]:
        return self.producers + (self.consumer,)

    def options(self) -> list[tuple[int, int]]:
        """(producer bits, consumer bits): every LOW <= HIGH from ``WIDTHS`` for pairs, (b, b) for an
        unpaired layer at b bits."""
        if not self.producers:
            return [(b, b) for b in WIDTHS]
        return [(low, high) for low in WIDTHS for high in WIDTHS if low <= high]


def make_units(layers: list[str], pairs: tuple[Pair, ...]) -> list[Unit]:
    """One unit per pair consumer (with all its producers) and one per layer in no pair, in layer order."""
    producers: dict[str, list[str]] = {}
    for pair in pairs:
        producers.setdefault(pair.consumer, []).append(pair.producer)
    paired = {p for group in producers.values() for p in group}
    return [Unit(tuple(producers.get(name, ())), name) for name in layers if name not in paired]


def unit_bits(unit: Unit, option: tuple[int, int], sizes: dict[str, int]) -> int:
    """Stored integer bits of ``unit`` at ``option`` (``sizes``: weights per layer)."""
    low, high = option
    return sum(low * sizes[p] for p in unit.producers) + high * sizes[unit.consumer]


def greedy_allocation(units: list[Unit], sizes: dict[str, int], noise: dict[tuple[int, tuple[int, int]], float],
                      target_bits: float) -> dict[int, tuple[int, int]]:
    """Unit index -> option with average stored bits per weight at most ``target_bits`` where any
    allocation reaches it (else the narrowest), by least added noise per bit saved.

    ``noise[(i, option)]`` is the output noise power of unit i alone at that option.
    """
    total_weights = sum(sizes[name] for unit in units for name in unit.layers)
    budget = target_bits * total_weights
    choice = {i: max(unit.options(), key=lambda o: (unit_bits(unit, o, sizes), o)) for i, unit in enumerate(units)}
    used = sum(unit_bits(unit, choice[i], sizes) for i, unit in enumerate(units))
    while used > budget:
        best = None
        for i, unit in enumerate(units):
            current_bits = unit_bits(unit, choice[i], sizes)
            for option in unit.options():
                saved = current_bits - unit_bits(unit, option, sizes)
                if saved <= 0:
                    continue
                cost = (noise[(i, option)] - noise[(i, choice[i])]) / saved
                key = (cost, -saved, i, option)
                if best is None or key < best[0]:
                    best = (key, i, option, saved)
        if best is None:
            break
        _, i, option, saved = best
        choice[i] = option
        used -= saved
    return _refill(units, sizes, noise, choice, budget - used)


def _refill(units: list[Unit], sizes: dict[str, int], noise: dict[tuple[int, tuple[int, int]], float],
            choice: dict[int, tuple[int, int]], spare: float) -> dict[int, tuple[int, int]]:
    """Spend what the narrowing left of the budget: widen the unit whose widening removes the most noise
    per added bit, while one fits."""
    choice = dict(choice)
    while True:
        best = None
        for i, unit in enumerate(units):
            current_bits = unit_bits(unit, choice[i], sizes)
            for option in unit.options():
                added = unit_bits(unit, option, sizes) - current_bits
                gain = noise[(i, choice[i])] - noise[(i, option)]
                if 0 < added <= spare and gain > 0:
                    key = (-gain / added, i, option)
                    if best is None or key < best[0]:
                        best = (key, i, option, added)
        if best is None:
            return choice
        _, i, option, added = best
        choice[i] = option
        spare -= added
