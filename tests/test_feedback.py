"""Rounding with error feedback (GPTQ): the maths against brute force, and the stage in the pipeline."""

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from conftest import chain_model, run_model
from dfmpc_onnx import quantize
from dfmpc_onnx.maths.feedback import (DAMPING, NOISE_DAMPING, RANGE_FRACTIONS, code_levels, feature_covariance,
                                       feedback_codes, nearest_level, output_errors, output_fitted, patch_covariance)
from dfmpc_onnx.maths.quantizers import dorefa_quantize, integer_quantize, ternary_quantize


def output_error(rows, codes, scale, h):
    """sum over the inputs of ||(W - W^) x||^2 = tr(E H E^T)."""
    e = rows - codes * scale[:, None]
    return float(np.einsum("ij,jk,ik->", e, h, e))


def correlated_inputs(rng, count, d):
    mix = rng.normal(size=(d, d)) + 3 * np.eye(d)
    return rng.normal(size=(count, d)) @ mix + 0.5


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_feedback_lowers_the_output_error_of_nearest_rounding_on_the_same_grid(bits):
    rng = np.random.default_rng(bits)
    rows = rng.normal(size=(16, 48))
    x = correlated_inputs(rng, 400, 48)
    h = feature_covariance(x)[0]
    q = ternary_quantize(rows, per_channel=True) if bits == 2 else dorefa_quantize(rows, bits, per_channel=True)
    levels = code_levels(q)
    codes = feedback_codes(rows, h, q.entry_scales(), levels)
    assert set(np.unique(codes)) <= set(levels)
    nearest = nearest_level(rows / q.scale[:, None], levels)
    assert output_error(rows, codes, q.scale, h) < 0.8 * output_error(rows, nearest, q.scale, h)


def test_with_uncorrelated_inputs_feedback_is_nearest_rounding():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(8, 20))
    q = dorefa_quantize(rows, 4, per_channel=True)
    h = np.diag(rng.uniform(1, 2, size=20))
    np.testing.assert_array_equal(feedback_codes(rows, h, q.entry_scales(), code_levels(q)),
                                  nearest_level(rows / q.scale[:, None], code_levels(q)))


def test_damping_leans_the_feedback_towards_nearest_rounding():
    """H + lambda mean(diag H) I: the larger lambda, the less error is fed back; without bound, none (the
    damping for noise inputs, ``NOISE_DAMPING``, sits between GPTQ's and that)."""
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(16, 48))
    h = feature_covariance(correlated_inputs(rng, 400, 48))[0]
    q = dorefa_quantize(rows, 3, per_channel=True)
    nearest = nearest_level(rows / q.scale[:, None], code_levels(q))
    moved = [np.sum(feedback_codes(rows, h, q.entry_scales(), code_levels(q), damping) != nearest)
             for damping in (DAMPING, NOISE_DAMPING, 1e9)]
    assert moved[0] > moved[1] > moved[2] == 0


@pytest.mark.parametrize("group, stride, pads, dilation", [(1, 1, (1, 1, 1, 1), 1), (2, 2, (0, 1, 2, 0), 1),
                                                          (4, 1, (2, 2, 2, 2), 2)])
