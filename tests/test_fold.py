import numpy as np
import onnx_graphsurgeon as gs

from conftest import GraphBuilder, chain_model, residual_model, run_model
from dfmpc_onnx.fold import fold_batchnorm
from dfmpc_onnx.graph import import_graph
from dfmpc_onnx.load import load_whole_model


def fold(model):
    graph = import_graph(load_whole_model(model))
    result = fold_batchnorm(graph)
    return gs.export_onnx(graph), result


def test_fold_keeps_the_network_and_removes_bn():
    for model in (chain_model(), residual_model()):
        folded, result = fold(model)
        assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
        assert len(result.folded) == sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(run_model(folded, x), run_model(model, x), rtol=1e-4, atol=1e-5)


def test_zero_variance_folds_without_dividing_by_zero():
    g = GraphBuilder()
    y = g.conv("x", 3, 4, name="c")
    y = g.node("BatchNormalization", [y, g.const("g", np.ones(4)), g.const("b", np.zeros(4)),
                                      g.const("m", np.zeros(4)), g.const("v", np.zeros(4))], epsilon=1e-5)
    folded, result = fold(g.model(y))
    assert result.folded
    weights = [t for t in folded.graph.initializer]
    assert all(np.all(np.isfinite(np.frombuffer(t.raw_data, np.float32))) for t in weights if t.raw_data)


def test_bn_not_after_conv_is_kept_with_reason():
    g = GraphBuilder()
    y = g.bn(g.node("Relu", [g.conv("x", 3, 4)]), 4, name="prebn")
    _, result = fold(g.model(y))
    assert result.unfolded == (("prebn", "not directly after a Conv"),)


def test_bn_after_shared_conv_output_is_kept():
    g = GraphBuilder()
    y = g.conv("x", 3, 4, name="c")
    z = g.node("Add", [g.bn(y, 4, name="bn"), y])
    _, result = fold(g.model(z))
    assert result.unfolded and "other consumers" in result.unfolded[0][1]
