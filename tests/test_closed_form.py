"""The written model computes the paper's closed form: producer and consumer weights read back from the
output file (through onnxruntime) against the spec's formulas computed here, independently, in numpy."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import RESNET20
from dfmpc_onnx import quantize


def folded_convs(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Conv name -> (W, b) with the BatchNormalization after it folded in, in float64 (spec section 1)."""
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    after = {n.input[0]: n for n in model.graph.node if n.op_type == "BatchNormalization"}
    folded = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w = values[node.input[1]]
        b = values[node.input[2]] if len(node.input) > 2 else np.zeros(w.shape[0])
        bn = after.get(node.output[0])
        if bn is not None:
            gamma, beta, mean, var = (values[name] for name in bn.input[1:5])
            epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            scale = gamma / np.sqrt(var + epsilon)
            w, b = w * scale[:, None, None, None], beta + (b - mean) * scale
        folded[node.name] = (w, b)
    return folded


def written_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Conv name -> (weight, bias) as the written model computes them, read out of onnxruntime."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    computed = [n.input[1] for n in convs if n.input[1] not in initializers]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in computed)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
            for i in session.get_inputs()}
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    return {n.name: (values.get(n.input[1], initializers.get(n.input[1])), initializers[n.input[2]]) for n in convs}


def twn(w: np.ndarray) -> tuple[np.ndarray, float]:
    """Eqs. 3-4 per tensor: T and alpha."""
    delta = 0.7 * np.abs(w).mean()
    t = np.sign(w) * (np.abs(w) > delta)
    return t, np.abs(w)[np.abs(w) > delta].mean()


def dorefa(w: np.ndarray, k: int) -> np.ndarray:
    """Eq. 6 per tensor."""
    m = np.abs(w).max()
    levels = 2**k - 1
    return m * (2 / levels * np.round(levels * (w / (2 * m) + 0.5)) - 1)


@pytest.mark.parametrize("lambda1,lambda2", [(0.5, 0.0), (0.0, 0.0), (0.5, 0.1)])
def test_written_weights_are_the_closed_form(lambda1, lambda2):
    source = onnx.load(RESNET20)
    model, report = quantize(source, scheme="2/6", refine="none", granularity="tensor", protect="off",
                             kbit_rounding="nearest", lambda1=lambda1, lambda2=lambda2, check=False,
                             storage="portable")  # float32 scales: the closed form to float32 precision
    float_convs, written = folded_convs(source), written_weights(model)
    roles = {layer.name: layer.role for layer in report.layers}
    assert sorted(set(roles.values())) == ["high", "low", "unpaired"]
    for name, (weight, bias) in written.items():
        w, b = float_convs[name]
        if roles[name] == "low":
            t, alpha = twn(w)
            what = alpha * t.reshape(len(t), -1)
            numerator = np.sum(what * w.reshape(len(w), -1), axis=1) + lambda1 * b**2
            denominator = np.sum(what**2, axis=1) + lambda1 * b**2 + lambda2
            # What_j = 0 with lambda1 = lambda2 = 0: L_j is flat; c_j = 1 keeps the float bias (0 if none)
            c = np.where(denominator > 0, np.maximum(0, numerator / np.where(denominator > 0, denominator, 1)),
                         np.where(b == 0, 0.0, 1.0))
            np.testing.assert_allclose(weight, c[:, None, None, None] * alpha * t, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(bias, c * b, rtol=1e-5, atol=1e-7)
            assert np.ptp(c) > 0.05  # a real compensation, not c = 1
        else:
            np.testing.assert_allclose(weight, dorefa(w, 6), rtol=1e-5, atol=1e-6 * np.abs(w).max())
            np.testing.assert_allclose(bias, b, rtol=1e-6, atol=1e-7)


def test_default_rounding_keeps_each_kernel_sum():
    """``--kbit-rounding kernel-sum`` (the default): every written 3x3 kernel sums to its float sum within
    half a level; rounding each weight to the nearest level does not."""
    source = onnx.load(RESNET20)
    float_convs = folded_convs(source)
    worst = {}
    for rounding in ("kernel-sum", "nearest"):
        model, _ = quantize(source, scheme="6", refine="none", compensate=False, kbit_rounding=rounding, check=False,
                            storage="portable")
        errors = []
        for name, (weight, _) in written_weights(model).items():
            w = float_convs[name][0]
            if w.shape[2] * w.shape[3] > 1:
                step = 2 * np.abs(w).reshape(len(w), -1).max(axis=1) / 63  # Eq. 6's level spacing at 6 bits
                errors.append(np.max(np.abs((weight - w).sum(axis=(2, 3))) / step[:, None]))
        worst[rounding] = max(errors)
    assert worst["kernel-sum"] <= 0.5 + 1e-3
    assert worst["nearest"] > 1.0
