"""The fold stage: BatchNormalization into the Conv before it (spec section 1; the maths in
``maths/batchnorm.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .graph import NameSource, constant_value, replace_list
from .maths.batchnorm import fold_batchnorm_params


@dataclass(frozen=True)
class FoldResult:
    folded: tuple[str, ...]
    """Names of the BatchNormalization nodes folded away."""
    unfolded: tuple[tuple[str, str], ...]
    """(BatchNormalization name, reason) for each one left in the graph."""
    preactivation: dict[str, tuple[np.ndarray, np.ndarray]]
    """Conv name -> (beta, |gamma|): on the data the BN saw, the folded conv's output channel j
    is distributed about N(beta_j, gamma_j^2)."""


def fold_batchnorm(graph: gs.Graph) -> FoldResult:
    """Fold every BatchNormalization whose input is the sole output use of a Conv with constant weights.

    Rewrites ``graph`` in place (the Conv takes over the BatchNormalization's
    output tensor) and removes the folded nodes.
    """
    folded: list[str] = []
    unfolded: list[tuple[str, str]] = []
    preactivation: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    names = NameSource(graph)
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        outcome = _fold_one(graph, bn, names)
        if isinstance(outcome, str):
            unfolded.append((bn.name, outcome))
        else:
            folded.append(bn.name)
            conv_name, beta, gamma = outcome
            preactivation[conv_name] = (beta, np.abs(gamma))
    graph.cleanup()
    return FoldResult(folded=tuple(folded), unfolded=tuple(unfolded), preactivation=preactivation)


def _fold_one(graph: gs.Graph, bn: gs.Node, names: NameSource) -> str | tuple[str, np.ndarray, np.ndarray]:
    """Fold one BatchNormalization: (conv name, beta, gamma), or the reason it stays."""
    source = bn.inputs[0]
    if len(source.inputs) != 1 or source.inputs[0].op != "Conv":
        return "not directly after a Conv"
    conv = source.inputs[0]
    if len(source.outputs) != 1 or source in graph.outputs:
        return f"the output of {conv.name} has other consumers"
    if any(out.outputs or out in graph.outputs for out in bn.outputs[1:]):
        return "running-statistics outputs are used (training mode)"
    if bn.attrs.get("training_mode", 0):
        return "training_mode is set"
    params = [constant_value(t) for t in bn.inputs[1:5]]
    weight = constant_value(conv.inputs[1])
    bias = constant_value(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2].name else None
    if weight is None or any(p is None for p in params) or (len(conv.inputs) > 2 and conv.inputs[2].name and bias is None):
        return "weights or statistics are not constants"
    if int(bn.attrs.get("spatial", 1)) != 1 or any(p.size != weight.shape[0] for p in params):
        return "statistics are not per channel (spatial=0)"
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    epsilon = float(bn.attrs.get("epsilon", 1e-5))
    if np.any(var < 0):
        return "negative running variance"
    if np.any(var + epsilon <= 0):
        return "zero running variance and zero epsilon"
    new_weight, new_bias = fold_batchnorm_params(weight, bias, gamma, beta, mean, var, epsilon)
    weight_const = gs.Constant(names.fresh(f"{conv.name}.weight_bnfold"), new_weight)
    bias_const = gs.Constant(names.fresh(f"{conv.name}.bias_bnfold"), new_bias)
    output = bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    replace_list(conv.inputs, [conv.inputs[0], weight_const, bias_const])
    replace_list(conv.outputs, [output])
    return conv.name, beta, gamma
