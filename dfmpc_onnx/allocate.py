"""``--target-bits B``: bit widths per pair and per unpaired layer, chosen for an average budget.

In the spirit of the retraining-free mixed-precision search (seed 002), the
choice is made by inference alone: each unit (a consumer with its pair
producers, or an unpaired layer) is quantized at each of its options on
its own, the rest of the model float, and how far it moves the output on the
synthetic inputs is measured (``sensitivity.OutputProbe.damage``: the KL
divergence of a classifier's softmax, else the output noise). Where the
refinement will match channel means, each layer's mean shift on the probe's
inputs is taken out of its bias first: what the probe then measures is the
error the refinement leaves (``UnitWeights``). Treating the
damages as additive, a greedy search starts every unit at its widest option
and repeatedly takes the narrowing that costs the least damage per stored bit
saved, until the average stored bits per weight reach the budget. A
layer's cost is what the file will spend on it (``storage.stored_weight_bits``:
integers and scales), so the budget is the one the file is measured by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import Layer, from_rows
from .maths.quantizers import decibels
from .options import WIDTHS, Plan
from .pairs import Pair, PairSearch
from .plan import (block_grid, compensated, layer_compensation, output_shift, quantize_layer, scale_block,
                   scheme_bits)
from .progress import Console
from .refine import matched_layers
from .sensitivity import Weights, input_means, output_probe
from .storage import shared_constant_bits, stored_weight_bits


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


Costs = dict[str, dict[int, int]]
"""Layer -> bits -> what the file spends on the layer's weight at those bits (``layer_costs``)."""


def layer_costs(layers: dict[str, Layer], units: list[Unit], plan: Plan) -> Costs:
    """Stored bits of each layer's weight at each of ``WIDTHS``, scales included. A layer's scales are per
    channel whatever its quantizer's when something rescales its channels: c on a pair producer, and
    statistics matching on the layers it matches (``refine.matched_layers``)."""
    options = plan.options
    rescaled = {p for unit in units for p in unit.producers} if options.compensate else set()
    rescaled |= set(matched_layers(layers, plan))
    blocks = {name: scale_block(layer, plan.scale_block) for name, layer in layers.items()}
    return {name: {b: stored_weight_bits(b, layer.weight.shape, layer.out_axis, name in rescaled or options.per_channel(b),
                                         plan.storage, block_grid(blocks[name], plan.grid(b)), blocks[name])
                   for b in WIDTHS}
            for name, layer in layers.items()}


def unit_bits(unit: Unit, option: tuple[int, int], costs: Costs) -> int:
    """Stored bits of ``unit`` at ``option`` (producer bits, consumer bits)."""
    low, high = option
    return sum(costs[p][low] for p in unit.producers) + costs[unit.consumer][high]


def uniform_allocations(units: list[Unit], costs: Costs, budget: float) -> list[dict[int, tuple[int, int]]]:
    """Every allocation that gives all units the same width (b, b) and fits ``budget`` (stored bits)."""
    return [{i: (b, b) for i in range(len(units))} for b in WIDTHS
            if sum(unit_bits(unit, (b, b), costs) for unit in units) <= budget]


def greedy_allocation(units: list[Unit], costs: Costs, damage: dict[tuple[int, tuple[int, int]], float],
                      budget: float) -> dict[int, tuple[int, int]]:
    """Unit index -> option with at most ``budget`` stored bits in all where any allocation reaches it
    (else the narrowest), by least added damage per bit saved.

    ``damage[(i, option)]`` is how far unit i alone at that option moves the output (``OutputProbe.damage``).
    """
    choice = {i: max(unit.options(), key=lambda o: (unit_bits(unit, o, costs), o)) for i, unit in enumerate(units)}
    used = sum(unit_bits(unit, choice[i], costs) for i, unit in enumerate(units))
    while used > budget:
        best = None
        for i, unit in enumerate(units):
            current_bits = unit_bits(unit, choice[i], costs)
            for option in unit.options():
                saved = current_bits - unit_bits(unit, option, costs)
                if saved <= 0:
                    continue
                cost = (damage[(i, option)] - damage[(i, choice[i])]) / saved
                key = (cost, -saved, i, option)
                if best is None or key < best[0]:
                    best = (key, i, option, saved)
        if best is None:
            break
        _, i, option, saved = best
        choice[i] = option
        used -= saved
    return _refill(units, costs, damage, choice, budget - used)