def test_patch_covariance_gives_the_conv_output_energy(group, stride, pads, dilation):
    """sum y^2 of a conv equals tr(W H W^T) with H from the patches, for every group."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 7, 6)).astype(np.float32)
    w = rng.normal(size=(4, 4 // group, 3, 3)).astype(np.float32)
    import onnx
    from onnx import helper
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, strides=[stride] * 2, pads=list(pads),
                            dilations=[dilation] * 2)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(w, "w")])
    y = run_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), x).astype(np.float64)
    hs = patch_covariance(x, (3, 3), pads, (stride, stride), (dilation, dilation), group)
    per = 4 // group
    rows = w.reshape(4, -1).astype(np.float64)
    for g, h in enumerate(hs):
        block = rows[g * per:(g + 1) * per]
        assert np.einsum("ij,jk,ik->", block, h, block) == pytest.approx(np.sum(y[:, g * per:(g + 1) * per] ** 2),
                                                                          rel=1e-5)


def test_the_stage_rewrites_codes_and_says_so():
    model = chain_model()
    on, report_on = quantize(model, "2/6", error_feedback="on", refine="none", synthetic="pink", check=False)
    off, report_off = quantize(model, "2/6", error_feedback="off", refine="none", synthetic="pink", check=False)
    assert report_on.feedback and not report_off.feedback
    assert "error feedback" in report_on.format_summary()
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert not np.array_equal(run_model(on, x), run_model(off, x))


def test_auto_feeds_back_only_with_refit():
    _, distilled = quantize(chain_model(), "2/6", refine="refit", synthetic="pink", check=False)
    _, matched = quantize(chain_model(), "2/6", refine="stats", synthetic="pink", check=False)
    assert distilled.feedback and not matched.feedback


def test_a_model_whose_only_quantized_layer_reads_the_graph_input():
    """Its H comes from the inputs themselves: no onnxruntime run, and no graph with no outputs to build one."""
    rest = ("conv0", "conv1", "conv2", "conv3", "fc")
    on, report = quantize(chain_model(), "4", exclude=rest, error_feedback="on", refine="none", synthetic="pink",
                          check=False)
    off, _ = quantize(chain_model(), "4", exclude=rest, error_feedback="off", refine="none", synthetic="pink",
                      check=False)
    assert report.feedback and [layer.name for layer in report.layers if layer.bits] == ["stem"]
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert not np.array_equal(run_model(on, x), run_model(off, x))


def heavy_tailed_rows(rng, channels, d):
    """Weights as transformer MLPs have them: most small, a few far out (Student's t with 2 degrees)."""
    return rng.standard_t(2, size=(channels, d))


@pytest.mark.parametrize("per_channel", [True, False])
def test_the_output_fitted_weight_never_loses_to_max_ranges_on_either_grid(per_channel):
    rng = np.random.default_rng(3)
    rows = heavy_tailed_rows(rng, 12, 40)
    h = feature_covariance(correlated_inputs(rng, 300, 40))
    fitted = output_fitted(rows, 4, ("dorefa", "integer"), RANGE_FRACTIONS, per_channel, h)
    error = output_errors(rows, fitted.dequantize().astype(np.float64), h).sum()
    plain = [output_errors(rows, q.dequantize().astype(np.float64), h).sum()
             for q in (dorefa_quantize(rows, 4, per_channel), integer_quantize(rows, 4, per_channel))]
    assert error <= min(plain)
    if per_channel:  # some row is better clipped: strictly below either grid's max ranges
        assert error < min(plain)
    else:
        assert np.unique(fitted.scale).size == 1


def test_the_fitted_range_clips_weights_whose_inputs_carry_no_energy():
    """An outlier weight on an input that is always zero moves no output: the range need not cover it."""
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(6, 30))
    rows[:, 0] = 40.0
    x = correlated_inputs(rng, 300, 30)
    x[:, 0] = 0.0
    h = feature_covariance(x)
    fitted = output_fitted(rows, 4, ("integer",), RANGE_FRACTIONS, True, h)
    plain = integer_quantize(rows, 4, per_channel=True)
    assert np.all(fitted.scale < 0.6 * plain.scale)  # alpha goes down to 0.4
    assert (output_errors(rows, fitted.dequantize().astype(np.float64), h).sum()
            < 0.5 * output_errors(rows, plain.dequantize().astype(np.float64), h).sum())


def test_the_grid_is_chosen_per_layer_from_the_two_fixed_grids():
    options = dict(refine="none", synthetic="pink", check=False, format="float")
    auto, report = quantize(chain_model(), "4", kbit_grid="auto", **options)
    fixed = {grid: quantize(chain_model(), "4", kbit_grid=grid, **options)[0] for grid in ("dorefa", "integer")}
    weights = {name: {i.name: i for i in model.graph.initializer} for name, model in [("auto", auto), *fixed.items()]}
    for name, tensor in weights["auto"].items():
        assert any(np.array_equal(onnx.numpy_helper.to_array(tensor), onnx.numpy_helper.to_array(weights[grid][name]))
                   for grid in fixed), name
    note = next(n for n in report.notes if n.startswith("--kbit-grid auto"))
    assert "k-bit layer" in note and " grid" in note


def test_fitting_to_outputs_makes_synthetic_inputs_even_without_refinement():
    options = dict(refine="none", synthetic="pink", check=False, format="float")
    fitted, _ = quantize(chain_model(), "4", kbit_range="output", **options)
    plain, _ = quantize(chain_model(), "4", **options)
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert not np.array_equal(run_model(fitted, x), run_model(plain, x))
