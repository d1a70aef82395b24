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

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import Layer, from_rows
from .options import WIDTHS, Plan
from .pairs import Pair, PairSearch
from .plan import compensated, layer_compensation, quantize_layer, scheme_bits
from .progress import Console
from .sensitivity import output_probe


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


def uniform_allocations(units: list[Unit], sizes: dict[str, int], target_bits: float) -> list[dict[int, tuple[int, int]]]:
    """Every allocation that gives all units the same width (b, b) and fits the budget."""
    total = sum(sizes[name] for unit in units for name in unit.layers)
    return [{i: (b, b) for i in range(len(units))} for b in WIDTHS
            if sum(unit_bits(unit, (b, b), sizes) for unit in units) <= target_bits * total]


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


def choose_bits(graph: gs.Graph, like: onnx.ModelProto, layers: dict[str, Layer], search: PairSearch,
                inputs: np.ndarray | None, plan: Plan, console: Console) -> tuple[dict[str, int], str | None]:
    """Bits per layer: the scheme's (LOW for pair producers, HIGH for the rest), or under ``--target-bits``
    the allocation of ``allocate_bits`` and a note giving it."""
    if plan.scheme is not None:
        return scheme_bits(search, layers, plan.scheme), None
    return allocate_bits(graph, like, layers, search.pairs, inputs, plan, console)


def allocate_bits(graph: gs.Graph, like: onnx.ModelProto, layers: dict[str, Layer], pairs: tuple[Pair, ...],
                  inputs: np.ndarray, plan: Plan, console: Console) -> tuple[dict[str, int], str]:
    """``--target-bits``: bits per layer from ``greedy_allocation``, each unit's output noise measured
    alone (the paper's compensation, no refinement) on ``inputs``; the greedy choice and every uniform
    width that fits the budget are then measured together, all units at once, and the one with the least
    output noise is kept (the noises of units do not simply add: a greedy choice that looked cheap can
    cost more than one width for all). Also a note giving the allocation."""
    units = make_units(list(layers), pairs)
    sizes = {name: int(layer.weight.size) for name, layer in layers.items()}
    probe = output_probe(graph, layers, inputs, like)
    cache: dict[tuple[str, int, bool], tuple[np.ndarray, np.ndarray | None]] = {}

    def weights(name: str, b: int, with_c: bool) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """The layer at ``b`` bits as it would compute, with the producer's c when ``with_c``."""
        if (name, b, with_c) not in cache:
            layer = layers[name]
            q = quantize_layer(layer, b, plan)
            c = layer_compensation(layer, q, plan.options) if with_c and plan.options.compensate else None
            q, bias = compensated(q, layer.bias, c)
            cache[name, b, with_c] = (from_rows(q.dequantize(), layer.weight.shape, layer.out_axis), bias)
        return {name: cache[name, b, with_c]}

    def changes(i: int, option: tuple[int, int]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        found = weights(units[i].consumer, option[1], False)
        for producer in units[i].producers:
            found.update(weights(producer, option[0], True))
        return found

    noise = {}
    progress = console.progress("target bits", len(units), "units measured at each width")
    for i, unit in enumerate(units):
        for option in unit.options():
            noise[i, option] = probe.noise(changes(i, option))[1]
        progress.advance()
    budget = plan.options.target_bits
    candidates = [greedy_allocation(units, sizes, noise, budget)] + uniform_allocations(units, sizes, budget)
    joint = [probe.noise({k: v for i, option in choice.items() for k, v in changes(i, option).items()})[1]
             for choice in candidates]
    choice = candidates[int(np.argmin(joint))]
    bits = {}
    for i, unit in enumerate(units):
        bits.update({p: choice[i][0] for p in unit.producers})
        bits[unit.consumer] = choice[i][1]
    return bits, _allocation_note(units, choice, sizes, plan.options.target_bits)


def _allocation_note(units: list[Unit], choice: dict[int, tuple[int, int]], sizes: dict[str, int],
                     target_bits: float) -> str:
    average = sum(unit_bits(u, choice[i], sizes) for i, u in enumerate(units)) / sum(sizes.values())
    counts: dict[str, int] = {}
    for i, unit in enumerate(units):
        key = f"{choice[i][0]}/{choice[i][1]} pair" if unit.producers else f"{choice[i][1]}-bit layer"
        counts[key] = counts.get(key, 0) + 1
    reached = "" if average <= target_bits + 1e-9 else " (the narrowest allocation; the budget is below it)"
    return (f"--target-bits {target_bits:g}: {average:.2f} integer bits per quantized weight{reached}; "
            + ", ".join(f"{count} x {key}" for key, count in sorted(counts.items())))
