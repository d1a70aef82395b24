import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from conftest import chain_model, residual_model, run_model
from dfmpc_onnx import quantize
from dfmpc_onnx.domain import unit_domain
from dfmpc_onnx.fold import fold_batchnorm
from dfmpc_onnx.graph import import_graph
from dfmpc_onnx.load import load_whole_model
from dfmpc_onnx.maths.statistics import channel_affine
from dfmpc_onnx.maths.noise import noise_batch as synthetic_batch, photographic_spread, pink_noise
from dfmpc_onnx.options import Options
from dfmpc_onnx.synthetic import synthesize


def conv_output_stats(model, inputs):
    """Per-channel mean and variance of every Conv output, by name of the Conv node."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n.output[0]) for n in convs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    stats = {}
    for node, value in zip(convs, session.run(None, {"x": inputs})):
        v = value.astype(np.float64)
        stats[node.name] = (v.mean(axis=(0, 2, 3)), v.var(axis=(0, 2, 3)))
    return stats


def _pink_inputs(samples: int, seed: int) -> np.ndarray:
    """The pink-noise inputs the tool makes for the tiny models at unit scale (``synthetic.synthesize``)."""
    return synthesize(None, {}, [1, 3, 8, 8], "pink", Options(samples=samples, seed=seed), unit_domain(3, "test"))


@pytest.mark.parametrize("make", [chain_model, residual_model])
def test_matched_model_has_the_float_statistics_on_the_synthetic_inputs(make):
    model = make()
    samples, seed = 16, 7
    refined, report = quantize(model, "2/6", refine="stats", synthetic="pink", samples=samples, seed=seed,
                               check=False, keep_first=False, input_mean="0", input_std="1",
                               storage="portable")  # float32 scales, as matched
    plain, _ = quantize(model, "2/6", refine="none", check=False, keep_first=False)
    # the inputs the tool used (unit scale, as asked); the tiny models have batch dim 1, so it ran them one at a time
    inputs = _pink_inputs(samples, seed)
    want = _stats_over(_folded(model), inputs)
    got = _stats_over(refined, inputs)
    before = _stats_over(plain, inputs)
    bits = {layer.name: layer.bits for layer in report.layers}
    assert {bits[name] for name in got} == {2, 6}
    for name in got:
        np.testing.assert_allclose(got[name][0], want[name][0], atol=1e-3 * (1 + np.abs(want[name][0]).max()))
        if bits[name] == 2:  # on noise only ternary layers are rescaled to the float variance (Plan.matches_variance)
            np.testing.assert_allclose(got[name][1], want[name][1], rtol=1e-3, atol=1e-6)
    assert any(not np.allclose(before[n][1], want[n][1], rtol=1e-2) for n in want if bits[n] == 2)
    assert report.refine == "stats" and report.samples == samples


def test_matching_on_noise_keeps_the_variance_of_kbit_layers():
    """On noise a k-bit layer's mean is matched and its variance left as the quantized weights give it: the
    matched model's conv outputs are the unmatched model's shifted per channel (``Plan.matches_variance``)."""
    model = chain_model()
    options = dict(refine="stats", synthetic="pink", samples=16, seed=7, check=False, keep_first=False,
                   input_mean="0", input_std="1", storage="portable", protect="off")
    matched, _ = quantize(model, "6", **options)
    plain, _ = quantize(model, "6", **{**options, "refine": "none"})
    inputs = _pink_inputs(16, 7)
    want, got, before = (_stats_over(m, inputs) for m in (_folded(model), matched, plain))
    first = next(iter(got))  # the first conv sees the same inputs in both: its variance is the unmatched one
    np.testing.assert_allclose(got[first][1], before[first][1], rtol=1e-4, atol=1e-7)
    assert not np.allclose(before[first][0], want[first][0], atol=1e-4)
    for name in got:
        np.testing.assert_allclose(got[name][0], want[name][0], atol=1e-3 * (1 + np.abs(want[name][0]).max()))


def _folded(model):
    """The float model with BatchNorm folded, so that its Conv outputs are the matched tensors."""
    graph = import_graph(load_whole_model(model))
    fold_batchnorm(graph)
    return gs.export_onnx(graph)


def _stats_over(model, inputs):
    per_sample = [conv_output_stats(model, inputs[i:i + 1]) for i in range(len(inputs))]
    stats = {}
    for name in per_sample[0]:
        means = np.array([s[name][0] for s in per_sample])
        variances = np.array([s[name][1] for s in per_sample])
        mean = means.mean(axis=0)
        stats[name] = (mean, (variances + means**2).mean(axis=0) - mean**2)
    return stats


def test_channel_affine_guards_tiny_variance():
    a = channel_affine(np.zeros(3), np.array([1.0, 4.0, 1.0]), np.zeros(3), np.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(a, [1.0, 2.0, 1.0])


def test_pink_noise_spectrum_and_standardisation():
    x = pink_noise((8, 3, 64, 64), np.random.default_rng(0), beta=2.0)
    np.testing.assert_allclose(x.mean(axis=(2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(2, 3)), 1, atol=1e-4)
    power = np.abs(np.fft.fft2(x)) ** 2
    f = np.sqrt(np.fft.fftfreq(64)[:, None] ** 2 + np.fft.fftfreq(64)[None, :] ** 2)
    low = power[..., (f > 0.02) & (f < 0.05)].mean()
    high = power[..., (f > 0.2) & (f < 0.5)].mean()
    slope = np.log(high / low) / np.log(0.3 / 0.035)
    assert -2.6 < slope < -1.4


def test_photographic_spread_gives_each_image_its_contrast_and_mean_colour():
    z = pink_noise((400, 3, 8, 8), np.random.default_rng(0))
    x = photographic_spread(z, np.random.default_rng(1))
    np.testing.assert_array_equal(x, photographic_spread(z, np.random.default_rng(1)))
    contrast = x.std(axis=(2, 3)).mean(axis=1)
    assert np.percentile(contrast, 90) > 5 * np.percentile(contrast, 10)  # log-normal: hazy to harsh
    means = x.mean(axis=(2, 3))
    assert np.corrcoef(means[:, 0], means[:, 1])[0, 1] > 0.5  # a colour's channels move together
    np.testing.assert_allclose(np.mean(x**2, axis=(0, 2, 3)), 1.0, atol=0.35)  # the domain's std over the batch
    nhwc = photographic_spread(z.transpose(0, 2, 3, 1), np.random.default_rng(1), channel_axis=3)
    np.testing.assert_allclose(nhwc, x.transpose(0, 2, 3, 1), rtol=1e-6)


def test_pink_inputs_spread_and_other_kinds_stay_standardised():
    options, domain, shape = Options(samples=64), unit_domain(3, "test"), [1, 3, 16, 16]
    pink = synthesize(None, {}, shape, "pink", options, domain)
    white = synthesize(None, {}, shape, "noise", options, domain)
    assert np.ptp(np.log(pink.std(axis=(1, 2, 3)))) > 2.0
    assert np.ptp(np.log(white.std(axis=(1, 2, 3)))) < 0.5


def test_synthetic_batch_is_seeded():
    a = synthetic_batch([None, 3, 16, 16], "pink", 4, seed=1)
    assert a.shape == (4, 3, 16, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, synthetic_batch(["N", 3, 16, 16], "pink", 4, seed=1))
    assert not np.array_equal(a, synthetic_batch([1, 3, 16, 16], "pink", 4, seed=2))


def test_relu_mean_matches_monte_carlo():
    from dfmpc_onnx.maths.batchnorm import relu_mean
    rng = np.random.default_rng(0)
    mean, std = np.array([-1.0, 0.0, 0.7, 2.0, 0.5]), np.array([0.5, 1.0, 2.0, 0.1, 0.0])
    samples = np.maximum(rng.normal(mean, std, size=(400_000, 5)), 0).mean(axis=0)
    np.testing.assert_allclose(relu_mean(mean, std), samples, atol=6e-3)


def test_bias_correction_removes_the_expected_output_error():
    from dfmpc_onnx.graph import find_layers, to_rows
    from dfmpc_onnx.maths.quantizers import ternary_quantize
    from dfmpc_onnx.maths.statistics import expected_output_error
    graph = import_graph(load_whole_model(chain_model(n_convs=1)))
    layers, _ = find_layers(graph)
    layer = layers["conv0"]
    q = ternary_quantize(to_rows(layer.weight, 0))
    input_mean = np.linspace(0.1, 1.0, layer.weight.shape[1])
    w_hat = q.dequantize().reshape(layer.weight.shape)
    bias = (0 if layer.bias is None else layer.bias) - expected_output_error(w_hat - layer.weight, input_mean, 1)
    # a constant input equal to the mean, away from the padded border, gives the float output exactly
    kernel_sum = lambda w: w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2) @ input_mean
    float_out = kernel_sum(layer.weight) + (0 if layer.bias is None else layer.bias)
    np.testing.assert_allclose(kernel_sum(w_hat) + bias, float_out, rtol=1e-5, atol=1e-5)


def test_im2col_matches_convolution():
    from dfmpc_onnx.maths.statistics import im2col
    from conftest import GraphBuilder, run_model
    rng = np.random.default_rng(5)
    g = GraphBuilder(input_shape=(2, 3, 7, 7))
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    out = g.node("Conv", ["x", g.const("w", weight)], pads=[1, 0, 2, 1], strides=[2, 1])
    x = rng.normal(size=(2, 3, 7, 7)).astype(np.float32)
    expected = run_model(g.model(out), x)
    rows = im2col(x, (3, 3), (2, 1), [1, 0, 2, 1])
    got = (rows @ weight.reshape(4, -1).T).reshape(2, expected.shape[2], expected.shape[3], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def conv_outputs(model, inputs):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n.output[0]) for n in convs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    per_sample = [session.run(None, {"x": inputs[i:i + 1]}) for i in range(len(inputs))]
    return {n.name: np.concatenate([s[k] for s in per_sample]) for k, n in enumerate(convs)}


def test_refit_brings_consumers_closer_to_the_float_outputs():
    model = chain_model(n_convs=4, channels=8, seed=2)
    inputs = synthetic_batch([1, 3, 8, 8], "pink", 32, seed=0)
    options = dict(check=False, keep_first=False, synthetic_inputs=inputs)
    stats, report = quantize(model, "2/6", refine="stats", **options)
    refit, _ = quantize(model, "2/6", refine="refit", **options)
    reference = conv_outputs(_folded(model), inputs)
    consumers = [layer.name for layer in report.layers if layer.role == "high"]
    assert consumers
    for name in consumers:
        error = lambda m: np.mean((conv_outputs(m, inputs)[name] - reference[name]) ** 2)
        assert error(refit) < error(stats)


@pytest.mark.parametrize("refine, dropped", [("auto", True), ("stats", False)])
def test_a_matching_that_does_not_carry_over_to_other_noise_is_dropped(monkeypatch, refine, dropped):
    """On pink noise (no BatchNorm statistics), statistics matching that moves the output away from the float
    model's on white and low-contrast noise is dropped by default, with a note; asked for, it is kept."""
    import dataclasses

    import dfmpc_onnx.refine as stage

    def harmful(graph, qlayers, *args, **kwargs):  # every channel's scale times a random factor
        rng = np.random.default_rng(0)
        return {name: dataclasses.replace(ql, weight=ql.weight.with_scale(
                    ql.weight.scale * rng.uniform(0.0, 3.0, ql.weight.scale.shape))) for name, ql in qlayers.items()}

    monkeypatch.setattr(stage, "match_statistics", harmful)
    model = chain_model()
    plain, _ = quantize(model, "4/8", refine="none", synthetic="pink", samples=8, keep_first=False, check=False)
    matched, report = quantize(model, "4/8", refine=refine, synthetic="pink", samples=8, keep_first=False,
                               check=False)
    noted = any(note.startswith("statistics matching on pink noise dropped") for note in report.notes)
    assert noted is dropped and report.refine == "stats"
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)
    same = np.allclose(run_model(matched, x), run_model(plain, x), rtol=1e-5, atol=1e-6)
    assert same is dropped


