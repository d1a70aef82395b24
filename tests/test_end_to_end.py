"""The shared pretrained ResNet-20, quantized through the command line; skipped when ../shared is absent."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import SHARED, run_model


def quantize_cli(source, out, *args):
    result = subprocess.run([sys.executable, "-m", "dfmpc_onnx", str(source), str(out), "--synthetic", "pink", *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return onnx.load(out), result.stdout


def codes_per_layer(model):
    """Conv/Gemm name -> its integer codes, read back through the DequantizeLinear and Add nodes:
    ternary T from one INT2 part; DoReFa's odd q = 2 m + 1 from m in one part, or m = 4 hi + lo."""
    values = {t.name: t for t in model.graph.initializer}
    producers = {n.output[0]: n for n in model.graph.node if n.op_type in ("DequantizeLinear", "Add")}

    def parts(name):
        node = producers.get(name)
        if node is None:
            return []
        if node.op_type == "DequantizeLinear":
            return [numpy_helper.to_array(values[node.input[0]]).astype(np.int64)]
        return parts(node.input[0]) + parts(node.input[1])

    codes = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[1] in producers:
            found = parts(node.input[1])
            if producers[node.input[1]].op_type == "DequantizeLinear":
                codes[node.name] = found[0]
            else:
                m = found[0] if len(found) == 1 else 4 * found[0] + found[1]
                codes[node.name] = 2 * m + 1
    return codes


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_resnet20_2_6_structure(resnet20, tmp_path, granularity):
    model, stdout = quantize_cli(resnet20, tmp_path / "q.onnx", "--scheme", "2/6", "--granularity", granularity,
                                 "--protect", "off", "--report", tmp_path / "r.json")
    assert "pairs found: 9" in stdout
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    codes = codes_per_layer(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    ternary = [name for name, c in codes.items() if set(np.unique(c)) <= {-1, 0, 1}]
    assert len(ternary) == 9 and all("/conv1/" in name for name in ternary)
    high = [name for name in codes if name not in ternary]
    assert len(high) == 11  # 9 block conv2, the stem and the classifier
    for name in ternary:
        for row in codes[name].reshape(codes[name].shape[0], -1):
            assert len(np.unique(row)) <= 3
    for name in high:
        assert len(np.unique(codes[name])) <= 64
        assert np.all(np.abs(codes[name]) <= 63) and np.all(codes[name] % 2 == 1)
    assert onnx.TensorProto.INT2 in types.values()
    assert (tmp_path / "q.onnx").stat().st_size < 0.25 * resnet20.stat().st_size


def test_resnet20_6_6_stays_close_to_float(resnet20, tmp_path):
    model, stdout = quantize_cli(resnet20, tmp_path / "q.onnx", "--scheme", "6/6", "--format", "float")
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    reference = run_model(onnx.load(resnet20), x)
    quantized = run_model(model, x)
    cosine = np.sum(reference * quantized) / np.linalg.norm(reference) / np.linalg.norm(quantized)
    assert cosine > 0.99
    assert np.mean(reference.argmax(1) == quantized.argmax(1)) >= 0.75


def test_resnet20_on_real_images_when_present(resnet20, tmp_path):
    data = SHARED / "data" / "cifar10_test_exact846.npz"
    if not data.exists():
        pytest.skip(f"{data} is absent")
    arrays = np.load(data)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x = ((arrays["x"][:200].astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy()
    y = arrays["y"][:200]
    model, _ = quantize_cli(resnet20, tmp_path / "q.onnx", "--scheme", "6/6")
    accuracy = np.mean(run_model(model, x).argmax(1) == y)
    float_accuracy = np.mean(run_model(onnx.load(resnet20), x).argmax(1) == y)
    assert accuracy >= float_accuracy - 0.05


def test_resnet20_bias_correction_end_to_end(resnet20, tmp_path):
    plain, _ = quantize_cli(resnet20, tmp_path / "none.onnx", "--scheme", "4/8", "--refine", "none")
    corrected, stdout = quantize_cli(resnet20, tmp_path / "bias.onnx", "--scheme", "4/8", "--refine", "bias")
    assert "refinement bias)" in stdout
    biases = lambda m: {n.name: numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == n.input[2]))
                        for n in m.graph.node if n.op_type == "Conv"}
    before, after = biases(plain), biases(corrected)
    changed = [name for name in before if not np.allclose(before[name], after[name])]
    assert len(changed) >= 9  # every conv after a folded BatchNorm + Relu
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    reference = run_model(onnx.load(resnet20), x)
    assert np.corrcoef(run_model(corrected, x).ravel(), reference.ravel())[0, 1] > 0.95


def test_resnet20_mse_range_clips_the_k_bit_layers(resnet20, tmp_path):
    from test_emit import scale_step, weight_scales

    plain, _ = quantize_cli(resnet20, tmp_path / "max.onnx", "--scheme", "4/8", "--refine", "none")
    clipped, stdout = quantize_cli(resnet20, tmp_path / "mse.onnx", "--scheme", "4/8", "--refine", "none",
                                   "--kbit-range", "mse")
    assert "k-bit range mse" in stdout
    before, after = weight_scales(plain), weight_scales(clipped)
    assert before.keys() == after.keys() and len(before) == 20
    # each file's scales are within half a step of its codes (storage.LogScales) of what was chosen
    slack = {name: 1 + scale_step(plain, name) + scale_step(clipped, name) + 1e-6 for name in before}
    assert all(np.all(after[name] <= before[name] * slack[name]) for name in before)
    assert sum(np.any(after[name] < 0.99 * before[name]) for name in before) >= 10


def test_resnet20_lambda2_shrinks_c(resnet20, tmp_path):
    def medians(report_path):
        import json
        layers = json.loads(report_path.read_text())["layers"]
        return np.array([layer["c_median"] for layer in layers if layer["role"] == "low"])
    quantize_cli(resnet20, tmp_path / "a.onnx", "--refine", "none", "--report", tmp_path / "a.json")
    quantize_cli(resnet20, tmp_path / "b.onnx", "--refine", "none", "--lambda2", "0.05", "--report", tmp_path / "b.json")
    plain, shrunk = medians(tmp_path / "a.json"), medians(tmp_path / "b.json")
    assert len(plain) == 9 and np.all(shrunk < plain)


def test_resnet20_protect_raises_the_costliest_pairs_and_reports_them(resnet20, tmp_path):
    model, stdout = quantize_cli(resnet20, tmp_path / "q.onnx", "--scheme", "2/6", "--refine", "none",
                                 "--report", tmp_path / "r.json")
    protection = json.loads((tmp_path / "r.json").read_text())["protection"]
    assert len(protection) == 9
    raised = [unit for unit in protection if unit["raised"]]
    assert raised and all(unit["sqnr_db"] < 6 for unit in raised)
    assert all(unit["sqnr_db"] >= 6 for unit in protection if not unit["raised"])
    assert f"--protect 6: {len(raised)} of 9 pair consumers' LOW producers raised to 6 bits" in stdout
    codes = codes_per_layer(model)
    for unit in protection:
        ternary = set(np.unique(codes[unit["producers"][0]])) <= {-1, 0, 1}
        assert ternary != unit["raised"], unit


def test_min_agreement_refuses_the_paper_2_6_and_passes_the_default_4_8(resnet20, tmp_path):
    """The paper-faithful 2/6 of ResNet-20 agrees with the float model's top-1 on few synthetic inputs: a
    warning, and with --min-agreement 90 exit 3 and no output; the default 4/8 passes the same bar."""
    import json

    paper = ["--refine", "none", "--protect", "off", "--kbit-rounding", "nearest"]
    out = tmp_path / "paper.onnx"
    warned = subprocess.run([sys.executable, "-m", "dfmpc_onnx", str(resnet20), str(out), "--scheme", "2/6", *paper,
                             "--report", str(tmp_path / "paper.json")], capture_output=True, text=True)
    assert warned.returncode == 0 and "warning:" in warned.stdout + warned.stderr
    fidelity = json.loads((tmp_path / "paper.json").read_text())["fidelity"]
    assert fidelity["top1_agreement"] < 50
    out.unlink()
    refused = subprocess.run([sys.executable, "-m", "dfmpc_onnx", str(resnet20), str(out), "--scheme", "2/6", *paper,
                              "--min-agreement", "90"], capture_output=True, text=True)
    assert refused.returncode == 3 and "--min-agreement 90" in refused.stderr and not out.exists()
    passed = subprocess.run([sys.executable, "-m", "dfmpc_onnx", str(resnet20), str(out), "--scheme", "4/8",
                             "--samples", "16", "--min-agreement", "90", "--report", str(tmp_path / "default.json")],
                            capture_output=True, text=True)
    assert passed.returncode == 0, passed.stderr
    assert out.exists() and json.loads((tmp_path / "default.json").read_text())["fidelity"]["top1_agreement"] >= 90