def knapsack_allocation(units: list[Unit], costs: Costs, damage: dict[tuple[int, tuple[int, int]], float],
                        budget: float, resolution: int = 4096) -> dict[int, tuple[int, int]]:
    """Unit index -> option with the least total damage within ``budget`` stored bits: the multiple-choice
    knapsack solved exactly by dynamic programming over the budget in ``resolution`` steps (each option's
    bits rounded up to a step, so the choice always fits); the narrowest options where nothing fits.

    Unlike ``greedy_allocation``, which may take one large narrowing that saves more than the budget needs,
    this weighs every combination of options (with the damages taken as additive)."""
    step = budget / resolution if budget > 0 else 1.0
    options = [unit.options() for unit in units]
    steps = [[int(np.ceil(unit_bits(unit, o, costs) / step - 1e-9)) for o in options[i]] for i, unit in enumerate(units)]
    best = np.zeros(resolution + 1)  # least damage of the units so far within each number of steps
    picks = []
    for i in range(len(units)):
        candidates = np.full((len(steps[i]), resolution + 1), np.inf)
        for k, (o, n) in enumerate(zip(options[i], steps[i])):
            if n <= resolution:
                candidates[k, n:] = best[:resolution + 1 - n] + damage[(i, o)]
        picks.append(np.argmin(candidates, axis=0))
        best = candidates.min(axis=0)
    if not np.isfinite(best[-1]):
        return {i: min(unit.options(), key=lambda o: (unit_bits(unit, o, costs), o)) for i, unit in enumerate(units)}
    choice, left = {}, resolution
    for i in reversed(range(len(units))):
        k = int(picks[i][left])
        choice[i] = options[i][k]
        left -= steps[i][k]
    return choice


def _refill(units: list[Unit], costs: Costs, damage: dict[tuple[int, tuple[int, int]], float],
            choice: dict[int, tuple[int, int]], spare: float) -> dict[int, tuple[int, int]]:
    """Spend what the narrowing left of the budget: widen the unit whose widening removes the most damage
    per added bit, while one fits."""
    choice = dict(choice)
    while True:
        best = None
        for i, unit in enumerate(units):
            current_bits = unit_bits(unit, choice[i], costs)
            for option in unit.options():
                added = unit_bits(unit, option, costs) - current_bits
                gain = damage[(i, choice[i])] - damage[(i, option)]
                if 0 < added <= spare and gain > 0:
                    key = (-gain / added, i, option)
                    if best is None or key < best[0]:
                        best = (key, i, option, added)
        if best is None:
            return choice
        _, i, option, added = best
        choice[i] = option
        spare -= added


