"""BatchNorm-statistics distillation; needs PyTorch (the optional extra), skipped without it."""

import sys

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from conftest import GraphBuilder, chain_model, residual_model, run_model
from dfmpc_onnx.distill import distill_inputs
from dfmpc_onnx.torch_graph import TorchGraph, fold_constant_subgraphs
from dfmpc_onnx.errors import InputError
from dfmpc_onnx.load import load_whole_model


def padded_shortcut_model():
    """A conv whose output is zero-padded on channels by pads computed from Shape arithmetic, as torch exports it."""
    g = GraphBuilder(input_shape=(1, 3, 8, 8))
    x = g.node("Relu", [g.bn(g.conv("x", 3, 4, name="a"), 4)])
    shape = g.node("Shape", [x])
    channels = g.node("Gather", [shape, g.const_int("one", 1)], axis=0)
    extra = g.node("Unsqueeze", [channels, g.const_int("zero_axis", [0])])
    pads = g.node("Concat", [g.const_int("p0", [0]), g.const_int("p1", [0]), g.const_int("p2", [0, 0, 0]),
                             extra, g.const_int("p3", [0, 0])], axis=0)
    padded = g.node("Pad", [x, pads], mode="constant")
    sliced = g.node("Slice", [padded, g.const_int("s", [0]), g.const_int("e", [8]), g.const_int("ax", [2]),
                              g.const_int("st", [2])])
    return g.model(g.node("Relu", [g.bn(g.conv(sliced, 8, 4, name="b"), 4)]))


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'dfmpc-onnx[distill]')")


@pytest.mark.parametrize("make", [chain_model, residual_model, padded_shortcut_model])
def test_torch_interpreter_matches_onnxruntime(torch, make):
    model = load_whole_model(make())
    graph = fold_constant_subgraphs(gs.import_onnx(model))
    assert not [n for n in graph.nodes if n.op in ("Shape", "Gather", "Concat")] or make is not padded_shortcut_model
    interpreter = TorchGraph(graph, torch)
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    values = {graph.inputs[0].name: torch.tensor(x)}
    for node in graph.nodes:
        args = [values.get(t.name, interpreter.constants.get(t.name)) for t in node.inputs]
        values[node.outputs[0].name] = interpreter.run_node(node, args)
    got = values[graph.outputs[0].name].detach().numpy()
    np.testing.assert_allclose(got, run_model(model, x), rtol=1e-4, atol=1e-5)


def test_distillation_lowers_the_batchnorm_loss_and_is_seeded(torch):
    model = load_whole_model(residual_model())
    graph = fold_constant_subgraphs(gs.import_onnx(model))
    interpreter = TorchGraph(graph, torch)
    start = distill_inputs(model, samples=8, seed=3, steps=0)
    done = distill_inputs(model, samples=8, seed=3, steps=40)
    # a fixed input shape of batch 1 in the tiny model: the interpreter runs any batch
    before = interpreter.batchnorm_loss(torch.tensor(start)).item()
    after = interpreter.batchnorm_loss(torch.tensor(done)).item()
    assert after < 0.5 * before
    np.testing.assert_array_equal(done, distill_inputs(model, samples=8, seed=3, steps=40))


def test_model_without_batchnorm_is_refused(torch):
    g = GraphBuilder()
    model = load_whole_model(g.model(g.node("Relu", [g.conv("x", 3, 4)])))
    with pytest.raises(InputError, match="needs BatchNormalization"):
        distill_inputs(model, samples=2, seed=0, steps=1)


def test_missing_torch_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(InputError, match="needs PyTorch"):
        distill_inputs(load_whole_model(chain_model()), samples=2, seed=0, steps=1)


def test_default_with_pytorch_is_refit_on_distilled_inputs_and_deterministic(torch):
    from dfmpc_onnx import quantize
    a, report = quantize(residual_model(), "2/6", check=False, samples=8)
    b, _ = quantize(residual_model(), "2/6", check=False, samples=8)
    assert (report.synthetic, report.refine) == ("distill", "refit")
    assert a.SerializeToString() == b.SerializeToString()


def test_distill_dynamic_spatial_dims_take_the_given_shape(torch):
    model = chain_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    with pytest.raises(InputError, match="--input-shape"):
        distill_inputs(load_whole_model(model), samples=2, seed=0, steps=1)
    x = distill_inputs(load_whole_model(model), samples=2, seed=0, steps=2, input_shape=(3, 12, 10))
    assert x.shape == (2, 3, 12, 10)
