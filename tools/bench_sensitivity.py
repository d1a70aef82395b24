"""Which sensitivity measure predicts accuracy: rank correlation of measures on the synthetic inputs with
top-1 on real images, for single-unit allocations and for the budgets each measure allocates.

    python tools/bench_sensitivity.py --readme

For every unit that ``--target-bits`` allocates (``allocate.make_units``:
a pair consumer with its producers, or one layer) and each narrower option
(2, 4 and 6 bits; pairs at every LOW/HIGH below 8/8), the unit alone is
quantized as the allocation measures it (``allocate.UnitWeights``: the
paper's compensation, no refinement), the rest of the model float, and
scored on the tool's default synthetic inputs by

- output SQNR (what ``--target-bits`` uses),
- the KL divergence of the softmax of the outputs from the float model's,
- top-1 agreement with the float model,

and by top-1 on N images of the ImageNet sample (the truth; labels are used
for scoring only). The table gives Spearman's rank correlation of each
measure with the truth over all unit options and per width, and the top-1
(no refinement) of the allocation that ``allocate.greedy_allocation`` makes
from each measure at 4 and 5 stored bits per weight. Reads the shared
EfficientNet-Lite0 (or ``--model``) and ImageNet sample; skips when absent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench_accuracy import ROOT, publish
from bench_imagenet import DATA, MODEL, load_sample
from dfmpc_onnx.allocate import UnitWeights, greedy_allocation, layer_costs, make_units
from dfmpc_onnx.fold import fold_batchnorm
from dfmpc_onnx.graph import find_layers, import_graph
from dfmpc_onnx.inputs import find_static_shape, model_facts, resolve_input_shapes
from dfmpc_onnx.load import load_model
from dfmpc_onnx.options import Options, resolve
from dfmpc_onnx.pairs import find_pairs, kept_out_of_pairs
from dfmpc_onnx.progress import Console
from dfmpc_onnx.sensitivity import kl_divergence, output_probe
from dfmpc_onnx.synthetic import make_synthetic_inputs, model_domain

MEASURES = ("output SQNR", "KL divergence", "top-1 agreement")
BUDGETS = (4.0, 5.0)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties at their mean rank)."""
    def ranks(x: list[float]) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):
            r[x == value] = r[x == value].mean()
        return r
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def logits(probe, changes) -> np.ndarray:
    return np.concatenate([chunk[0] for chunk in probe.outputs(changes)]).astype(np.float64)


def measure(model: Path, count: int) -> tuple[list[dict], dict]:
    """One row per unit option: the three measures on the synthetic inputs and top-1 on ``count`` images;
    and the greedy allocations' top-1 per measure and budget."""
    options = Options(target_bits=4.0)
    skeleton, weights = load_model(model)
    shapes, _ = find_static_shape(skeleton, weights, resolve_input_shapes(skeleton, options.input_shapes))
    plan = resolve(options, model_facts(skeleton, shapes))
    domain = model_domain(skeleton, weights, shapes, options)
    inputs, plan = make_synthetic_inputs(skeleton, weights, shapes, plan, domain, None, Console())
    graph = import_graph(skeleton, weights)
    fold_batchnorm(graph)
    layers, _ = find_layers(graph)
    search = find_pairs(graph, layers, kept_out_of_pairs(list(layers), options.keep_first, options.keep_last),
                        options.relu6)
    units = make_units(list(layers), search.pairs)
    images, labels = load_sample()
    images, labels = images[::len(images) // count][:count], labels[::len(images) // count][:count]
    synthetic, real = output_probe(graph, layers, inputs, skeleton), output_probe(graph, layers, images, skeleton)
    float_synthetic, unit_weights = logits(synthetic, {}), UnitWeights(layers, plan)
    rows, scores = [], {}
    for i, unit in enumerate(units):
        for option in unit.options():
            changes = unit_weights.unit(unit, option)
            out = logits(synthetic, changes)
            scores[i, option] = {
                "output SQNR": 10 * np.log10(np.sum(float_synthetic ** 2) / max(np.sum((out - float_synthetic) ** 2), 1e-30)),
                "KL divergence": float(np.mean(kl_divergence(float_synthetic, out))),
                "top-1 agreement": float(np.mean(out.argmax(1) == float_synthetic.argmax(1)) * 100)}
            if min(option) < 8:  # the widest option is the greedy's start: scored only on the synthetic inputs
                top1 = float(np.mean(logits(real, changes).argmax(1) == labels) * 100)
                rows.append(dict(unit=unit.consumer, option=list(option), top1=top1, **scores[i, option]))
                print(f"{unit.consumer[-40:]:40s} {option}  top-1 {top1:5.1f}  "
                      + "  ".join(f"{k} {v:.3g}" for k, v in scores[i, option].items()), flush=True)
    costs, total = layer_costs(layers, units, plan), sum(int(layer.weight.size) for layer in layers.values())
    allocations = {}
    for name in MEASURES:
        # each as a cost that grows with the damage: noise power, KL, disagreement
        noise = {key: (10 ** (-value[name] / 10) if name == "output SQNR" else value[name] if name == "KL divergence"
                       else 100 - value[name]) for key, value in scores.items()}
        for budget in BUDGETS:
            choice = greedy_allocation(units, costs, noise, budget * total)
            allocations[name, budget] = float(
                np.mean(logits(real, unit_weights.allocation(units, choice)).argmax(1) == labels) * 100)
    return rows, {"float": float(np.mean(logits(real, {}).argmax(1) == labels) * 100), "allocations": allocations}


def markdown(rows: list[dict], extra: dict, count: int) -> str:
    truth = [r["top1"] for r in rows]
    widths = sorted({min(r["option"]) for r in rows})
    head = "| measure (synthetic inputs) | all options | " + " | ".join(f"narrowest {b}-bit" for b in widths)
    head += " | " + " | ".join(f"greedy at {b:g} bits: top-1 (%)" for b in BUDGETS) + " |"
    lines = [head, "|---|---|" + "---|" * (len(widths) + len(BUDGETS))]
    for name in MEASURES:
        sign = -1.0 if name == "KL divergence" else 1.0  # a larger KL predicts a lower top-1
        cells = [spearman([sign * r[name] for r in rows], truth)]
        cells += [spearman([sign * r[name] for r in rows if min(r["option"]) == b],
                           [r["top1"] for r in rows if min(r["option"]) == b]) for b in widths]
        allocated = [extra["allocations"][name, b] for b in BUDGETS]
        lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " | "
                     + " | ".join(f"{a:.1f}" for a in allocated) + " |")
    return "\n".join(lines) + (f"\n\nSpearman correlation with top-1 on {count} ImageNet sample images "
                               f"(float {extra['float']:.1f} %) over {len(rows)} single-unit options.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--images", type=int, default=250, help="ImageNet sample images scored per option")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    parser.add_argument("--readme", action="store_true", help="also put the table into README.md")
    args = parser.parse_args()
    if not args.model.exists() or not DATA.exists():
        print(f"skipped: {args.model} or {DATA} is absent", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows, extra = measure(args.model, args.images)
    table = markdown(rows, extra, args.images)
    publish(table, rows, args.out, "sensitivity", args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
