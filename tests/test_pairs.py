import numpy as np

from conftest import GraphBuilder, chain_model, residual_model, run_model
from dfmpc_onnx import quantize
from dfmpc_onnx.fold import fold_batchnorm
from dfmpc_onnx.graph import find_layers, import_graph
from dfmpc_onnx.load import load_whole_model
from dfmpc_onnx.pairs import find_pairs


def search(model, fixed=None):
    graph = import_graph(load_whole_model(model))
    fold_batchnorm(graph)
    layers, _ = find_layers(graph)
    return find_pairs(graph, layers, fixed or {})


def pair_names(result):
    return [(p.producer, p.consumer) for p in result.pairs]


def test_plain_chain_alternates_low_high():
    result = search(chain_model(n_convs=4), fixed={"stem": "kept", "fc": "kept"})
    assert pair_names(result) == [("conv0", "conv1"), ("conv2", "conv3")]


def test_chain_without_fixed_layers_pairs_stem_and_reaches_gemm_through_flatten():
    result = search(chain_model(n_convs=3))
    assert pair_names(result) == [("stem", "conv0"), ("conv1", "conv2")]
    # an odd chain: conv2 -> fc is taken already, so nothing else pairs
    result = search(chain_model(n_convs=2))
    assert pair_names(result) == [("stem", "conv0"), ("conv1", "fc")]
    assert result.pairs[1].path == ("Relu", "GlobalAveragePool", "Flatten")
    assert (result.pairs[1].offset, result.pairs[1].block) == (0, 1)


def test_basic_block_pairs_conv1_conv2_and_residual_add_ends_chain():
    result = search(residual_model(), fixed={"fc": "kept"})
    assert pair_names(result) == [("block.conv1", "block.conv2")]
    reasons = {r.producer: r.reason for r in result.refusals}
    assert "feeds 2 nodes" in reasons["stem"]


def test_relu6_clip_is_refused_with_reason():
    g = GraphBuilder()
    x = g.conv("x", 3, 4, name="a")
    x = g.node("Clip", [x, g.const("lo", np.array(0.0)), g.const("hi", np.array(6.0))], name="relu6")
    out = g.conv(x, 4, 4, name="b")
    result = search(g.model(out))
    assert result.pairs == ()
    assert "not positively homogeneous" in result.refusals[0].reason and "relu6" in result.refusals[0].reason


def test_depthwise_consumer_and_concat_offset():
    g = GraphBuilder()
    a = g.node("Relu", [g.conv("x", 3, 4, name="a")])
    b = g.node("Relu", [g.conv("x", 3, 6, name="b")])
    cat = g.node("Concat", [a, b], axis=1)
    out = g.conv(cat, 10, 10, group=10, name="dw")
    result = search(g.model(out))
    # both producers compensate through dw, on disjoint channel slices
    assert pair_names(result) == [("a", "dw"), ("b", "dw")]
    assert [p.offset for p in result.pairs] == [0, 4]
    g2 = GraphBuilder()
    a = g2.node("Relu", [g2.conv("x", 3, 4, name="a")])
    pad = g2.node("Pad", [a, g2.const_int("pads", [0, 0, 1, 1, 0, 0, 1, 1])], mode="constant")
    b = g2.node("Relu", [g2.conv("x", 3, 6, name="b")])
    b = g2.node("Pad", [b, g2.const_int("pads2", [0, 0, 1, 1, 0, 0, 1, 1])], mode="constant")
    cat = g2.node("Concat", [pad, b], axis=1)
    out = g2.conv(cat, 10, 5, name="c")
    result = search(g2.model(out), fixed={"a": "kept"})
    assert pair_names(result) == [("b", "c")]
    assert result.pairs[0].offset == 4


def test_pad_on_channels_and_nonzero_pad_are_refused():
    g = GraphBuilder()
    a = g.conv("x", 3, 4, name="a")
    p = g.node("Pad", [a, g.const_int("pads", [0, 0, 1, 1, 0, 0, 1, 1]), g.const("v", np.array(1.0))], mode="constant")
    out = g.conv(p, 4, 4, name="b")
    result = search(g.model(out))
    assert result.pairs == () and "non-zero value" in result.refusals[0].reason


