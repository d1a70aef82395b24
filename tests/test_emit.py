import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import chain_model, residual_model, run_model
from dfmpc_onnx import quantize


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def dequantized_weights(model):
    """Conv/Gemm name -> weight computed in numpy from the qdq model's integers, scales and offsets
    (the DequantizeLinear and Add nodes that feed it)."""
    values = initializers(model)
    producers = {n.output[0]: n for n in model.graph.node
                 if n.op_type in ("DequantizeLinear", "Add", "Mul", "Reshape", "Cast")}

    def evaluate(name):
        if name in values:
            return values[name] if values[name].dtype == np.int64 else values[name].astype(np.float32)
        node = producers[name]
        if node.op_type == "Add":
            return evaluate(node.input[0]) + evaluate(node.input[1])
        if node.op_type == "Mul":
            return evaluate(node.input[0]) * evaluate(node.input[1])
        if node.op_type == "Reshape":
            return evaluate(node.input[0]).reshape(evaluate(node.input[1]))
        if node.op_type == "Cast":  # float16 scales
            return evaluate(node.input[0])
        codes = values[node.input[0]].astype(np.float32)
        scale = evaluate(node.input[1])
        if scale.ndim == 1:
            shape = [1] * codes.ndim
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape[axis] = -1
            scale = scale.reshape(shape)
        return codes * scale

    return {node.name: evaluate(node.input[1]) for node in model.graph.node
            if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in producers}


def float_weights(model):
    values = initializers(model)
    return {n.name: values[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}


@pytest.mark.parametrize("make", [chain_model, residual_model])
@pytest.mark.parametrize("scheme", ["2/6", "3/6", "4/8", "2/5", "3/16"])
def test_qdq_integers_dequantize_exactly_to_the_float_format(make, scheme):
    """With float32 scales (portable storage; exact storage rounds them to float16, below)."""
    model = make()
    options = dict(check=False, synthetic="pink", keep_first=False, storage="portable")
    qdq, report = quantize(model, scheme, format="qdq", **options)
    flt, _ = quantize(model, scheme, format="float", **options)
    assert report.pairs
    from_codes = dequantized_weights(qdq)
    plain = float_weights(flt)
    assert from_codes.keys() == plain.keys()
    for name in plain:  # to float32 rounding: portable computes s q, the float format s (2 m + 1)
        np.testing.assert_allclose(from_codes[name], plain[name], rtol=1e-6, atol=1e-7)
    x = np.random.default_rng(3).normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(qdq, x), run_model(flt, x), rtol=1e-5, atol=1e-5)


def test_exact_storage_keeps_the_scales_in_float16():
    """The default storage spends 16 bits per scale: the weights are the float format's up to the float16
    rounding of each channel's scale (2^-11 relative), and the file is smaller than with float32 scales."""
    from dfmpc_onnx.report import stored_bits_per_weight

    model = residual_model()
    options = dict(check=False, synthetic="pink", keep_first=False)
    exact, _ = quantize(model, "4/8", **options)
    portable, _ = quantize(model, "4/8", storage="portable", **options)
    plain = float_weights(quantize(model, "4/8", format="float", **options)[0])
    scales = {t.name: t.data_type for t in exact.graph.initializer if t.name.endswith(".weight_scale")}
    assert scales and set(scales.values()) == {onnx.TensorProto.FLOAT16}
    for name, weight in dequantized_weights(exact).items():
        np.testing.assert_allclose(weight, plain[name], rtol=2.0**-11, atol=0)
        assert not np.array_equal(weight, plain[name]) or np.all(weight == 0)
    assert stored_bits_per_weight(exact) < stored_bits_per_weight(portable)


def test_scales_below_float16_are_shifted_into_its_range():
    """Folded BatchNorm leaves some channels' scales far below float16's normal numbers (ResNet-20: 1e-7):
    they are stored as float16 times a power of two, each within 2^-11 of the float32 scale."""
    from dfmpc_onnx.storage import stored_scale

    cases = {(1e-3, 0.5): False, (1.9e-7, 6e-8, 2e-3): True, (3e4, 7e4): True, (0.0, 1e-9): True}
    for scale, shifted in cases.items():
        values, k = stored_scale(np.array(scale), "exact")
        assert values.dtype == np.float16 and (k != 0) == shifted
        np.testing.assert_allclose(values.astype(np.float64) * 2.0**k, scale, rtol=2.0**-11, atol=0)
    values, k = stored_scale(np.array([1e-3, 1e-9]), "portable")
    assert values.dtype == np.float32 and k == 0


