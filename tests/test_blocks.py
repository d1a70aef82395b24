"""``--scale-block``: a quantizer scale per block of weights along each output channel's inputs, stored as
DequantizeLinear's ``block_size``; and what ``auto`` does in a transformer (dead-leaves inputs, error feedback)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import GraphBuilder, run_model
from dfmpc_onnx import quantize
from dfmpc_onnx.errors import InputError
from dfmpc_onnx.maths.feedback import code_levels, feedback_codes, output_errors
from dfmpc_onnx.maths.noise import dead_leaves
from dfmpc_onnx.maths.quantizers import quantize_rows
from dfmpc_onnx.options import ModelFacts, Options, resolve
from dfmpc_onnx.storage import stored_rows
from test_pairs import attention_model
from test_storage import openvino_outputs


def test_each_block_is_quantized_on_its_own_range():
    """An outlier input costs the other weights of its row nothing outside its block: each block's largest
    weight sets its scale (integer grid), so the rest of the row keeps its resolution."""
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 0.1, (8, 64))
    rows[:, 5] = 3.0  # one input feature with large weights, as transformers have
    blocked = quantize_rows(rows, 4, True, kbit_grid="integer", block=16)
    channel = quantize_rows(rows, 4, True, kbit_grid="integer")
    assert blocked.scale.shape == (8, 4) and blocked.block == 16
    np.testing.assert_allclose(blocked.scale, np.abs(rows).reshape(8, 4, 16).max(axis=2) / 7)
    error = np.abs(blocked.dequantize() - rows)
    assert np.all(error <= blocked.entry_scales() / 2 + 1e-7)
    rest = np.ones(64, bool)
    rest[:16] = False
    assert np.square(error[:, rest]).sum() < 0.05 * np.square(channel.dequantize() - rows)[:, rest].sum()


def test_a_gain_per_channel_scales_every_block_of_its_row():
    q = quantize_rows(np.random.default_rng(1).normal(size=(4, 32)), 4, True, kbit_grid="integer", block=8)
    gain = np.array([1.0, 2.0, 0.5, 3.0])
    np.testing.assert_allclose(q.scaled(gain).dequantize(), q.dequantize() * gain[:, None].astype(np.float32), rtol=1e-6)


def test_error_feedback_rounds_blocks_on_their_own_scales():
    """GPTQ's column loop with a scale per block: the codes stay on the grid and the output error on
    correlated inputs falls below plain rounding's."""
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(16, 64))
    x = rng.normal(size=(512, 64)) @ rng.normal(size=(64, 64))
    h = x.T @ x
    q = quantize_rows(rows, 3, True, kbit_grid="integer", block=16)
    codes = feedback_codes(rows, h, q.entry_scales(), code_levels(q))
    assert set(np.unique(codes)) <= set(code_levels(q))
    fed = codes * q.entry_scales()
    assert output_errors(rows, fed, [h]).sum() < 0.8 * output_errors(rows, q.dequantize().astype(np.float64), [h]).sum()


def run_float_activations(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime's output with float activations: its default fuses DequantizeLinear -> MatMul of 4-bit
    weights into MatMulNBits and computes that with int8 activations (accuracy level 4; README)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _block_attrs(model: onnx.ModelProto) -> list[dict]:
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)]


@pytest.mark.parametrize("storage", ["exact", "portable"])
def test_a_transformer_gets_block_scales_that_both_runtimes_run(storage):
    """--scale-block auto in a model with MatMuls over tokens: a scale per 32 weights where a layer has 64
    inputs or more, in DequantizeLinear blocks along the input axis; onnxruntime and OpenVINO compute what
    the float format's weights compute (the float format keeps the scales exact, portable storage too)."""
    model = attention_model(tokens=4, width=64)
    options = dict(refine="none", protect="off", check=False, samples=8)
    qdq, report = quantize(model, "4", storage=storage, **options)
    floats, _ = quantize(model, "4", format="float", **options)
    blocks = _block_attrs(qdq)
    assert len(blocks) == 6 and all(b["block_size"] == 32 and b["axis"] == 0 for b in blocks)  # MatMul: (in, out)
    assert any("a scale per 32 weights" in note for note in report.notes)
    x = np.random.default_rng(3).normal(size=(1, 4, 64)).astype(np.float32)
    expected = run_model(floats, x)
    close = 1e-4 if storage == "portable" else 2e-2  # exact stores each scale in a byte, within about 1 %
    np.testing.assert_allclose(run_float_activations(qdq, x), expected, rtol=close, atol=close * np.abs(expected).max())
    if storage == "portable":
        np.testing.assert_allclose(openvino_outputs(qdq, x), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_a_transformer_whose_weights_are_constant_nodes_is_one_too():
    """Exporters write weights as initializers or as Constant nodes: both are MatMuls over tokens."""
    model = attention_model(tokens=4, width=64)
    weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    for tensor in weights:
        model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [tensor.name], value=tensor))
        model.graph.initializer.remove(tensor)
    qdq, report = quantize(model, "4", refine="none", protect="off", check=False, samples=8)
    assert any("a scale per 32 weights" in note for note in report.notes)
    assert len(_block_attrs(qdq)) == 6


