"""Refinement after compensation (spec section 4): data-free, from synthetic inputs only.

``match_statistics`` is BatchNorm re-estimation kept inside the folded
weights. The float and the quantized model see the same synthetic inputs in
onnxruntime; convs are visited in topological order, and for conv output
channel j, with m_f, v_f the float model's mean and variance of that channel
and m_q, v_q the quantized model's (measured after every earlier conv was
corrected),

    y <- (y - m_q) sqrt(v_f / v_q) + m_f,

folded into the conv: W_j <- a_j W_j (the per-channel scale of the integer
codes), b_j <- a_j (b_j - m_q) + m_f, a_j = sqrt(v_f / v_q). The integer
codes never change, so every layer stays on its grid.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .check import quiet_session_options
from .graph import Layer, from_rows
from .plan import QuantizedLayer
from .quantizers import QuantizedWeight

RELATIVE_VARIANCE_FLOOR = 1e-3
"""A channel whose float or quantized variance on the synthetic inputs is below this fraction of the
layer's mean float variance is only shifted, not scaled: the inputs barely exercise it, so the ratio
of its variances says nothing about real inputs (on EfficientNet-Lite0, depthwise channels that pink
noise leaves nearly constant were scaled by 0 to 12 with a floor of 1e-8)."""

State = dict[str, tuple[QuantizedWeight, np.ndarray | None]]


def match_statistics(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], state: State, inputs: np.ndarray,
                     opset_model: onnx.ModelProto, chunk: int = 32,
                     log: Callable[[str], None] | None = None,
                     refit: Callable[[str, np.ndarray], QuantizedWeight] | None = None,
                     refit_roles: tuple[str, ...] = ("high",)) -> State:
    """Return ``state`` (codes, scale and bias per layer) with every quantized Conv's output statistics
    matched to the float model's on ``inputs``. ``graph`` is the float, BatchNorm-folded graph.

    With ``refit`` (name, weight rows -> requantized weight), the convs of ``refit_roles`` (pair
    consumers) are first re-solved by ridge least squares so that, on the quantized model's own
    inputs, they reproduce the float model's outputs: a full-matrix generalisation of c (Eq. 7).

    The graph is cut after each quantized Conv (``Segments``), and the float and the quantized
    model are run through it side by side, once: a conv's correction is an affine map of its
    output, so it is applied to the values already computed, and the whole refinement costs about
    two forward passes, not one per conv."""
    convs = [name for name, ql in qlayers.items() if ql.layer.op == "Conv"]
    if not convs:
        return dict(state)
    graph_inputs = {t.name for t in graph.inputs}
    conv_inputs = {name: qlayers[name].layer.node.inputs[0].name for name in convs}
    fittable = {name for name in convs if refit is not None and qlayers[name].role in refit_roles
                and conv_inputs[name] not in graph_inputs and _plain_conv(qlayers[name].layer.node)}
    segments = Segments(graph, qlayers, convs, {conv_inputs[name] for name in fittable}, opset_model)
    chunks = [inputs[start:start + chunk] for start in range(0, len(inputs), chunk)]
    float_values = {segments.input_name: chunks}
    quantized_values = {segments.input_name: chunks}
    layers = {name: ql.layer for name, ql in qlayers.items()}
    float_feed = weight_feed(segments.weight_inputs, layers,
                             {name: (layer.weight, layer.bias) for name, layer in layers.items()})
    state = dict(state)

    def quantized_feed(index: int) -> dict[str, np.ndarray]:
        return weight_feed(segments.weight_inputs, layers,
                           {name: _dequantized(qlayers[name], state[name]) for name in segments.layers[index]})

    for index, name in enumerate(convs):
        output = qlayers[name].layer.node.outputs[0].name
        float_values.update(segments.run(index, float_values, float_feed))
        quantized_values.update(segments.run(index, quantized_values, quantized_feed(index)))
        if name in fittable:
            state[name] = _refit_conv(qlayers[name], quantized_values[conv_inputs[name]], float_values[output],
                                      refit)
            quantized_values.update(segments.run(index, quantized_values, quantized_feed(index)))
        m_f, v_f = _array_statistics(float_values[output])
        m_q, v_q = _array_statistics(quantized_values[output])
        a = channel_affine(m_f, v_f, m_q, v_q)
        state[name] = _rescale(state[name], a, m_q, m_f)
        quantized_values[output] = [_affine(values, a, m_q, m_f) for values in quantized_values[output]]
        for values in (float_values, quantized_values):
            for dead in segments.last_used_by[index]:
                values.pop(dead, None)
        if log and ((index + 1) % 10 == 0 or index + 1 == len(convs)):
            log(f"refine: {index + 1}/{len(convs)} convs done")
    return state


class Segments:
    """``graph`` cut after each conv of ``convs`` (in topological order): segment k runs the nodes from
    just after conv k-1 to conv k, reading the graph input, the tensors earlier segments left, and the
    quantized layers' weights (as inputs), and leaving every tensor a later segment reads."""

    def __init__(self, graph: gs.Graph, qlayers: dict[str, QuantizedLayer], convs: list[str], extra: set[str],
                 opset_model: onnx.ModelProto):
        probe, self.weight_inputs = with_weight_inputs(
            graph, {name: ql.layer for name, ql in qlayers.items()}, [t.name for t in graph.outputs])
        probe.toposort()
        model = gs.export_onnx(probe, do_type_check=False)
        self.input_name = graph.inputs[0].name
        nodes = list(model.graph.node)
        position = {node.name: i for i, node in enumerate(nodes)}
        cuts = [position[name] for name in convs]
        initializers = {t.name: t for t in model.graph.initializer}
        types = {v.name: v.type for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
        weight_names = {n for pair in self.weight_inputs.values() for n in pair if n}
        bounds = list(zip([0] + [c + 1 for c in cuts[:-1]], [c + 1 for c in cuts]))
        reads = [set().union(*(_node_reads(n) for n in nodes[a:b])) for a, b in bounds]
        writes = [{o for n in nodes[a:b] for o in n.output if o} for a, b in bounds]
        self.sessions, self.inputs, self.outputs = [], [], []
        self.layers: list[list[str]] = []  # the quantized layers whose weights segment k reads
        self.last_used_by: list[set[str]] = [set() for _ in bounds]
        for k, (a, b) in enumerate(bounds):
            later = set().union(*reads[k + 1:]) if k + 1 < len(reads) else set()
            outputs = sorted(name for name in writes[k] if name in later or name in extra)
            outputs.append(nodes[b - 1].output[0])
            data_inputs = sorted(name for name in reads[k] - writes[k]
                                 if name not in initializers and name not in weight_names)
            weights = sorted(name for name in reads[k] if name in weight_names)
            self.layers.append([layer for layer, pair in self.weight_inputs.items() if pair[0] in reads[k]])
            segment = onnx.helper.make_graph(
                nodes[a:b], f"segment{k}",
                [_value_info(name, types) for name in data_inputs + weights],
                [_value_info(name, types) for name in dict.fromkeys(outputs)],
                [initializers[name] for name in sorted(reads[k]) if name in initializers])
            segment_model = onnx.helper.make_model(segment, opset_imports=list(opset_model.opset_import))
            segment_model.ir_version = opset_model.ir_version
            self.sessions.append(ort.InferenceSession(segment_model.SerializeToString(), quiet_session_options(),
                                                      providers=["CPUExecutionProvider"]))
            self.inputs.append((data_inputs, weights))
            self.outputs.append(list(dict.fromkeys(outputs)))
        last_use = {}
        for k, names in enumerate(reads):
            for name in names:
                last_use[name] = k
        for name, k in last_use.items():
            if name != self.input_name:
                self.last_used_by[k].add(name)

    def run(self, index: int, values: dict[str, list[np.ndarray]],
            weights: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
        """Segment ``index`` on ``values`` (name -> one array per chunk of inputs): the tensors it leaves,
        per chunk (a tensor such as a Reshape's shape may depend on the chunk's size)."""
        data_inputs, weight_inputs = self.inputs[index]
        feed_weights = {name: weights[name] for name in weight_inputs}
        parts = [self.sessions[index].run(self.outputs[index], {
            **{name: values[name][c] for name in data_inputs}, **feed_weights})
            for c in range(len(values[self.input_name]))]
        return {name: [part[i] for part in parts] for i, name in enumerate(self.outputs[index])}


def _node_reads(node: onnx.NodeProto) -> set[str]:
    """The tensor names a node reads, including those its subgraphs read from the enclosing graph."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} | {
                t.name for t in sub.initializer}
            names |= {name for n in sub.node for name in _node_reads(n) if name not in inner}
    return names


def _value_info(name: str, types: dict[str, onnx.TypeProto]) -> onnx.ValueInfoProto:
    """A value info with the tensor's element type and no shape (every chunk size fits); float if unknown."""
    elem = types[name].tensor_type.elem_type if name in types and types[name].tensor_type.elem_type else (
        onnx.TensorProto.FLOAT)
    return onnx.helper.make_tensor_value_info(name, elem, None)


def _array_statistics(chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 1) mean and variance over every sample and position of the chunks, in float64."""
    sums = squares = 0.0
    count = 0
    for values in chunks:
        v = values.astype(np.float64)
        axes = (0,) + tuple(range(2, v.ndim))
        sums = sums + v.sum(axis=axes)
        squares = squares + np.square(v).sum(axis=axes)
        count += v.size // v.shape[1]
    mean = sums / count
    return mean, np.maximum(squares / count - mean**2, 0.0)


def _affine(values: np.ndarray, a: np.ndarray, m_q: np.ndarray, m_f: np.ndarray) -> np.ndarray:
    """y <- a (y - m_q) + m_f per channel: what the corrected conv would have output."""
    shape = (1, -1) + (1,) * (values.ndim - 2)
    return ((values - m_q.reshape(shape)) * a.reshape(shape) + m_f.reshape(shape)).astype(np.float32)


RIDGE = 1e-3
"""Ridge weight, relative to the mean diagonal of the Gram matrix."""


def _plain_conv(node: gs.Node) -> bool:
    return (int(node.attrs.get("group", 1)) == 1 and len(node.attrs.get("kernel_shape", [1, 1])) == 2
            and all(d == 1 for d in node.attrs.get("dilations", [1, 1]))
            and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))


def im2col(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int], pads: list[int]) -> np.ndarray:
    """(N, C, H, W) -> (N * Ho * Wo, C * kh * kw): the rows a 2-D convolution multiplies by its weight."""
    kh, kw = kernel
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1]]
    n, c, ho, wo = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def _refit_conv(ql: QuantizedLayer, quantized_in: list[np.ndarray], float_out: list[np.ndarray], refit):
    """Ridge least squares for a conv's weight and bias on (quantized inputs, float outputs), requantized."""
    node, layer = ql.layer.node, ql.layer
    kernel = tuple(layer.weight.shape[2:])
    strides = tuple(node.attrs.get("strides", [1, 1]))
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    size = int(np.prod(layer.weight.shape[1:])) + 1
    gram = np.zeros((size, size))
    cross = np.zeros((size, layer.out_channels))
    for inputs, outputs in zip(quantized_in, float_out):
        rows = im2col(inputs.astype(np.float64), kernel, strides, pads)
        rows = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
        target = outputs.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, layer.out_channels)
        gram += rows.T @ rows
        cross += rows.T @ target
    prior = np.concatenate([layer.weight.reshape(layer.out_channels, -1).astype(np.float64),
                            (np.zeros(layer.out_channels) if layer.bias is None else layer.bias)[:, None]], axis=1)
    ridge = RIDGE * np.trace(gram) / size
    solution = np.linalg.solve(gram + ridge * np.eye(size), cross + ridge * prior.T).T
    weight_rows, bias = solution[:, :-1], solution[:, -1]
    return refit(layer.name, weight_rows.astype(np.float32)), bias.astype(np.float32)


def channel_affine(m_f: np.ndarray, v_f: np.ndarray, m_q: np.ndarray, v_q: np.ndarray) -> np.ndarray:
    """a_j = sqrt(v_f / v_q), and 1 where v_f or v_q is below the floor (``RELATIVE_VARIANCE_FLOOR``)."""
    floor = RELATIVE_VARIANCE_FLOOR * max(float(np.mean(v_f)), np.finfo(np.float64).tiny)
    measured = (v_q > floor) & (v_f > floor)
    return np.where(measured, np.sqrt(np.maximum(v_f, 0.0) / np.where(measured, v_q, 1.0)), 1.0)


def _rescale(entry: tuple[QuantizedWeight, np.ndarray | None], a, m_q, m_f):
    """The conv of ``entry`` followed by y <- a (y - m_q) + m_f: scales a_j s_j, bias a_j (b_j - m_q_j) + m_f_j."""
    q, bias = entry
    b = np.zeros_like(a) if bias is None else bias.astype(np.float64)
    new_bias = a * (b - m_q) + m_f
    return q.with_scale(q.scale * a), new_bias.astype(np.float32)


def activation_statistics(graph: gs.Graph, opset_model: onnx.ModelProto, inputs: np.ndarray, names: list[str],
                          chunk: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and variance of the named tensors of ``graph`` (float) over ``inputs``."""
    runner = session(_with_outputs(graph, names), opset_model)
    return _channel_statistics(runner, runner.get_inputs()[0].name, inputs, names, {}, chunk)


def _channel_statistics(session: ort.InferenceSession, input_name: str, inputs: np.ndarray, names: list[str],
                        feed: dict[str, np.ndarray], chunk: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel (axis 1) mean and variance of each named output over all of ``inputs``."""
    sums = [0.0] * len(names)
    squares = [0.0] * len(names)
    counts = [0] * len(names)
    for start in range(0, len(inputs), chunk):
        values = session.run(names, {input_name: inputs[start:start + chunk], **feed})
        for i, value in enumerate(values):
            v = value.astype(np.float64)
            axes = (0,) + tuple(range(2, v.ndim))
            sums[i] = sums[i] + v.sum(axis=axes)
            squares[i] = squares[i] + np.square(v).sum(axis=axes)
            counts[i] += v.size // v.shape[1]
    stats = []
    for s, sq, n in zip(sums, squares, counts):
        mean = s / n
        stats.append((mean, np.maximum(sq / n - mean**2, 0.0)))
    return stats


def _with_outputs(graph: gs.Graph, names: list[str]) -> gs.Graph:
    copy = graph.copy()
    tensors = copy.tensors()
    copy.outputs = [tensors[name] for name in names]
    return copy


def with_weight_inputs(graph: gs.Graph, layers: dict[str, Layer],
                       output_names: list[str]) -> tuple[gs.Graph, dict[str, tuple[str, str | None]]]:
    """A copy of ``graph`` whose ``layers`` read weight and bias from graph inputs NAME::weight and
    NAME::bias (Conv and Gemm), and whose outputs are ``output_names``."""
    copy = _with_outputs(graph, output_names)
    nodes = {node.name: node for node in copy.nodes}
    names: dict[str, tuple[str, str | None]] = {}
    for name, layer in layers.items():
        node = nodes[name]
        weight = gs.Variable(f"{name}::weight", dtype=np.float32, shape=list(layer.weight.shape))
        node.inputs[1] = weight
        copy.inputs.append(weight)
        bias_name = None
        if node.op in ("Conv", "Gemm"):
            bias = gs.Variable(f"{name}::bias", dtype=np.float32, shape=[layer.out_channels])
            if len(node.inputs) > 2:
                node.inputs[2] = bias
            else:
                node.inputs.append(bias)
            copy.inputs.append(bias)
            bias_name = bias.name
        names[name] = (weight.name, bias_name)
    return copy, names


def weight_feed(weight_inputs: dict[str, tuple[str, str | None]], layers: dict[str, Layer],
                weights: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> dict[str, np.ndarray]:
    """The inputs of ``with_weight_inputs`` (``weight_inputs``: layer -> input names) for the layers in
    ``weights`` (layer -> weight in the graph's layout, bias; a missing bias is zero)."""
    feed = {}
    for name, (weight, bias) in weights.items():
        weight_name, bias_name = weight_inputs[name]
        feed[weight_name] = np.asarray(weight, dtype=np.float32)
        if bias_name is not None:
            feed[bias_name] = (np.zeros(layers[name].out_channels, np.float32) if bias is None
                               else np.asarray(bias, dtype=np.float32))
    return feed


def _dequantized(ql: QuantizedLayer, entry: tuple[QuantizedWeight, np.ndarray | None]) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight in the graph's layout, bias) that a layer computes with at ``entry`` (codes and scales, bias)."""
    q, bias = entry
    return from_rows(q.dequantize(), ql.layer.weight.shape, ql.layer.out_axis), bias


def session(graph: gs.Graph, opset_model: onnx.ModelProto) -> ort.InferenceSession:
    graph = graph.cleanup()
    model = gs.export_onnx(graph, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(opset_model.opset_import)
    model.ir_version = opset_model.ir_version
    options = quiet_session_options()
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def relu_mean(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """E[max(0, x)] for x ~ N(mean, std^2): mean Phi(mean/std) + std phi(mean/std) (std = 0: max(0, mean))."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    safe = np.where(std > 0, std, 1.0)
    z = mean / safe
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z**2) / math.sqrt(2.0 * math.pi)
    return np.where(std > 0, mean * cdf + std * pdf, np.maximum(mean, 0.0))


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


def correct_bias(qlayer: QuantizedLayer, entry: tuple[QuantizedWeight, np.ndarray | None],
                 input_mean: np.ndarray) -> tuple[QuantizedWeight, np.ndarray]:
    """b_j <- b_j - sum_m (sum over the kernel of (What - W)[j, m]) E[A_m]: the expected output error removed."""
    q, bias = entry
    layer = qlayer.layer
    error = from_rows(q.dequantize().astype(np.float64), layer.weight.shape, layer.out_axis) - layer.weight
    if layer.op == "Conv":
        group = int(layer.node.attrs.get("group", 1))
        per_channel = error.reshape(error.shape[0], error.shape[1], -1).sum(axis=2)  # (out, in per group)
        per_group_out = error.shape[0] // group
        means = input_mean.reshape(group, -1)
        shift = np.concatenate([per_channel[g * per_group_out:(g + 1) * per_group_out] @ means[g] for g in range(group)])
    else:
        matrix = error if layer.out_axis == 0 else error.T  # (out, in)
        block = matrix.shape[1] // input_mean.size
        shift = matrix @ np.repeat(input_mean, block) if block * input_mean.size == matrix.shape[1] else None
        if shift is None:
            return entry
    base = np.zeros(layer.out_channels) if bias is None else bias.astype(np.float64)
    return q, (base - shift).astype(np.float32)
