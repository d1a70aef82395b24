"""The budgeted search (allocate.py) on hand-made noise tables, and --target-bits end to end."""

import numpy as np
import pytest

from conftest import chain_model
from dfmpc_onnx import quantize
from dfmpc_onnx.allocate import Unit, greedy_allocation, unit_bits
from dfmpc_onnx.errors import InputError
from dfmpc_onnx.options import WIDTHS
from dfmpc_onnx.report import stored_bits_per_weight


def integer_costs(sizes):
    """Costs of integers alone: b bits per weight."""
    return {name: {b: b * size for b in WIDTHS} for name, size in sizes.items()}


def average(units, sizes, choice):
    return sum(unit_bits(u, choice[i], integer_costs(sizes)) for i, u in enumerate(units)) / sum(sizes.values())


def test_budget_goes_where_the_noise_is():
    units = [Unit(("p0",), "c0"), Unit(("p1",), "c1"), Unit((), "stem")]
    sizes = {"p0": 100, "c0": 100, "p1": 100, "c1": 100, "stem": 10}
    # unit 0 is ten times as sensitive as unit 1 at every width; the stem is insensitive
    noise = {}
    for i, scale in enumerate((10.0, 1.0, 0.01)):
        for option in units[i].options():
            noise[i, option] = scale * sum(2.0 ** -b for b in option)
    total = sum(sizes.values())
    choice = greedy_allocation(units, integer_costs(sizes), noise, 4.0 * total)
    assert average(units, sizes, choice) <= 4.0
    assert sum(choice[0]) > sum(choice[1])  # the sensitive pair keeps more bits
    assert choice[2][1] < choice[0][1]  # the insensitive layer keeps fewer bits than the sensitive consumer
    assert average(units, sizes, greedy_allocation(units, integer_costs(sizes), noise, 8.0 * total)) == 8.0


def test_unreachable_budget_gives_the_narrowest():
    units = [Unit(("p",), "c")]
    sizes = {"p": 10, "c": 10}
    noise = {(0, o): float(-sum(o)) for o in units[0].options()}
    assert greedy_allocation(units, integer_costs(sizes), noise, 1.0 * 20) == {0: (2, 2)}


@pytest.mark.parametrize("refine", ["none", "stats"])
def test_target_bits_meets_the_budget_and_says_so(refine):
    model, report = quantize(chain_model(), target_bits=3.0, synthetic="pink", samples=8, refine=refine, check=False)
    note = next(n for n in report.notes if n.startswith("--target-bits 3"))
    assert float(note.split(": ")[1].split(" ")[0]) <= 3.0 + 1e-9
    assert stored_bits_per_weight(model) <= 3.0  # scales included, as the file is measured
    assert report.scheme == "target 3 bits"
    assert {layer.bits for layer in report.layers} <= {2, 4, 6, 8}


@pytest.mark.parametrize("bad", [1.0, 9.0, float("nan")])
def test_target_bits_out_of_range_is_refused(bad):
    with pytest.raises(InputError, match="--target-bits"):
        quantize(chain_model(), target_bits=bad, check=False)


def test_output_probe_measures_only_the_changed_layers():
    from conftest import chain_model
    from dfmpc_onnx.fold import fold_batchnorm
    from dfmpc_onnx.graph import find_layers, import_graph
    from dfmpc_onnx.load import load_whole_model
    from dfmpc_onnx.sensitivity import output_probe
    from dfmpc_onnx.maths.noise import noise_batch

    model = load_whole_model(chain_model())
    graph = import_graph(model)
    fold_batchnorm(graph)
    layers, _ = find_layers(graph)
    probe = output_probe(graph, layers, noise_batch([1, 3, 8, 8], "pink", 4, 0), model)
    signal, noise = probe.noise({})
    assert signal > 0 and noise == 0.0
    layer = layers["conv1"]
    small = probe.noise({"conv1": (layer.weight * 1.01, layer.bias)})[1]
    large = probe.noise({"conv1": (layer.weight * 1.5, layer.bias)})[1]
    assert 0 < small < large


@pytest.mark.parametrize("threshold,raised", [(100.0, True), (-100.0, False)])
def test_protect_raises_the_pairs_whose_producers_alone_cost_more_than_the_threshold(threshold, raised):
    _, report = quantize(chain_model(), "2/6", protect=threshold, synthetic="pink", samples=8, refine="none",
                         check=False)
    assert report.pairs and len(report.protection) == len({pair.consumer for pair in report.pairs})
    assert all(unit.raised == raised for unit in report.protection)
    producers = [layer for layer in report.layers if layer.role == "low"]
    assert producers and all(layer.bits == (6 if raised else 2) for layer in producers)
    note = next(note for note in report.notes if note.startswith("--protect"))
    assert (f"{len(report.protection)} of {len(report.protection)}" if raised else "0 of") in note
    assert "dB alone" in note if raised else "the costliest alone" in note


