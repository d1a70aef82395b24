"""``--activations``: QuantizeLinear/DequantizeLinear on each quantized layer's input, ranges calibrated on
the synthetic inputs (``activations.py``, ``maths/ranges.py``)."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import chain_model, residual_model, run_model
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
    weights_only, _ = quantize(source, "4/8", synthetic_inputs=calibration, check=False)
    model, report = quantize(source, "4/8", synthetic_inputs=calibration, check=False, activations=bits)
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
    assert "activations quantized: 6 layer inputs, uint8 per tensor, mse ranges" in report.format_summary()


def test_activations_need_synthetic_inputs():
    two_inputs = chain_model()
    two_inputs.graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    with pytest.raises(InputError, match="--activations needs synthetic inputs"):
        quantize(two_inputs, "4/8", activations="8", check=False)


def test_openvino_runs_activation_quantized_outputs(resnet20):
    model, _ = quantize(str(resnet20), "4/8", synthetic="pink", samples=16, refine="none", check=False,
                        activations="8", storage="portable")
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    reference = run_model(model, x)
    # OpenVINO runs these layers on int8 kernels; its rounding differs from onnxruntime's float emulation
    got = openvino_outputs(model, x)
    assert np.abs(got - reference).max() <= 0.05 * np.abs(reference).max()
    assert np.array_equal(got.argmax(1), reference.argmax(1))


def test_activations_store_weights_portably_and_refuse_exact_storage():
    model, report = quantize(chain_model(), "2/6", synthetic="pink", samples=8, activations="8")
    assert report.storage == "portable" and report.check is not None  # onnxruntime loaded it: no INT2 kernels
    assert {t.data_type for t in model.graph.initializer} & {onnx.TensorProto.INT2, onnx.TensorProto.UINT2} == set()
    assert "(qdq portable," in report.format_summary()
    with pytest.raises(InputError, match="--activations needs --storage portable"):
        quantize(chain_model(), "2/6", activations="8", storage="exact")
    _, plain = quantize(chain_model(), "2/6", refine="none", protect="off", check=False)
    assert plain.storage == "exact"
