import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import chain_model, residual_model, run_model
from dfmpc_onnx import quantize


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def dequantized_weights(model):
    """Conv/Gemm/MatMul name -> weight as onnxruntime computes it from the qdq model's integers, scales and
    offsets (only the constant nodes that feed the weights, run on their own)."""
    producers = {out for n in model.graph.node for out in n.output}
    targets = {node.name: node.input[1] for node in model.graph.node
               if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in producers}
    values = constant_values(model, list(targets.values()))
    return {name: values[tensor] for name, tensor in targets.items()}


def weight_scales(model):
    """Layer name -> the scales of its weight's (first) DequantizeLinear, as onnxruntime computes them."""
    nodes = {n.name.split(".DequantizeLinear")[0]: n.input[1] for n in model.graph.node
             if n.op_type == "DequantizeLinear" and n.name.endswith(".DequantizeLinear")}
    values = constant_values(model, list(nodes.values()))
    return {name: values[tensor] for name, tensor in nodes.items()}


def scale_step(model, layer):
    """The largest relative error of ``layer``'s stored scales: half a step of its uint8 codes
    (``storage.LogScales``), 0 where its scales are float32."""
    values = initializers(model)
    step = values.get(f"{layer}.weight_scale_step")
    return 0.0 if step is None else float(2.0 ** (float(step) / 2) - 1)


def constant_values(model, tensors):
    """Tensor name -> its value (float32) as onnxruntime computes it from the model's constants alone."""
    producers = {out: n for n in model.graph.node for out in n.output}
    stored = {t.name: t for t in model.graph.initializer}
    given = {name: numpy_helper.to_array(stored[name]).astype(np.float32) for name in tensors if name in stored}
    tensors = [name for name in tensors if name not in given]
    needed, pending = set(), list(tensors)
    while pending:
        name = pending.pop()
        if name in producers and producers[name].name not in needed:
            needed.add(producers[name].name)
            pending.extend(i for i in producers[name].input if i)
    half = model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    outputs = [onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT16 if half else onnx.TensorProto.FLOAT,
                                                  None) for t in dict.fromkeys(tensors)]
    nodes = [n for n in model.graph.node if n.name in needed]
    used = {i for n in nodes for i in n.input}
    graph = onnx.helper.make_graph(nodes, "weights", [], outputs, [stored[name] for name in used if name in stored])
    weights = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    session = ort.InferenceSession(weights.SerializeToString(), providers=["CPUExecutionProvider"])
    return given | {o.name: value.astype(np.float32) for o, value in zip(outputs, session.run(None, {}))}


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


def test_exact_storage_codes_each_scale_in_a_byte():
    """The default storage spends 8 bits per scale (``storage.LogScales``): the weights are the float format's
    up to half a step of each layer's scale codes, and the file is smaller than with float32 scales."""
    from dfmpc_onnx.report import stored_bits_per_weight

    model = residual_model()
    options = dict(check=False, synthetic="pink", keep_first=False)
    exact, _ = quantize(model, "4/8", **options)
    portable, _ = quantize(model, "4/8", storage="portable", **options)
    plain = float_weights(quantize(model, "4/8", format="float", **options)[0])
    codes = {t.name: t.data_type for t in exact.graph.initializer if t.name.endswith(".weight_scale_code")}
    assert len(codes) >= 4 and set(codes.values()) == {onnx.TensorProto.UINT8}
    for name, weight in dequantized_weights(exact).items():
        assert 0 < scale_step(exact, name) < 0.01
        np.testing.assert_allclose(weight, plain[name], rtol=scale_step(exact, name) * 1.001, atol=1e-30)
    assert stored_bits_per_weight(exact) < stored_bits_per_weight(portable)


def test_scale_codes_keep_every_scale_within_half_a_step():
    """s_j = S 2^(t (e_j - 128)), e_j in 1..255 spanning the layer's scales; e_j = 0 for a zero scale where
    the row's codes are not zero (DoReFa's odd codes), and for channels 2^16 below the largest; one scale:
    no codes."""
    from dfmpc_onnx.maths.quantizers import QuantizedWeight
    from dfmpc_onnx.storage import log_scales

    rng = np.random.default_rng(0)
    for spread in (0.5, 4.0, 15.9):
        scale = 2.0 ** rng.uniform(-12, -12 + spread, 64)
        stored = log_scales(QuantizedWeight(np.ones((64, 3), np.int8), scale, 4, 4))
        assert stored.codes.min() == 1 and stored.codes.max() == 255 and not stored.zeros
        half_step = 2.0 ** (float(stored.step) / 2) - 1
        assert half_step <= 2.0 ** (spread / 254 / 2) - 1 + 1e-6
        np.testing.assert_allclose(stored.values(), scale, rtol=half_step * 1.001 + 1e-6, atol=0)
    dead = np.array([0.0, 1e-3, 2e-3, 1e-3 * 2.0**-17])
    odd = QuantizedWeight(np.ones((4, 3), np.int8), dead, 4, 4)  # DoReFa codes: never zero
    stored = log_scales(odd)
    assert stored.zeros and list(stored.codes[[0, 3]]) == [0, 0] and np.all(stored.values()[[0, 3]] == 0)
    np.testing.assert_allclose(stored.values()[1:3], dead[1:3], rtol=1e-6)
    empty = QuantizedWeight(np.array([[0, 0], [1, -1], [2, 1]], np.int8), np.array([0.0, 1.0, 3.0]), 4, 4, "integer")
    assert not log_scales(empty).zeros and log_scales(empty).values()[0] > 0  # its codes are zero: any scale
    assert log_scales(QuantizedWeight(np.ones((3, 2), np.int8), np.full(3, 0.25), 4, 4)) is None
    with pytest.raises(ValueError):
        log_scales(QuantizedWeight(np.ones((2, 2), np.int8), np.array([1.0, -1.0]), 4, 4))


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
    bits = {layer.name: layer.bits for layer in report.layers}
    scales = weight_scales(model)
    assert scales.keys() == bits.keys() and 2 in bits.values()
    for name, scale in scales.items():
        per_channel = ternary_per_channel if bits[name] == 2 else high_per_channel
        assert (len(np.unique(scale)) > 1) is per_channel, (name, bits[name], scale)


@pytest.mark.parametrize("scheme, bits", [("2/2", 2), ("4/4", 4), ("6/6", 6), ("8/8", 8), ("3/3", 4), ("5/5", 6)])
def test_integer_parts_take_the_bits_of_the_scheme(scheme, bits):
    """Every quantized layer's integers take ``bits`` per weight in the file (3 and 5 bits have no type
    of their own: INT4, and INT4 + UINT2), packed; the report's figure adds the scales and offsets."""
    from dfmpc_onnx.report import _tensor_bytes

    qdq, report = quantize(chain_model(), scheme, check=False, refine="none")
    values = {t.name: t for t in qdq.graph.initializer}
    dq = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and ".DequantizeLinear" in n.name]
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
    scales = {n.name: n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.name.startswith("mm.D")}
    assert scales and all(next(a.i for a in n.attribute if a.name == "axis") == 1 for n in scales.values())
    np.testing.assert_allclose(dequantized_weights(qdq)["mm"], weight, rtol=scale_step(qdq, "mm") * 1.001, atol=0)
    x = np.random.default_rng(5).normal(size=(1, 3, 8, 8)).astype(np.float32)
    expected = run_model(flt, x)  # the same but for the scale codes' rounding (under 1 %)
    np.testing.assert_allclose(run_model(qdq, x), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())
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
