"""``--storage``: exact (the width's own bits) and portable (INT4/INT8 only), same weights, and a second
runtime: OpenVINO's CPU plugin runs the outputs where OpenVINO installs."""

import numpy as np
import onnx
import pytest

from conftest import chain_model, residual_model, run_model
from dfmpc_onnx import quantize
from dfmpc_onnx.maths.quantizers import quantize_rows
from dfmpc_onnx.storage import split_codes, storage_parts, stored_rows
from test_emit import dequantized_weights, scale_step

SCHEMES = ["2/6", "3/6", "4/8", "6", "8", "2/4"]
PORTABLE_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.INT8}


@pytest.mark.parametrize("storage", ["portable", "int8"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_portable_rows_equal_the_exact_ones(bits, storage):
    rows = np.random.default_rng(bits).standard_normal((6, 27)).astype(np.float32)
    q = quantize_rows(rows, bits, True, "twn", "max")
    exact, portable = stored_rows(q, "exact"), stored_rows(q, storage)
    np.testing.assert_allclose(portable, exact, rtol=1e-6, atol=1e-7)
    for (dtype, _), part in zip(storage_parts(bits, storage), split_codes(q, storage)):
        assert storage == "portable" or dtype is np.int8
        info = np.iinfo(np.int8) if dtype is np.int8 else (-8, 7)
        low, high = (info.min, info.max) if hasattr(info, "min") else info
        assert low <= part.min() and part.max() <= high, (bits, dtype)


@pytest.mark.parametrize("storage,types,opset", [("portable", PORTABLE_TYPES, 21), ("int8", {onnx.TensorProto.INT8}, 13)])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_portable_output_uses_int4_and_int8_at_opset_21_at_most(scheme, storage, types, opset):
    model = residual_model()
    exact, _ = quantize(model, scheme, refine="none", protect="off", check=False)
    portable, _ = quantize(model, scheme, refine="none", protect="off", check=False, storage=storage)
    integer_types = {t.data_type for t in portable.graph.initializer} - {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    assert integer_types <= types
    assert max(o.version for o in portable.opset_import if o.domain in ("", "ai.onnx")) <= max(opset, 17)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    expected = run_model(exact, x)  # the same network, but for the scales, in a byte each in exact storage
    np.testing.assert_allclose(run_model(portable, x), expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())
    for name, weight in dequantized_weights(exact).items():
        np.testing.assert_allclose(dequantized_weights(portable)[name], weight,
                                   rtol=scale_step(exact, name) * 1.001 + 1e-6, atol=1e-7)


def test_portable_weights_up_to_7_bits_are_one_dequantizelinear_feeding_the_layer():
    model, _ = quantize(chain_model(), "2/6", refine="none", protect="off", check=False, storage="portable")
    producers = {n.output[0]: n for n in model.graph.node}
    weighted = [n for n in model.graph.node if n.op_type == "Conv"]
    assert weighted and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in weighted)


def openvino_outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed here (pip install openvino)")
    core = ov.Core()
    # by default the CPU plugin computes in bf16 on processors that have it, and quantizes the activations
    # of layers whose weights come from one DequantizeLinear to int8 on the fly: both off, to compare the
    # same arithmetic
    config = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", config)
    return compiled(x)[compiled.outputs[0]]


@pytest.mark.parametrize("scheme,storage,format", [(s, "portable", "qdq") for s in SCHEMES]
                         + [("4/8", "exact", "qdq"), ("4", "exact", "qdq"), ("8", "exact", "qdq"), ("2/6", "int8", "qdq"),
                            ("2/6", "exact", "float")])
def test_openvino_runs_the_output_as_onnxruntime_does(resnet20, scheme, storage, format):
    model, _ = quantize(str(resnet20), scheme, refine="none", protect="off", check=False, storage=storage,
                        format=format)
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    reference = run_model(model, x)
    np.testing.assert_allclose(openvino_outputs(model, x), reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())


def test_the_report_says_which_runtimes_load_the_storage_it_chose():
    _, exact = quantize(chain_model(), "2/6", refine="none", protect="off", check=False)
    _, portable = quantize(chain_model(), "2/6", refine="none", protect="off", check=False, storage="portable")
    assert any("OpenVINO 2026.4 refuses it" in note for note in exact.notes)
    assert not any("OpenVINO" in note for note in portable.notes)


def test_openvino_refuses_int2_storage_as_the_note_says(resnet20):
    model, _ = quantize(str(resnet20), "2/6", refine="none", protect="off", check=False)
    with pytest.raises(Exception):
        openvino_outputs(model, np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize("storage", ["exact", "portable"])
@pytest.mark.parametrize("scheme", ["2/6", "4/8", "3/5"])
def test_the_budget_counts_every_bit_the_file_spends(scheme, storage):
    """What ``--target-bits`` budgets (``stored_weight_bits`` per layer, ``shared_constant_bits`` once) is
    what the file spends, measured from it: per-channel scales everywhere, so the layers' bits are exact
    and only the shared constants may cost less than reserved."""
    from dfmpc_onnx.graph import find_layers, import_graph
    from dfmpc_onnx.report import stored_bits_per_weight
    from dfmpc_onnx.storage import shared_constant_bits, stored_weight_bits

    model = residual_model()
    qdq, report = quantize(model, scheme, storage=storage, granularity="channel", check=False, synthetic="pink",
                           samples=8)
    layers, _ = find_layers(import_graph(model))
    bits = {layer.name: layer.bits for layer in report.layers}
    assert bits.keys() == layers.keys()
    weights = sum(layer.weight.size for layer in layers.values())
    spent = stored_bits_per_weight(qdq) * weights
    grid = "dorefa"
    budgeted = sum(stored_weight_bits(bits[name], layer.weight.shape, layer.out_axis, True, storage, grid)
                   for name, layer in layers.items())
    shared = shared_constant_bits({layer.weight.ndim for layer in layers.values()}, storage, (grid,))
    assert budgeted <= spent + 1e-6 <= budgeted + shared + 1e-6
