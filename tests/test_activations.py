"""``--activations``: QuantizeLinear/DequantizeLinear on each quantized layer's input, ranges calibrated on
the synthetic inputs (``activations.py``, ``maths/ranges.py``)."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import GraphBuilder, chain_model, residual_model, run_model
from dfmpc_onnx import quantize
from dfmpc_onnx.errors import InputError
from dfmpc_onnx.maths.ranges import affine_grid, estimate_range, fake_quantize, minmax_range
from test_storage import openvino_outputs


@pytest.mark.parametrize("low,high", [(-1.0, 3.0), (0.0, 6.0), (0.5, 2.0), (-4.0, -1.0), (0.0, 0.0)])
@pytest.mark.parametrize("bits", [8, 16])
def test_the_grid_covers_the_range_and_holds_zero_exactly(low, high, bits):
    scale, zero_point = affine_grid(low, high, bits)
    assert 0 <= zero_point <= (1 << bits) - 1 and scale > 0
    assert fake_quantize(np.zeros(1), scale, zero_point, bits)[0] == 0.0
    values = np.linspace(min(low, 0.0), max(high, 0.0), 1001)
    assert np.max(np.abs(fake_quantize(values, scale, zero_point, bits) - values)) <= scale / 2 + 1e-12


def test_estimators_shrink_the_range_only_where_it_lowers_the_error():
    values = np.concatenate([np.random.default_rng(0).standard_normal(100_000), [40.0]])  # one outlier
    low, high = minmax_range(values)
    for estimator in ("percentile", "mse"):
        lo, hi = estimate_range(values, estimator, 8)
        assert low <= lo < 0 < hi < high
    error = lambda r: np.mean(np.square(fake_quantize(values, *affine_grid(*r, 8), 8) - values))
    assert error(estimate_range(values, "mse", 8)) < error((low, high))


def activation_qdq(model):
    """Each Conv's (zero point dtype) of the QuantizeLinear/DequantizeLinear pair on its first input."""
    producers = {out: node for node in model.graph.node for out in node.output}
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            dq = producers.get(node.input[0])
            assert dq is not None and dq.op_type == "DequantizeLinear", node.name
            assert producers[dq.input[0]].op_type == "QuantizeLinear"
            found[node.name] = values[dq.input[2]].dtype
    return found


@pytest.mark.parametrize("bits,dtype,opset", [("8", np.uint8, 13), ("16", np.uint16, 21)])
def test_every_quantized_layer_reads_a_quantized_activation(bits, dtype, opset):
    source = residual_model()
    calibration = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    # 4/6: under --activations 8-bit weights take the integer grid, so a 4/8 would change the weights too
    # and int8 storage, what --activations stores: float32 scales, so only the activations differ
    weights_only, _ = quantize(source, "4/6", synthetic_inputs=calibration, check=False, refine="none", storage="int8")
    model, report = quantize(source, "4/6", synthetic_inputs=calibration, check=False, activations=bits, refine="none")
    assert set(activation_qdq(model).values()) == {np.dtype(dtype)}
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= opset
    assert report.activation_bits == int(bits) and report.activation_ranges
    x = calibration[:1]  # inside the calibrated ranges: the error is the grid's alone
    reference = run_model(weights_only, x)
    sqnr = 10 * np.log10(np.sum(reference ** 2) / np.sum((run_model(model, x) - reference) ** 2))
    assert sqnr > (25 if bits == "8" else 60)


def test_activations_with_float_weights_and_the_summary_line():
    model, report = quantize(chain_model(), "2/6", format="float", synthetic="pink", samples=8, check=False,
                             activations=8, activation_range="mse")
    assert activation_qdq(model) and not any(
        n.op_type == "DequantizeLinear" and n.input[0] in {t.name for t in model.graph.initializer}
        for n in model.graph.node)
    quantized = sum(node.op_type == "QuantizeLinear" for node in model.graph.node)
    assert f"activations quantized: {quantized} tensors, uint8 per tensor, mse ranges" in report.format_summary()


def test_activations_need_synthetic_inputs():
    two_inputs = chain_model()
    two_inputs.graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    with pytest.raises(InputError, match="--activations needs synthetic inputs"):
        quantize(two_inputs, "4/8", activations="8", check=False)


@pytest.mark.parametrize("scheme,storage", [("4/8", "portable"), ("4/8", "auto"), ("8", "auto"), ("2/6", "auto")])
def test_openvino_runs_activation_quantized_outputs(resnet20, scheme, storage):
    model, _ = quantize(str(resnet20), scheme, synthetic="pink", samples=16, refine="none", check=False,
                        activations="8", storage=storage)
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    reference = run_model(model, x)
    # both run these layers on integer kernels, and round the requantized outputs differently
    got = openvino_outputs(model, x)
    assert np.abs(got - reference).max() <= 0.05 * np.abs(reference).max()
    assert np.array_equal(got.argmax(1), reference.argmax(1))


def test_activations_store_weights_in_int8_and_refuse_exact_storage():
    model, report = quantize(chain_model(), "2/6", synthetic="pink", samples=8, activations="8")
    assert report.storage == "int8" and report.check is not None  # onnxruntime loaded it
    weights = {t.data_type for t in model.graph.initializer if t.data_type != onnx.TensorProto.FLOAT}
    assert weights == {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}  # integer kernels read no INT4 or INT2
    assert "(qdq int8," in report.format_summary()
    with pytest.raises(InputError, match="--activations needs --storage int8 or portable"):
        quantize(chain_model(), "2/6", activations="8", storage="exact")
    _, plain = quantize(chain_model(), "2/6", refine="none", protect="off", check=False)
    assert plain.storage == "exact"