@pytest.mark.parametrize("make", [chain_model, residual_model])
def test_producer_and_consumer_placement_are_the_same_network(make):
    model = make()
    options = dict(format="float", check=False, keep_first=False, refine="none")
    producer, report = quantize(model, "2/6", placement="producer", **options)
    consumer, _ = quantize(model, "2/6", placement="consumer", **options)
    c = [layer for layer in report.layers if layer.role == "low"]
    assert c and any(abs(layer.c_min - 1) > 1e-3 or abs(layer.c_max - 1) > 1e-3 for layer in c)
    x = np.random.default_rng(4).normal(size=(1, 3, 8, 8)).astype(np.float32)
    a, b = run_model(producer, x), run_model(consumer, x)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    # and the placement matters for the weights themselves
    assert any(not np.array_equal(u, v) for u, v in zip(float_weights(producer).values(), float_weights(consumer).values()))


def test_qdq_storage_types_and_opset():
    qdq, report = quantize(chain_model(), "2/6", check=False, synthetic="pink")
    types = {t.data_type for t in qdq.graph.initializer if t.name.endswith(("int2", "int4", "int8"))}
    assert types == {onnx.TensorProto.INT2, onnx.TensorProto.UINT2, onnx.TensorProto.INT4}  # 6 bits: INT4 + UINT2
    assert report.opset_out == 25 and any("opset upgraded" in n for n in report.notes)
    qdq, _ = quantize(chain_model(), "3/6", check=False, synthetic="pink")
    assert onnx.TensorProto.INT4 in {t.data_type for t in qdq.graph.initializer}
    assert qdq.ir_version <= 13


def test_float_format_keeps_the_opset():
    flt, report = quantize(chain_model(), "2/6", format="float", check=False, synthetic="pink")
    assert report.opset_out == 17
    assert not [n for n in flt.graph.node if n.op_type == "DequantizeLinear"]


def test_no_compensation_leaves_weights_on_the_plain_ternary_grid():
    _, report = quantize(chain_model(), "2/6", compensate=False, check=False, synthetic="pink")
    assert all(layer.c_min is None for layer in report.layers)


@pytest.mark.parametrize("synthetic,refine,has_batchnorm,expected", [
    ("auto", "auto", True, ("distill", "refit", "optimal")),
    ("auto", "auto", False, ("pink", "stats", "twn")),
    ("noise", "auto", True, ("noise", "stats", "twn")),
    ("distill", "auto", False, ("distill", "stats", "twn")),  # no BatchNorm statistics: refit on them scored lower
    ("auto", "none", True, ("pink", "none", "twn")),  # for --protect's probe only: noise, not distillation
    ("auto", "bias", True, ("pink", "bias", "twn")),
])
def test_auto_options_resolve_by_the_model(synthetic, refine, has_batchnorm, expected):
    from dfmpc_onnx.options import ModelFacts, Options, resolve
    plan = resolve(Options(synthetic=synthetic, refine=refine), ModelFacts(has_batchnorm, None))
    assert (plan.synthetic, plan.refine, plan.ternary_threshold) == expected


@pytest.mark.parametrize("values", [dict(refine="none", protect="off"), dict(refine="bias", protect="off"),
                                    dict(refine="none", scheme="4")])
def test_nothing_wants_synthetic_inputs_without_refinement_or_protection(values):
    from dfmpc_onnx.options import ModelFacts, Options, resolve
    plan = resolve(Options(**values), ModelFacts(True, None))
    assert plan.synthetic is None and not plan.protect


def test_model_facts_see_batchnorm():
    from dfmpc_onnx.inputs import model_facts
    from dfmpc_onnx.load import load_whole_model
    with_bn, without_bn = load_whole_model(chain_model()), load_whole_model(chain_model())
    del without_bn.graph.node[:]
    assert model_facts(with_bn, {}).has_batchnorm and not model_facts(without_bn, {}).has_batchnorm


def test_same_input_same_bytes():
    a, _ = quantize(residual_model(), "2/6", check=False, synthetic="pink")
    b, _ = quantize(residual_model(), "2/6", check=False, synthetic="pink")
    assert a.SerializeToString() == b.SerializeToString()


@pytest.mark.parametrize("granularity,ternary_per_channel,high_per_channel",
                         [("tensor", False, False), ("channel", True, True), ("auto", False, True)])
def test_granularity_auto_is_per_tensor_ternary_and_per_channel_k_bit(granularity, ternary_per_channel,
                                                                      high_per_channel):
    model, report = quantize(chain_model(), "2/6", granularity=granularity, refine="none", compensate=False,
                             check=False)
    values = initializers(model)
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    cast = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}  # float16 scales
    roles = {layer.name: layer.role for layer in report.layers}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in dq:
            scale = dq[node.input[1]].input[1]
            scales = np.unique(values[cast.get(scale, scale)])
            per_channel = ternary_per_channel if roles[node.name] == "low" else high_per_channel
            assert (len(scales) > 1) is per_channel, (node.name, roles[node.name], scales)