def test_protect_measures_nothing_under_a_uniform_scheme_or_when_off():
    for values in (dict(scheme="4"), dict(scheme="2/6", protect="off")):
        _, report = quantize(chain_model(), refine="none", check=False, **values)
        assert report.protection == [] and report.synthetic is None
        assert not any(note.startswith("--protect") for note in report.notes)


def test_kl_divergence_of_the_softmaxes():
    import numpy as np
    from dfmpc_onnx.sensitivity import kl_divergence
    reference = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    assert kl_divergence(reference, reference + 5.0) == pytest.approx([0.0, 0.0], abs=1e-12)  # shift-invariant
    moved = np.array([[0.0, 2.0, -1.0], [1.0, 0.0, 0.0]])
    p = np.exp(reference) / np.exp(reference).sum(1, keepdims=True)
    q = np.exp(moved) / np.exp(moved).sum(1, keepdims=True)
    assert kl_divergence(reference, moved) == pytest.approx(np.sum(p * np.log(p / q), axis=1))


def brute_force(units, costs, damage, budget):
    import itertools
    best = None
    for combo in itertools.product(*[u.options() for u in units]):
        bits = sum(unit_bits(u, o, costs) for u, o in zip(units, combo))
        total = sum(damage[i, o] for i, o in enumerate(combo))
        if bits <= budget and (best is None or total < best[0]):
            best = (total, combo)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_is_the_least_damage_within_the_budget(seed):
    import numpy as np
    from dfmpc_onnx.allocate import knapsack_allocation
    rng = np.random.default_rng(seed)
    units = [Unit(("p0",), "c0"), Unit((), "a"), Unit((), "b"), Unit(("p1",), "c1")]
    sizes = {name: int(rng.integers(10, 200)) for name in ("p0", "c0", "a", "b", "p1", "c1")}
    damage = {(i, o): float(rng.uniform(0.5, 2.0) * sum(2.0 ** -b for b in o) * rng.uniform(1, 10))
              for i, u in enumerate(units) for o in u.options()}
    costs = integer_costs(sizes)
    budget = 4.0 * sum(sizes.values())
    choice = knapsack_allocation(units, costs, damage, budget, resolution=20000)
    found = sum(damage[i, o] for i, o in choice.items())
    assert sum(unit_bits(u, choice[i], costs) for i, u in enumerate(units)) <= budget
    assert found == pytest.approx(brute_force(units, costs, damage, budget)[0], rel=0.02)
    greedy = greedy_allocation(units, costs, damage, budget)
    assert found <= sum(damage[i, o] for i, o in greedy.items()) + 1e-12


def test_knapsack_does_not_spend_a_large_narrowing_where_small_ones_fit():
    """The greedy's trap: one large unit at 2 bits saves far more than the budget needs."""
    from dfmpc_onnx.allocate import knapsack_allocation
    units = [Unit((), "big"), Unit((), "s1"), Unit((), "s2")]
    sizes = {"big": 1000, "s1": 500, "s2": 500}
    damage = {}
    for i, unit in enumerate(units):
        for option in unit.options():
            b = option[1]
            damage[i, option] = {8: 0.0, 6: 0.1, 4: 1.0, 2: 30.0}[b] * (3.0 if unit.consumer == "big" else 1.0)
    budget = 7.0 * 2000
    choice = knapsack_allocation(units, integer_costs(sizes), damage, budget)
    assert choice[0][1] > 2 and average(units, sizes, choice) <= 7.0


def test_probe_weights_take_out_the_mean_shift_the_refinement_will_match():
    """With the input means, a layer's probe bias removes its output's mean shift on the probe's inputs: the
    classifier's logits keep the float model's mean per class at 2 bits; without them they do not."""
    from dfmpc_onnx.allocate import UnitWeights
    from dfmpc_onnx.fold import fold_batchnorm
    from dfmpc_onnx.graph import find_layers, import_graph
    from dfmpc_onnx.load import load_whole_model
    from dfmpc_onnx.maths.noise import noise_batch
    from dfmpc_onnx.inputs import model_facts
    from dfmpc_onnx.options import Options, resolve
    from dfmpc_onnx.sensitivity import input_means, output_probe

    model = load_whole_model(chain_model())
    graph = import_graph(model)
    fold_batchnorm(graph)
    layers, _ = find_layers(graph)
    inputs = noise_batch([1, 3, 8, 8], "pink", 16, 0)
    probe = output_probe(graph, layers, inputs, model)
    plan = resolve(Options(), model_facts(model, {}))
    means = input_means(graph, model, layers, inputs)
    assert means["stem"].shape == (3,) and means["fc"].shape == (8,)
    np.testing.assert_allclose(means["stem"], inputs.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    float_mean = np.concatenate([o[0] for o in probe.reference]).mean(axis=0)
    for given, matches in ((means, True), (None, False)):
        fc = UnitWeights(layers, plan, given).layer("fc", 2, False)
        logits = np.concatenate([o[0] for o in probe.outputs({"fc": fc})])
        assert np.allclose(logits.mean(axis=0), float_mean, atol=1e-4) == matches