def test_the_last_layer_is_not_matched_under_keep_last():
    """--keep-last keeps the output layer out of statistics matching (its output is the model's, which the
    synthetic inputs would pin); --no-keep-last matches it like every other conv."""
    from conftest import GraphBuilder
    from test_emit import dequantized_weights

    g = GraphBuilder()
    x = g.node("Relu", [g.conv("x", 3, 8, name="first")])
    x = g.node("Relu", [g.conv(x, 8, 8, name="middle")])
    model = g.model(g.conv(x, 8, 2, name="last"))  # a dense output: a map per channel
    options = dict(synthetic="pink", samples=8, check=False, keep_first=False, protect="off")
    # ternary: on noise the matching rescales their weights (a k-bit layer's only takes a mean shift, in its bias)
    plain = dequantized_weights(quantize(model, "2", refine="none", **options)[0])
    kept = dequantized_weights(quantize(model, "2", refine="stats", **options)[0])
    matched = dequantized_weights(quantize(model, "2", refine="stats", keep_last=False, **options)[0])
    np.testing.assert_array_equal(kept["last"], plain["last"])
    assert not np.allclose(matched["last"], plain["last"])
    assert not np.allclose(kept["middle"], plain["middle"])


def _feature_stats(model, inputs, tensor):
    """Mean and variance of ``tensor`` per feature (the last axis) over the batch and tokens."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = np.concatenate([session.run(None, {"x": x[None]})[0] for x in inputs]).astype(np.float64)
    values = values.reshape(-1, values.shape[-1])
    return values.mean(axis=0), values.var(axis=0)


def test_a_matmul_over_tokens_is_matched_per_feature():
    """A transformer's MatMul (with its bias Add) computes at every token: its features' statistics over the
    batch and the tokens are matched like a conv's channels over the positions."""
    from test_pairs import attention_model

    model = attention_model()
    fc1_add = next(n for n in model.graph.node if n.op_type == "Add" and any(
        i == m.output[0] for m in model.graph.node if m.name == "fc1" for i in n.input))
    inputs = np.random.default_rng(3).normal(size=(16, 4, 8)).astype(np.float32)
    options = dict(synthetic_inputs=inputs, check=False, protect="off", format="float")  # the weights as matched
    # ternary, so that the variance is matched too on these (noise) inputs (``Plan.matches_variance``)
    refined, report = quantize(model, "2", refine="stats", **options)
    plain, _ = quantize(model, "2", refine="none", **options)
    want, got, before = (_feature_stats(m, inputs, fc1_add.output[0]) for m in (model, refined, plain))
    np.testing.assert_allclose(got[0], want[0], atol=1e-4 * (1 + np.abs(want[0]).max()))
    np.testing.assert_allclose(got[1], want[1], rtol=1e-3)
    assert not np.allclose(before[1], want[1], rtol=1e-2)
    assert report.refine == "stats"