def test_a_1x1_conv_takes_blocks_along_its_input_channels_and_the_budget_counts_them():
    from dfmpc_onnx.report import stored_bits_per_weight

    g = GraphBuilder(input_shape=(1, 64, 4, 4))
    out = g.conv(g.node("Relu", [g.conv("x", 64, 64, k=1, name="a")]), 64, 8, k=1, name="b")
    model = g.model(out)
    options = dict(refine="none", protect="off", check=False, scale_block=16)
    qdq, report = quantize(model, "4", storage="portable", **options)
    floats, _ = quantize(model, "4", format="float", **options)
    assert [b["block_size"] for b in _block_attrs(qdq)] == [16, 16] and all(b["axis"] == 1 for b in _block_attrs(qdq))
    x = np.random.default_rng(4).normal(size=(1, 64, 4, 4)).astype(np.float32)
    expected = run_model(floats, x)
    np.testing.assert_allclose(run_float_activations(qdq, x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    weights = 64 * 64 + 64 * 8
    assert stored_bits_per_weight(qdq) == pytest.approx((4 * weights + 32 * weights / 16) / weights, rel=1e-3)


def test_block_scales_stored_in_a_byte_each_keep_the_weights():
    """exact storage keeps a block's scale as a uint8 code on a log scale (as per channel): the weights it
    gives are within half a code step of the quantizer's."""
    q = quantize_rows(np.random.default_rng(5).lognormal(size=(6, 64)), 4, True, kbit_grid="integer", block=16)
    from dfmpc_onnx.storage import with_stored_scale

    stored, codes = with_stored_scale(q, "exact")
    assert codes.codes.shape == (6, 4) and codes.codes.dtype == np.uint8
    np.testing.assert_allclose(stored_rows(stored, "exact"), q.dequantize(), rtol=2 ** (codes.step / 2) - 1 + 1e-6)


@pytest.mark.parametrize("value", ["1", "-3", "2.5", "x", 1, True])
def test_bad_scale_blocks_are_input_errors(value):
    with pytest.raises(InputError, match="--scale-block"):
        Options(scale_block=value)


def test_auto_resolves_per_model():
    transformer = ModelFacts(has_batchnorm=False, obstacle=None, tokens=True)
    cnn = ModelFacts(has_batchnorm=False, obstacle=None)
    plan = resolve(Options(), transformer)
    assert (plan.scale_block, plan.synthetic, plan.feedback) == (32, "leaves", True)
    assert any(d.startswith("transformer (MatMuls over tokens)") for d in plan.decisions)
    assert (resolve(Options(), cnn).scale_block, resolve(Options(), cnn).synthetic) == (0, "pink")
    assert resolve(Options(scale_block="0", error_feedback="off"), transformer).scale_block == 0
    assert resolve(Options(scale_block=64), cnn).scale_block == 64
    sequences = ModelFacts(has_batchnorm=False, obstacle=None, tokens=True, images=False)
    assert resolve(Options(), sequences).synthetic == "pink"  # no images to paint leaves on (white noise, as pink)


def test_dead_leaves_are_flat_regions_with_shared_colours_and_repeat_by_seed():
    x = dead_leaves((4, 3, 64, 64), np.random.default_rng(6))
    np.testing.assert_array_equal(x, dead_leaves((4, 3, 64, 64), np.random.default_rng(6)))
    same_as_right = np.mean(x[..., 1:] == x[..., :-1])
    assert same_as_right > 0.6  # occluding disks: most neighbours share a colour (white noise: none)
    correlation = np.corrcoef(x[:, 0].ravel(), x[:, 1].ravel())[0, 1]
    assert 0.6 < correlation < 0.95
    assert 0.5 < x.std() < 1.5 and np.abs(x.mean(axis=(2, 3))).max() > 0.1  # each image has its own mean colour