def test_flatten_of_spatial_map_gives_block_per_channel():
    g = GraphBuilder(input_shape=(1, 3, 4, 4))
    a = g.node("Relu", [g.conv("x", 3, 2, name="a")])
    flat = g.node("Flatten", [a], axis=1)
    out = g.gemm(flat, 32, 5, name="fc")
    result = search(g.model(out))
    assert pair_names(result) == [("a", "fc")]
    assert result.pairs[0].block == 16


def attention_model(heads: int = 2, tokens: int = 4, width: int = 8, seed: int = 0):
    """One self-attention block as exporters write it: Q, K, V MatMuls with bias Adds, heads split by
    Reshape and Transpose, softmax(Q K^T / sqrt(d)) V, heads merged, the output projection, then an MLP
    whose GELU is Erf."""
    g = GraphBuilder(input_shape=(1, tokens, width), seed=seed)
    head = width // heads

    def linear(x, fin, fout, name):
        w = g.const(f"{name}.w", g.rng.normal(0, 0.4, (fin, fout)))
        return g.node("Add", [g.node("MatMul", [x, w], name=name), g.const(f"{name}.b", g.rng.normal(0, 0.1, fout))])

    def split(x, perm):
        shape = g.const_int(f"split{g.count}", [1, tokens, heads, head])
        return g.node("Transpose", [g.node("Reshape", [x, shape])], perm=perm)

    q = split(linear("x", width, width, "query"), [0, 2, 1, 3])
    k = split(linear("x", width, width, "key"), [0, 2, 3, 1])
    v = split(linear("x", width, width, "value"), [0, 2, 1, 3])
    scores = g.node("MatMul", [g.node("Mul", [q, g.const("scale", np.array(head ** -0.5))]), k])
    mixed = g.node("MatMul", [g.node("Softmax", [scores], axis=-1), v])
    merged = g.node("Reshape", [g.node("Transpose", [mixed], perm=[0, 2, 1, 3]),
                                g.const_int("merge", [1, tokens, width])])
    y = g.node("Add", ["x", linear(merged, width, width, "output")])
    h = linear(y, width, 2 * width, "fc1")
    gelu = g.node("Mul", [g.node("Mul", [h, g.const("half", np.array(0.5))]),
                          g.node("Add", [g.node("Erf", [g.node("Div", [h, g.const("root2", np.array(2 ** 0.5))])]),
                                         g.const("one", np.array(1.0))])])
    return g.model(g.node("Add", [y, linear(gelu, 2 * width, width, "fc2")]))


def test_value_and_output_projections_pair_through_the_attention():
    """V's channel j, split into heads, mixed across tokens by the attention and merged again, is the output
    projection's input feature j: a pair. Q and K are summed over by the scores, and fc1's GELU is not
    positively homogeneous: refused, saying so."""
    graph = import_graph(load_whole_model(attention_model()))
    layers, _ = find_layers(graph)
    assert all(layer.bias is not None for layer in layers.values())  # the bias Adds belong to their MatMuls
    search = find_pairs(graph, layers, {})
    assert [(p.producer, p.consumer) for p in search.pairs] == [("value", "output")]
    assert search.pairs[0].path == ("Reshape", "Transpose", "MatMul", "Transpose", "Reshape")
    reasons = {r.producer: r.reason for r in search.refusals}
    assert "sums over the channels" in reasons["key"] and "attention scores" in reasons["query"]
    assert "Erf" in reasons["fc1"] and "not positively homogeneous" in reasons["fc1"]


def test_an_attention_pair_computes_the_same_with_c_on_either_side():
    """c on V's rows (producer placement) and on the output projection's input rows (consumer placement,
    Eq. 7) are the same network: the channel mapping through heads and attention is right."""
    model = attention_model(seed=3)
    options = dict(format="float", check=False, keep_first=False, keep_last=False, refine="none", protect="off")
    producer, report = quantize(model, "2/6", placement="producer", **options)
    consumer, _ = quantize(model, "2/6", placement="consumer", **options)
    assert [layer.name for layer in report.layers if layer.role == "low"] == ["value"]
    x = np.random.default_rng(4).normal(size=(1, 4, 8)).astype(np.float32)
    a, b = run_model(producer, x), run_model(consumer, x)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    qdq, _ = quantize(model, "2/6", keep_first=False, keep_last=False, refine="none", protect="off", check=False)
    np.testing.assert_allclose(run_model(qdq, x), a, rtol=2e-2, atol=2e-2 * np.abs(a).max())
