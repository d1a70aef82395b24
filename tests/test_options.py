"""Options: one definition, one validation, one resolution of ``auto``; the command line generated from it;
and the report's notes saying what really happened."""

import dataclasses
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import GraphBuilder, chain_model
from dfmpc_onnx import quantize, quantize_file
from dfmpc_onnx.cli import build_parser, parse_options
from dfmpc_onnx.errors import InputError
from dfmpc_onnx.options import ModelFacts, Options, OutputOptions, flags, resolve


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dfmpc_onnx", *map(str, args)], capture_output=True, text=True)


def refused(result, pattern):
    lines = result.stderr.strip().splitlines()
    return result.returncode == 2 and len(lines) == 1 and pattern in lines[0] and "Traceback" not in result.stderr


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(chain_model(), path)
    return path


def test_every_option_has_one_flag_and_no_flag_means_the_default():
    parser = build_parser()
    help_text = parser.format_help()
    for kind in (Options, OutputOptions):
        for item in dataclasses.fields(kind):
            assert flags(item)[-1] in help_text, item.name
    args = vars(parser.parse_args(["in.onnx", "out.onnx"]))
    assert sorted(args) == ["input", "output"]
    options, output = parse_options({})
    assert options == Options() and output == OutputOptions()


@pytest.mark.parametrize("args,pattern", [
    (["--scheme", "4/6/8"], "--scheme: scheme '4/6/8' is not LOW/HIGH"),
    (["--scheme", "2/6", "--target-bits", "4"], "--scheme and --target-bits exclude each other"),
    (["--seed", "-1"], "--seed must be between 0"),
    (["--placement", "consumer", "--format", "float", "--refine", "stats"], "--placement consumer needs"),
    (["--input-shape", "1,3,x,8"], "--input-shape: '1,3,x,8' is not"),
])
def test_bad_option_values_are_refused_in_one_line(model_path, tmp_path, args, pattern):
    out = tmp_path / "out.onnx"
    result = run_cli(model_path, out, *args)
    assert refused(result, pattern), result.stderr
    assert not out.exists()


def test_consumer_placement_needs_no_refine_flag(model_path, tmp_path):
    _, report = quantize(chain_model(), format="float", placement="consumer", check=False, protect="off")
    assert report.refine == "none" and report.synthetic is None


def test_a_failed_distillation_resolves_every_auto_again():
    plan = resolve(Options(), ModelFacts(has_batchnorm=True, obstacle=None))
    assert (plan.synthetic, plan.refine, plan.ternary_threshold) == ("distill", "refit", "optimal")
    fallback = plan.without_distillation("an op it does not support")
    assert (fallback.synthetic, fallback.refine, fallback.ternary_threshold) == ("pink", "stats", "twn")
    assert "distillation not possible (an op it does not support)" in fallback.decisions[-1]
    kept = resolve(Options(ternary_threshold="optimal"), plan.facts).without_distillation("x")
    assert kept.ternary_threshold == "optimal"


def test_a_model_that_cannot_take_synthetic_inputs_resolves_refit_away():
    plan = resolve(Options(refine="refit"), ModelFacts(True, obstacle="two inputs"))
    assert (plan.synthetic, plan.refine, plan.ternary_threshold) == (None, "none", "twn")
    assert plan.decisions == ("refinement skipped: two inputs", "pairs not protected: two inputs")
    with pytest.raises(InputError, match="--target-bits needs synthetic inputs: two inputs"):
        resolve(Options(target_bits=4), ModelFacts(True, obstacle="two inputs"))