def fused_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    """The ops of ``model`` after onnxruntime's graph optimisations (what its CPU provider runs)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("scheme", ["4/8", "8", "2/6"])
def test_onnxruntime_runs_every_convolution_and_the_residual_add_on_integers(scheme, tmp_path):
    calibration = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    model, _ = quantize(residual_model(), scheme, synthetic_inputs=calibration, check=False, activations="8")
    ops = fused_ops(model, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 1 and ops["QLinearGlobalAveragePool"] == 1, ops
    assert not ops["Conv"] and not ops["FusedConv"] and not ops["Relu"], ops


def mobile_block_model(channels: int = 8) -> onnx.ModelProto:
    """Stem-ReLU6, an explicit zero Pad before a depthwise conv (as TensorFlow exports write it), ReLU6, a
    1x1 projection added to the stem output, MaxPool, GlobalAveragePool, Reshape, Gemm."""
    g = GraphBuilder(seed=3)
    low, high = g.const("clip.low", np.array(0.0)), g.const("clip.high", np.array(6.0))
    stem = g.node("Clip", [g.conv("x", 3, channels, name="stem"), low, high])
    padded = g.node("Pad", [stem, g.const_int("pads", [0, 0, 1, 1, 0, 0, 1, 1])])
    weight = g.const("depthwise.w", g.rng.normal(0, 0.3, (channels, 1, 3, 3)))
    h = g.node("Clip", [g.node("Conv", [padded, weight], name="depthwise", group=channels), low, high])
    h = g.node("Add", [g.conv(h, channels, channels, k=1, name="project"), stem])
    h = g.node("GlobalAveragePool", [g.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])])
    return g.model(g.gemm(g.node("Reshape", [h, g.const_int("flat", [1, channels])]), channels, 10, name="fc"))


def test_pads_fold_into_the_integer_convolution_and_copies_share_their_input_grid(tmp_path):
    calibration = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    model, _ = quantize(mobile_block_model(), "4/8", synthetic_inputs=calibration, check=False, activations="8")
    ops = fused_ops(model, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 1 and not ops["Pad"] and not ops["Conv"], ops
    producers = {out: node for node in model.graph.node for out in node.output}
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantized = {node.input[0]: node for node in model.graph.node if node.op_type == "QuantizeLinear"}
    copies = [node for node in model.graph.node if node.op_type in ("MaxPool", "Reshape")]
    assert len(copies) == 2 and all(node.output[0] in quantized for node in copies)
    for node in copies:  # DequantizeLinear -> copy -> QuantizeLinear on one grid
        before, after = producers[node.input[0]], quantized[node.output[0]]
        assert before.op_type == "DequantizeLinear"
        assert values[before.input[1]] == values[after.input[1]] and values[before.input[2]] == values[after.input[2]]


def conv_outputs(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    """The tensors ``names`` of ``model`` on ``x``, one input at a time (the test models have batch 1)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run(names, {"x": x[i:i + 1]}) for i in range(len(x))]
    return [np.concatenate([run[k] for run in runs]) for k in range(len(names))]


@pytest.mark.parametrize("make", [residual_model, chain_model])
def test_statistics_matching_sees_the_quantized_activations(make, monkeypatch):
    """With --activations the quantized model is matched with its activations quantized, so the deepest
    conv's channel means on the synthetic inputs land on the float model's, closer than when the ranges
    are put on after a refinement that saw float activations (the order before)."""
    import dfmpc_onnx.api as api
    source, x = make(), np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    mismatch = {}
    for aware in (True, False):
        monkeypatch.setattr(api, "MATCHING", ("stats", "refit") if aware else ())
        model, _ = quantize(source, "4/8", synthetic_inputs=x, check=False, activations="8", refine="stats")
        last = [node.output[0] for node in model.graph.node if node.op_type == "Conv"][-1]
        (reference,), (quantized,) = conv_outputs(source, [last], x), conv_outputs(model, [last], x)
        mismatch[aware] = np.max(np.abs(reference.mean((0, 2, 3)) - quantized.mean((0, 2, 3)))) / reference.std()
    assert mismatch[True] < 0.5 * mismatch[False], mismatch


def test_a_bias_computed_from_constants_is_not_an_activation():
    """Paddle exports add a conv's bias as Reshape(constant): quantizing it as an activation made OpenVINO
    refuse the model."""
    g = GraphBuilder(seed=4)
    bias = g.node("Reshape", [g.const("bias", g.rng.normal(0, 0.1, 8)), g.const_int("bias.shape", [1, 8, 1, 1])])
    h = g.node("Relu", [g.node("Add", [g.conv("x", 3, 8, name="stem"), bias])])
    h = g.node("Flatten", [g.node("GlobalAveragePool", [g.conv(h, 8, 8, name="conv")])])
    model, _ = quantize(g.model(g.gemm(h, 8, 10, name="fc")), "4/8", synthetic="pink", samples=8, check=False,
                        activations="8")
    quantized = {node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    assert bias not in quantized and len(quantized) >= 2
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    reference = run_model(model, x)
    assert np.abs(openvino_outputs(model, x) - reference).max() <= 0.05 * np.abs(reference).max()