@pytest.mark.parametrize("scheme, bits", [("2/2", 2), ("4/4", 4), ("6/6", 6), ("8/8", 8), ("3/3", 4), ("5/5", 6)])
def test_integer_parts_take_the_bits_of_the_scheme(scheme, bits):
    """Every quantized layer's integers take ``bits`` per weight in the file (3 and 5 bits have no type
    of their own: INT4, and INT4 + UINT2), packed; the report's figure adds the scales and offsets."""
    from dfmpc_onnx.report import _tensor_bytes

    qdq, report = quantize(chain_model(), scheme, check=False, refine="none")
    values = {t.name: t for t in qdq.graph.initializer}
    dq = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    per_layer = {}
    for node in dq:
        layer = node.name.split(".DequantizeLinear")[0]
        integers = values[node.input[0]]
        per_layer.setdefault(layer, [0, int(np.prod(integers.dims))])[0] += 8 * _tensor_bytes(integers)
    assert per_layer and all(total / count == pytest.approx(bits, abs=0.5 / count * 8)
                             for total, count in per_layer.values())
    rows = {n.name.split(".DequantizeLinear")[0]: int(values[n.input[0]].dims[0]) for n in dq}  # axis 0 convs
    weights = sum(count for _, count in per_layer.values())
    small_constants = 8 * (4 + 4 + 8 * 4)  # per layer at most: two float factors, a 4-d shape
    # one float scale per row; everything else is a few bytes per layer
    assert bits <= report.stored_bits <= bits + (32 * sum(rows.values()) + small_constants * len(rows)) / weights


@pytest.mark.parametrize("scheme", ["6/6", "4/4", "8/8"])
def test_matmul_weights_with_output_channels_on_axis_1(scheme):
    """A MatMul weight is (in, out): its scales run along axis 1, and so must the DoReFa offset."""
    from conftest import GraphBuilder

    g = GraphBuilder()
    x = g.node("Flatten", [g.node("GlobalAveragePool", [g.conv("x", 3, 8, name="stem")])])
    w = g.const("mm.w", g.rng.normal(0, 0.3, (8, 16)) * np.linspace(0.1, 3.0, 16))  # columns of unequal range
    model = g.model(g.node("MatMul", [x, w], name="mm"))
    qdq, _ = quantize(model, scheme, format="qdq", check=False, refine="none", granularity="channel")
    flt, _ = quantize(model, scheme, format="float", check=False, refine="none", granularity="channel")
    values = initializers(flt)
    weight = next(values[n.input[1]] for n in flt.graph.node if n.op_type == "MatMul")
    scales = {n.name: n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.name.startswith("mm.")}
    assert scales and all(next(a.i for a in n.attribute if a.name == "axis") == 1 for n in scales.values())
    np.testing.assert_allclose(dequantized_weights(qdq)["mm"], weight, rtol=2.0**-11, atol=0)  # float16 scales
    x = np.random.default_rng(5).normal(size=(1, 3, 8, 8)).astype(np.float32)
    expected = run_model(flt, x)
    np.testing.assert_allclose(run_model(qdq, x), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    original = initializers(model)["mm.w"]  # per column, the error is at most half a step of that column's grid
    step = np.abs(original).max(axis=0) / (2 ** int(scheme[0]) - 1)
    assert np.all(np.abs(weight - original) <= step * 1.0001)


@pytest.mark.parametrize("dtype_name, low, high", [("int4", -8, 8), ("int2", -2, 2), ("uint2", 0, 4)])
@pytest.mark.parametrize("shape", [(3, 5, 3, 3), (7,), (1,)])
def test_packing_matches_onnx(dtype_name, low, high, shape):
    """The Numba packer lays sub-byte integers out exactly as onnx's own numpy_helper does."""
    import ml_dtypes
    from dfmpc_onnx.emit import packed_tensor

    dtype = getattr(ml_dtypes, dtype_name)
    values = np.random.default_rng(len(shape)).integers(low, high, size=shape).astype(np.int8)
    ours, theirs = packed_tensor("t", values, dtype), numpy_helper.from_array(values.astype(dtype), "t")
    assert (ours.raw_data, ours.data_type, list(ours.dims)) == (theirs.raw_data, theirs.data_type, list(theirs.dims))
    np.testing.assert_array_equal(numpy_helper.to_array(ours).astype(np.int8), values)