def left_matmul_model() -> onnx.ModelProto:
    """y = W x: the constant is MatMul's left operand, so there is no weight to quantize per output channel."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32), "w")
    node = helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")
    graph = helper.make_graph([node], "left", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_nothing_quantized_says_so_and_keeps_the_opset():
    model, report = quantize(left_matmul_model(), check=False, refine="none")
    assert report.count("float") == 1 and report.count("low") + report.count("high") == 0
    assert "no layer was quantized" in " ".join(report.notes)
    assert not any("HIGH bit width" in note for note in report.notes)
    assert report.opset_out == 17 and not any("opset upgraded" in note for note in report.notes)


def test_a_model_already_in_qdq_is_not_upgraded():
    g = GraphBuilder()
    codes = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "codes")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    g.initializers += [codes, scale]
    g.nodes.append(helper.make_node("DequantizeLinear", ["codes", "scale"], ["w"], name="dq"))
    model = g.model(g.node("Conv", ["x", "w"], name="conv", pads=[1, 1, 1, 1]), opset=13)
    result, report = quantize(model, check=True, synthetic="pink")
    assert report.opset_out == 13 and "weight 'w' is not a constant" in report.layers[0].note


def test_float16_input_is_named_in_the_refinement_note():
    g = GraphBuilder()
    g.input = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])
    cast = g.node("Cast", ["x"], to=TensorProto.FLOAT)
    model = g.model(g.conv(cast, 3, 4))
    _, report = quantize(model, check=False, synthetic="pink")
    assert "refinement skipped: it needs a float32 input, input 'x' is FLOAT16" in report.notes


def test_report_problems_are_refused_before_any_work(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    assert refused(run_cli(model_path, out, "--report", tmp_path / "missing" / "r.json"), "report folder")
    assert refused(run_cli(model_path, out, "--report", out), "report path is the output file")
    assert refused(run_cli(model_path, out, "--report", model_path), "report path is the input file")
    assert not out.exists()


def test_a_report_that_cannot_be_written_leaves_no_output(model_path, tmp_path, monkeypatch):
    import dfmpc_onnx.api as api

    def fail(path, text):
        raise InputError(f"{path}: cannot write: No space left on device")
    monkeypatch.setattr(api, "write_text_atomic", fail)
    out = tmp_path / "out.onnx"
    with pytest.raises(InputError, match="No space left"):
        quantize_file(model_path, out, report=tmp_path / "r.json", synthetic="pink")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_readme_options_table_is_the_generated_one():
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("options_table", root / "tools" / "options_table.py")
    sys.path.insert(0, str(root / "tools"))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root / "tools"))
    assert module.table() in (root / "README.md").read_text(), "run python tools/options_table.py --readme"


@pytest.mark.parametrize("facts,expected", [
    (ModelFacts(False, None, classifier=True, macs=1.3e8), ("distill", "stats")),
    (ModelFacts(False, None, classifier=True, macs=4e8), ("pink", "stats")),
    (ModelFacts(False, None, classifier=True, macs=None), ("pink", "stats")),
    (ModelFacts(False, None, classifier=False, macs=1e6), ("pink", "stats")),
    (ModelFacts(True, None, classifier=False, macs=4e9), ("distill", "refit")),
])
def test_auto_distils_small_classifiers_without_batchnorm(facts, expected):
    plan = resolve(Options(), facts)
    assert (plan.synthetic, plan.refine) == expected
    if facts.classifier and not facts.has_batchnorm and expected[0] == "pink":
        assert "--synthetic distill runs it" in plan.decisions[0]


def test_model_facts_count_multiply_accumulates():
    from dfmpc_onnx.inputs import model_facts
    from dfmpc_onnx.load import load_whole_model
    facts = model_facts(load_whole_model(chain_model()), {})  # stem 3->8 and four 8->8 3x3 convs on 8x8, fc 8->10
    assert facts.classifier and facts.macs == 64 * (8 * 27 + 4 * 8 * 72) + 80


@pytest.mark.parametrize("text,value", [("off", None), ("OFF", None), ("6", 6.0), ("-3.5", -3.5)])
def test_protect_reads_decibels_or_off(text, value):
    assert Options(protect=text).protect == value


@pytest.mark.parametrize("text", ["abc", "nan", "inf", ""])
def test_protect_refuses_what_is_not_a_finite_number_of_decibels(text):
    with pytest.raises(InputError, match="--protect"):
        Options(protect=text)


def test_input_shapes_from_python_take_the_command_line_text_too():
    assert Options(input_shapes="1,3,8,8").input_shapes == ((None, (1, 3, 8, 8)),)
    assert Options(input_shapes=["x:1,3,8,8"]).input_shapes == (("x", (1, 3, 8, 8)),)
    assert Options(input_shapes={"x": [1, 3, 8, 8]}).input_shapes == (("x", (1, 3, 8, 8)),)
    for bad in ([(None, "abc")], 5, "1,a"):
        with pytest.raises(InputError, match="input"):
            Options(input_shapes=bad)


@pytest.mark.parametrize("synthetic, bits, expected", [("distill", 4, True), ("distill", 2, True), ("pink", 4, False),
                                                       ("leaves", 6, False), ("noise", 8, False), ("pink", 2, True)])
def test_matching_rescales_variance_on_distilled_inputs_and_ternary_layers(synthetic, bits, expected):
    """On noise, statistics matching shifts a k-bit layer's means only; ternary layers and distilled inputs
    get the variance too (``Plan.matches_variance``)."""
    plan = resolve(Options(synthetic=synthetic), ModelFacts(has_batchnorm=True, obstacle=None))
    assert plan.refine == ("refit" if synthetic == "distill" else "stats")
    assert plan.matches_variance(bits) is expected