class UnitWeights:
    """Each unit's layers at a width as they would compute with the paper's compensation (c on each
    producer), cached per (layer, bits). Given ``input_means`` (layer -> the mean of each input channel on the
    probe's inputs), every layer also has its bias corrected by its output's mean shift (``plan.output_shift``;
    from c times the float output on a producer), as the refinement's mean matching will correct it; else
    no refinement."""

    def __init__(self, layers: dict[str, Layer], plan: Plan, input_means: dict[str, np.ndarray] | None = None):
        self.layers, self.plan, self.input_means = layers, plan, input_means or {}
        self.cache: dict[tuple[str, int, bool], tuple[np.ndarray, np.ndarray | None]] = {}

    def layer(self, name: str, b: int, with_c: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Layer ``name`` at ``b`` bits, with the producer's c when ``with_c``: (weight, bias)."""
        if (name, b, with_c) not in self.cache:
            layer = self.layers[name]
            q = quantize_layer(layer, b, self.plan)
            c = layer_compensation(layer, q, self.plan.options) if with_c and self.plan.options.compensate else None
            q, bias = compensated(q, layer.bias, c)
            weight = from_rows(q.dequantize(), layer.weight.shape, layer.out_axis)
            shift = self._shift(layer, weight, c) if name in self.input_means else None
            if shift is not None:
                bias = ((0.0 if bias is None else bias.astype(np.float64)) - shift).astype(np.float32)
            self.cache[name, b, with_c] = (weight, bias)
        return self.cache[name, b, with_c]

    def _shift(self, layer: Layer, weight: np.ndarray, c: np.ndarray | None) -> np.ndarray | None:
        """The mean shift of ``layer``'s output with ``weight`` from the float output, times c where c is on it
        (a producer's output is meant to be c times the float one)."""
        if c is None:
            return output_shift(layer, weight, self.input_means[layer.name])
        along = [1] * weight.ndim
        along[layer.out_axis] = -1
        shift = output_shift(layer, weight / np.where(c == 0, 1.0, c).reshape(along), self.input_means[layer.name])
        return None if shift is None else c * shift

    def unit(self, unit: Unit, option: tuple[int, int]) -> Weights:
        """Every layer of ``unit`` at ``option`` (producer bits, consumer bits)."""
        found = {unit.consumer: self.layer(unit.consumer, option[1], False)}
        found.update({p: self.layer(p, option[0], True) for p in unit.producers})
        return found

    def allocation(self, units: list[Unit], choice: dict[int, tuple[int, int]]) -> Weights:
        return {k: v for i, option in choice.items() for k, v in self.unit(units[i], option).items()}


@dataclass(frozen=True)
class Protection:
    """One pair consumer's LOW producers, measured alone: the output SQNR with them at LOW (with c) and the
    rest of the model float, and whether the unit was raised to HIGH/HIGH."""

    producers: tuple[str, ...]
    consumer: str
    sqnr_db: float
    raised: bool


def choose_bits(graph: gs.Graph, like: onnx.ModelProto, layers: dict[str, Layer], search: PairSearch,
                inputs: np.ndarray | None, plan: Plan,
                console: Console) -> tuple[dict[str, int], list[Protection], str | None]:
    """Bits per layer: the scheme's (LOW for pair producers, HIGH for the rest, with the pairs that
    ``protect_pairs`` raises at HIGH), or under ``--target-bits`` the allocation of ``allocate_bits``;
    also the protection measured and a note."""
    if plan.scheme is None:
        bits, note = allocate_bits(graph, like, layers, search.pairs, inputs, plan, console)
        return bits, [], note
    bits = scheme_bits(search, layers, plan.scheme)
    if not plan.protect or not search.pairs or inputs is None:
        return bits, [], None
    protection = protect_pairs(graph, like, layers, search.pairs, inputs, plan, console)
    for unit in protection:
        if unit.raised:
            bits.update({p: plan.scheme.high for p in unit.producers})
    return bits, protection, _protection_note(protection, plan)


def protect_pairs(graph: gs.Graph, like: onnx.ModelProto, layers: dict[str, Layer], pairs: tuple[Pair, ...],
                  inputs: np.ndarray, plan: Plan, console: Console) -> list[Protection]:
    """``--protect DB``: each pair consumer's LOW producers alone (the consumer at HIGH, every other layer
    float), scored by the output SQNR on ``inputs``; a unit below DB is raised to HIGH/HIGH when that
    scores higher. What a fixed scheme cannot carry is usually one or two pairs whose producer's error the
    consumer cannot absorb; the rest of the model keeps the scheme."""
    units = [unit for unit in make_units(list(layers), pairs) if unit.producers]
    probe = output_probe(graph, layers, inputs, like)
    weights = UnitWeights(layers, plan)
    low, high = plan.scheme.low, plan.scheme.high
    progress = console.progress("protect", len(units), "pairs measured")
    found = []
    for unit in units:
        sqnr = decibels(*probe.noise(weights.unit(unit, (low, high))))
        raised = sqnr < plan.options.protect and decibels(*probe.noise(weights.unit(unit, (high, high)))) > sqnr
        found.append(Protection(unit.producers, unit.consumer, round(sqnr, 2), raised))
        progress.advance()
    return found


def _protection_note(protection: list[Protection], plan: Plan) -> str:
    raised = [unit for unit in protection if unit.raised]
    worst = min(protection, key=lambda unit: unit.sqnr_db)
    head = (f"--protect {plan.options.protect:g}: {len(raised)} of {len(protection)} pair consumers' LOW producers "
            f"raised to {plan.scheme.high} bits")
    if raised:
        return head + ": " + ", ".join(f"{'+'.join(u.producers)} -> {u.consumer} ({u.sqnr_db:.1f} dB alone)"
                                       for u in raised)
    return head + f" (the costliest alone: {worst.sqnr_db:.1f} dB)"


def allocate_bits(graph: gs.Graph, like: onnx.ModelProto, layers: dict[str, Layer], pairs: tuple[Pair, ...],
                  inputs: np.ndarray, plan: Plan, console: Console) -> tuple[dict[str, int], str]:
    """``--target-bits``: bits per layer from ``knapsack_allocation`` or ``greedy_allocation``, each unit's
    damage measured alone (the paper's compensation, the mean shift taken out of the layers whose means the
    refinement matches, ``refine.matched_layers``, ``UnitWeights``) on ``inputs``; both choices and every uniform
    width that fits the budget are then measured together, all units at once, and the one with the least
    damage is kept (the damages of units do not simply add: a greedy choice that looked cheap can cost more
    than one width for all). Also a note giving the allocation."""
    units = make_units(list(layers), pairs)
    sizes = {name: int(layer.weight.size) for name, layer in layers.items()}
    probe = output_probe(graph, layers, inputs, like)
    matched = {name: layers[name] for name in matched_layers(layers, plan)}
    means = input_means(graph, like, matched, inputs) if matched else None
    weights = UnitWeights(layers, plan, means)
    damage = {}
    progress = console.progress("target bits", len(units), "units measured at each width")
    for i, unit in enumerate(units):
        for option in unit.options():
            damage[i, option] = probe.damage(weights.unit(unit, option))
        progress.advance()
    costs = layer_costs(layers, units, plan)
    shared = shared_constant_bits({layer.weight.ndim for layer in layers.values()}, plan.storage,
                                  tuple(sorted({g for b in WIDTHS for g in plan.grids(b)})))
    budget = plan.options.target_bits * sum(sizes.values()) - shared
    candidates = [knapsack_allocation(units, costs, damage, budget), greedy_allocation(units, costs, damage, budget)]
    candidates += uniform_allocations(units, costs, budget)
    joint = [probe.damage(weights.allocation(units, choice)) for choice in candidates]
    choice = candidates[int(np.argmin(joint))]
    bits = {}
    for i, unit in enumerate(units):
        bits.update({p: choice[i][0] for p in unit.producers})
        bits[unit.consumer] = choice[i][1]
    return bits, _allocation_note(units, choice, costs, shared, sum(sizes.values()), plan.options.target_bits)


def _allocation_note(units: list[Unit], choice: dict[int, tuple[int, int]], costs: Costs, shared: int, weights: int,
                     target_bits: float) -> str:
    average = (shared + sum(unit_bits(u, choice[i], costs) for i, u in enumerate(units))) / weights
    counts: dict[str, int] = {}
    for i, unit in enumerate(units):
        key = f"{choice[i][0]}/{choice[i][1]} pair" if unit.producers else f"{choice[i][1]}-bit layer"
        counts[key] = counts.get(key, 0) + 1
    reached = "" if average <= target_bits + 1e-9 else " (the narrowest allocation; the budget is below it)"
    return (f"--target-bits {target_bits:g}: {average:.2f} stored bits per quantized weight (integers and scales){reached}; "
            + ", ".join(f"{count} x {key}" for key, count in sorted(counts.items())))