def test_matched_layers_are_the_convs_and_token_wise_matmuls_but_the_kept_last():
    """The layers whose means the refinement matches (and the ``--target-bits`` probes correct): no Gemm
    head, no MatMul with one row per sample, and not the last layer under ``--keep-last``."""
    from conftest import chain_model
    from test_pairs import attention_model
    from dfmpc_onnx.graph import find_layers
    from dfmpc_onnx.inputs import model_facts
    from dfmpc_onnx.options import resolve
    from dfmpc_onnx.refine import matched_layers

    for model, kinds in ((chain_model(), {"Conv"}), (attention_model(), {"MatMul"})):
        model = load_whole_model(model)
        graph = import_graph(model)
        fold_batchnorm(graph)
        layers, _ = find_layers(graph)
        names = list(layers)
        for keep_last in (True, False):
            plan = resolve(Options(keep_last=keep_last), model_facts(model, {}))
            matched = matched_layers(layers, plan)
            assert {layers[n].op for n in matched} == kinds
            assert (names[-1] in matched) == (not keep_last and layers[names[-1]].op in kinds)
            assert len(matched) >= len(names) - 2
            for refine in ("none", "bias"):
                assert matched_layers(layers, resolve(Options(refine=refine), model_facts(model, {}))) == []
    h = onnx.helper
    rng = np.random.default_rng(0)
    weights = [onnx.numpy_helper.from_array(rng.normal(size=s).astype(np.float32), f"w{i}")
               for i, s in enumerate([(8, 4), (4, 3)])]
    rows = h.make_model(h.make_graph(
        [h.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"), h.make_node("MatMul", ["h", "w1"], ["y"], name="mm1")],
        "rows", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])], weights))
    model = load_whole_model(rows)
    graph = import_graph(model)
    layers, _ = find_layers(graph)
    assert len(layers) == 2
    assert matched_layers(layers, resolve(Options(keep_last=False), model_facts(model, {}))) == []
