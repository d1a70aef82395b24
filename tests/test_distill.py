"""Distillation of synthetic inputs, run by onnxruntime with the core dependencies only."""

import numpy as np
import onnx
import pytest

from conftest import GraphBuilder, chain_model, residual_model, run_model
from dfmpc_onnx import quantize
from dfmpc_onnx.distill import Priors, batchnorm_loss, class_targets, distill_inputs, with_input_shape
from dfmpc_onnx.errors import InputError
from dfmpc_onnx.gradient_rules import RULES
from dfmpc_onnx.gradients import gradient_model, prepare_forward
from dfmpc_onnx.load import load_whole_model
from dfmpc_onnx.maths.noise import noise_batch
from dfmpc_onnx.runtime import graph_session


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


def noise_start(model, samples, seed):
    """Pink noise of the model's input shape, as the synthetic stage starts distillation from."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return noise_batch([samples] + dims[1:], "pink", samples, seed)


def loss_of(model, x, loss=batchnorm_loss, feed=None):
    forward = prepare_forward(with_input_shape(model, len(x)))
    session = graph_session(gradient_model(forward, loss, [], RULES), forward, "test")
    return float(session.run(["loss"], {forward.graph.input[0].name: x, **(feed or {})})[0])


@pytest.mark.parametrize("make", [chain_model, residual_model, padded_shortcut_model])
def test_the_prepared_forward_graph_computes_the_model(make):
    model = load_whole_model(make())
    forward = prepare_forward(model)
    assert not [n for n in forward.graph.node if n.op_type in ("Shape", "Gather")]
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(forward, x), run_model(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [residual_model, padded_shortcut_model])
def test_distillation_lowers_the_batchnorm_loss_and_is_seeded(make):
    model = load_whole_model(make())
    start = distill_inputs(model, noise_start(model, 8, 3), seed=3, steps=0)
    done = distill_inputs(model, noise_start(model, 8, 3), seed=3, steps=40)
    assert loss_of(model, done) < 0.5 * loss_of(model, start)
    np.testing.assert_array_equal(done, distill_inputs(model, noise_start(model, 8, 3), seed=3, steps=40))


def test_model_without_batchnorm_is_refused_for_batchnorm_statistics():
    g = GraphBuilder()
    model = load_whole_model(g.model(g.node("Relu", [g.conv("x", 3, 4)])))
    with pytest.raises(InputError, match="needs BatchNormalization"):
        distill_inputs(model, noise_start(model, 2, 0), seed=0, steps=1, objective="batchnorm")
    with pytest.raises(InputError, match="needs a classifier"):
        distill_inputs(model, noise_start(model, 2, 0), seed=0, steps=1, objective="logits")


def test_the_logits_objective_drives_samples_to_their_classes():
    model = load_whole_model(chain_model())
    done = distill_inputs(model, noise_start(model, 10, 1), seed=1, steps=60, objective="logits", priors=Priors(tv=1e-3, l2=1e-4))
    targets = class_targets(10, 10, seed=1)
    assert sorted(targets) == list(range(10))

    def cross_entropy(x):
        logits = np.concatenate([run_model(model, x[i:i + 1]) for i in range(10)]).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(10), targets]))
    start = noise_start(model, 10, 1)
    assert cross_entropy(done) < 0.5 * cross_entropy(start)


def test_default_is_refit_on_distilled_inputs_and_deterministic():
    a, report = quantize(residual_model(), "2/6", check=False, samples=8)
    b, _ = quantize(residual_model(), "2/6", check=False, samples=8)
    assert (report.synthetic, report.refine, report.ternary_threshold) == ("distill", "refit", "optimal")
    assert a.SerializeToString() == b.SerializeToString()


def test_distill_dynamic_spatial_dims_take_the_given_shape():
    model = chain_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    start = noise_batch([2, 3, 12, 10], "pink", 2, 0)
    x = distill_inputs(load_whole_model(model), start, seed=0, steps=2)
    assert x.shape == (2, 3, 12, 10) and not np.array_equal(x, start)


def test_an_unsupported_op_falls_back_to_pink_noise_with_a_note():
    g = GraphBuilder()
    x = g.node("Relu", [g.bn(g.conv(g.node("Sin", ["x"]), 3, 4, name="a"), 4)])
    model = g.model(g.conv(x, 4, 4, name="b"))
    _, report = quantize(model, "2/6", check=False, samples=4)
    assert (report.synthetic, report.refine) == ("pink", "stats")
    assert any("distillation not possible (distillation does not support the op Sin" in n for n in report.notes)
