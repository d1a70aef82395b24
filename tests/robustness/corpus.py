"""A generated corpus of bad and awkward inputs, each with the outcome the tool owes it.

Every case writes its files into an empty folder and returns the command-line
arguments to run there. ``status`` is the expected exit status and
``pattern`` a regular expression that the one stderr line (failures) or the
printed report (successes) must match. Cases marked "found by
tools/fuzz.py" are inputs on which the fuzzer once broke the tool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import GraphBuilder, chain_model, residual_model

Maker = Callable[[Path], list[str]]


@dataclass(frozen=True)
class Case:
    name: str
    make: Maker
    status: int
    pattern: str


def _save(model: onnx.ModelProto, folder: Path, name: str = "in.onnx") -> Path:
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def _run(model_or_path: onnx.ModelProto | Path, folder: Path, *options: str) -> list[str]:
    path = model_or_path if isinstance(model_or_path, Path) else _save(model_or_path, folder)
    return [str(path), str(folder / "out.onnx"), *options]


def _raw(content: bytes) -> Maker:
    def make(folder: Path) -> list[str]:
        (folder / "in.onnx").write_bytes(content)
        return _run(folder / "in.onnx", folder)
    return make


def _model(build: Callable[[], onnx.ModelProto], *options: str) -> Maker:
    return lambda folder: _run(build(), folder, *options)


def _with_initializer(values: Callable[[np.ndarray], np.ndarray], index: int = 1) -> Callable[[], onnx.ModelProto]:
    """chain_model with one weight initializer replaced by ``values(old)``."""
    def build() -> onnx.ModelProto:
        model = chain_model()
        tensor = next(t for t in model.graph.initializer if t.name == f"conv{index}.w")
        tensor.CopyFrom(numpy_helper.from_array(values(numpy_helper.to_array(tensor)).astype(np.float32), tensor.name))
        return model
    return build


def _with_bn(**params: Callable[[np.ndarray], np.ndarray]) -> Callable[[], onnx.ModelProto]:
    """chain_model with the BatchNormalization after conv1 changed (gamma/var/epsilon)."""
    def build() -> onnx.ModelProto:
        model = chain_model()
        bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"][2]
        for key, change in params.items():
            if key == "epsilon":
                next(a for a in bn.attribute if a.name == "epsilon").f = change(None)
                continue
            name = bn.input[{"gamma": 1, "var": 4}[key]]
            tensor = next(t for t in model.graph.initializer if t.name == name)
            tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor)).astype(np.float32), name))
        return model
    return build


def _opset(version: int) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        model = chain_model()
        model.opset_import[0].version = version
        return model
    return build


def _no_graph() -> onnx.ModelProto:
    model = onnx.ModelProto(ir_version=8)
    model.opset_import.add(domain="", version=17)
    return model


def _dangling() -> onnx.ModelProto:
    model = chain_model()
    model.graph.node[3].input[0] = "nowhere"
    return model


def _cycle() -> onnx.ModelProto:
    g = GraphBuilder()
    a = g.node("Relu", ["x"], name="a")
    g.nodes.append(helper.make_node("Add", [a, "c_out"], ["b_out"], name="b"))
    g.nodes.append(helper.make_node("Relu", ["b_out"], ["c_out"], name="c"))
    graph = helper.make_graph(g.nodes, "cycle", [g.input],
                              [helper.make_tensor_value_info("c_out", TensorProto.FLOAT, [1, 3, 8, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _weight_from_graph_input() -> onnx.ModelProto:
    model = chain_model()
    tensor = next(t for t in model.graph.initializer if t.name == "conv1.w")
    model.graph.input.append(helper.make_tensor_value_info("conv1.w", TensorProto.FLOAT, list(tensor.dims)))
    model.graph.initializer.remove(tensor)
    return model


def _initializers_as_inputs() -> onnx.ModelProto:
    """Old exporters list every initializer among the graph inputs as well."""
    model = chain_model()
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    model.ir_version = 3
    model.opset_import[0].version = 9
    return model


def _weight_from_constant_node() -> onnx.ModelProto:
    model = chain_model()
    tensor = next(t for t in model.graph.initializer if t.name == "conv1.w")
    model.graph.initializer.remove(tensor)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["conv1.w"], name="conv1.w.const", value=tensor))
    return model


def _shared_weight() -> onnx.ModelProto:
    model = chain_model()
    conv2 = next(n for n in model.graph.node if n.name == "conv2")
    conv2.input[1] = "conv1.w"
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "conv2.w"))
    return model


def _zero_input_channels(w: np.ndarray) -> np.ndarray:
    w = w.copy()
    w[:, :3] = 0
    return w


def _zero_filters(w: np.ndarray) -> np.ndarray:
    w = w.copy()
    w[:2] = 0
    return w


def _grouped(group: int) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        g = GraphBuilder()
        x = g.node("Relu", [g.bn(g.conv("x", 3, 8, name="stem"), 8)])
        for i in range(3):
            x = g.node("Relu", [g.bn(g.conv(x, 8, 8, group=group if i != 1 else 1, name=f"conv{i}"), 8)])
        x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
        return g.model(g.gemm(x, 8, 10, name="fc"))
    return build


def _conv_nd(dims: int) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        g = GraphBuilder(input_shape=(1, 3) + (6,) * dims)

        def conv(x: str, cin: int, cout: int, name: str) -> str:
            w = g.const(f"{name}.w", g.rng.normal(0, 0.3, (cout, cin) + (3,) * dims))
            return g.node("Conv", [x, w], name=name, pads=[1] * (2 * dims))
        x = g.node("Relu", [conv("x", 3, 8, "stem")])
        for i in range(3):
            x = g.node("Relu", [conv(x, 8, 8, f"conv{i}")])
        x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
        return g.model(g.gemm(x, 8, 10, name="fc"))
    return build


def _dynamic_spatial() -> onnx.ModelProto:
    model = chain_model()
    shape = model.graph.input[0].type.tensor_type.shape
    shape.dim[0].dim_param, shape.dim[2].dim_param, shape.dim[3].dim_param = "N", "H", "W"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def _names_not_utf8(folder: Path) -> list[str]:
    """The graph's and a node's names as invalid UTF-8, patched into the bytes (found by tools/fuzz.py)."""
    model = chain_model()
    model.graph.name, model.graph.node[0].name = "fuzz", "Node"
    data = model.SerializeToString().replace(b"fuzz", b"\x80uzz").replace(b"Node", b"\xffode")
    (folder / "in.onnx").write_bytes(data)
    return _run(folder / "in.onnx", folder)


def _conv_output_is_graph_output() -> onnx.ModelProto:
    """conv1's output feeds its BatchNormalization and is also a graph output (found by tools/fuzz.py)."""
    model = chain_model()
    conv = next(n for n in model.graph.node if n.name == "conv1")
    model.graph.output.append(helper.make_tensor_value_info(conv.output[0], TensorProto.FLOAT, [1, 8, 8, 8]))
    return model


def _several_inputs_outputs() -> onnx.ModelProto:
    g = GraphBuilder()
    g.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    second = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    x = g.node("Relu", [g.conv("x", 3, 8, name="stem")])
    y = g.node("Relu", [g.conv("y", 3, 8, name="stem_y")])
    h = g.node("Relu", [g.conv(g.node("Add", [x, y]), 8, 8, name="conv0")])
    h = g.node("Relu", [g.conv(h, 8, 8, name="conv1")])
    logits = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [h])]), 8, 10, name="fc")
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [1, 10]),
               helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, 8, 8, 8])]
    graph = helper.make_graph(g.nodes, "two", [g.input, second], outputs, g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _no_weighted_layers() -> onnx.ModelProto:
    g = GraphBuilder()
    return g.model(g.node("Relu", [g.node("MaxPool", ["x"], kernel_shape=[2, 2])]))


def _float16() -> onnx.ModelProto:
    g = GraphBuilder()
    x = g.node("Cast", ["x"], to=TensorProto.FLOAT16)
    w = numpy_helper.from_array(g.rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float16), "w16")
    g.initializers.append(w)
    x = g.node("Relu", [g.node("Conv", [x, "w16"], name="conv16", pads=[1] * 4)])
    return g.model(g.node("Cast", [x], to=TensorProto.FLOAT))


def _custom_op() -> onnx.ModelProto:
    model = chain_model()
    model.graph.node[2].op_type = "Frobnicate"
    model.graph.node[2].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def _external(location: str | Callable[[Path], str], write: bool = True, length_cut: int = 0) -> Maker:
    """chain_model with conv1.w stored as external data at ``location`` (relative to the model)."""
    def make(folder: Path) -> list[str]:
        model_dir = folder / "model"
        model_dir.mkdir()
        where = location(folder) if callable(location) else location
        model = chain_model()
        tensor = next(t for t in model.graph.initializer if t.name == "conv1.w")
        data = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", where), ("offset", "0"), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        if write:
            target = (model_dir / where) if not os.path.isabs(where) else Path(where)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data[:len(data) - length_cut])
        return _run(_save(model, model_dir), folder)
    return make


def _symlink_outside(folder: Path) -> str:
    outside = folder / "elsewhere"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"\0" * 4096)
    (folder / "model").mkdir(exist_ok=True)
    os.symlink(outside / "secret.bin", folder / "model" / "weights.bin")
    return "weights.bin"


def _external_output(folder: Path) -> list[str]:
    return _run(chain_model(channels=64), folder, "--external-data")


def _output_missing_folder(folder: Path) -> list[str]:
    return [str(_save(chain_model(), folder)), str(folder / "missing" / "out.onnx")]


def _output_is_input(folder: Path) -> list[str]:
    path = _save(chain_model(), folder)
    return [str(path), str(path)]


def _output_is_input_other_spelling(folder: Path) -> list[str]:
    path = _save(chain_model(), folder)
    (folder / "sub").mkdir()
    return [str(path), str(folder / "sub" / ".." / "in.onnx")]


def _output_is_input_symlink(folder: Path) -> list[str]:
    path = _save(chain_model(), folder)
    os.symlink(path, folder / "out.onnx")
    return [str(path), str(folder / "out.onnx")]


def _output_is_folder(folder: Path) -> list[str]:
    (folder / "out.onnx").mkdir()
    return [str(_save(chain_model(), folder)), str(folder / "out.onnx")]


def _output_unwritable(folder: Path) -> list[str]:
    return [str(_save(chain_model(), folder)), "/proc/dfmpc-corpus-out.onnx"]


def _input_is_folder(folder: Path) -> list[str]:
    (folder / "in.onnx").mkdir()
    return [str(folder / "in.onnx"), str(folder / "out.onnx")]


CASES = [
    # unreadable files
    Case("empty-file", _raw(b""), 2, "empty"),
    Case("random-bytes", _raw(np.random.default_rng(1).bytes(256)), 2, "not an ONNX model"),
    Case("truncated-protobuf", lambda f: _run(_truncate(f), f), 2, "not an ONNX model"),
    Case("tensor-not-model", _raw(numpy_helper.from_array(np.ones(4, np.float32), "t").SerializeToString()),
         2, "not an ONNX model|no graph"),
    Case("text-file", _raw(b"graph {\n  node { op_type: 'Relu' }\n}\n"), 2, "not an ONNX model"),
    Case("no-graph", _model(_no_graph), 2, "no graph"),
    Case("input-is-folder", _input_is_folder, 2, "is a folder"),
    Case("input-missing", lambda f: [str(f / "nope.onnx"), str(f / "out.onnx")], 2, "no such file"),
    # invalid graphs
    Case("opset-6", _model(_opset(6)), 2, "opset 6 is not supported"),
    Case("opset-too-new", _model(_opset(onnx.defs.onnx_opset_version() + 1)), 2, "is not supported"),
    Case("dangling-input", _model(_dangling), 2, "not a valid ONNX model"),
    Case("cycle", _model(_cycle), 2, "not a valid ONNX model"),
    Case("nan-weight", _model(_with_initializer(lambda w: np.where(w > 0.5, np.nan, w))), 2, "NaN or Inf"),
    Case("inf-weight", _model(_with_initializer(lambda w: np.where(w > 0.5, np.inf, w))), 2, "NaN or Inf"),
    Case("custom-op", _model(_custom_op), 2, "onnxruntime cannot run the input model"),
    # awkward but valid: quantize what can be quantized, say what was not
    Case("weight-from-graph-input", _model(_weight_from_graph_input), 0, r"conv1 .*float"),
    Case("initializers-as-inputs-opset9", _model(_initializers_as_inputs), 0, r"pairs found: 2"),
    Case("weight-from-constant-node", _model(_weight_from_constant_node), 0, r"pairs found: 2"),
    Case("weight-shared-by-two-convs", _model(_shared_weight, "--scheme", "8/8", "--refine", "none"), 0,
         r"cosine (0\.99\d\d|1\.0000)"),
    Case("all-zero-conv", _model(_with_initializer(np.zeros_like)), 0, r"pairs found: 2"),
    Case("zero-filters", _model(_with_initializer(_zero_filters)), 0, r"pairs found: 2"),
    Case("zero-input-channels", _model(_with_initializer(_zero_input_channels, index=2)), 0, r"pairs found: 2"),
    Case("bn-zero-variance", _model(_with_bn(var=np.zeros_like)), 0, r"pairs found: 2"),
    Case("bn-zero-variance-zero-epsilon", _model(_with_bn(var=np.zeros_like, epsilon=lambda _: 0.0)),
         2, "zero variance and zero epsilon"),
    Case("bn-negative-variance", _model(_with_bn(var=lambda v: -v)), 2, "negative variance"),
    Case("bn-negative-gamma", _model(_with_bn(gamma=lambda g: -g)), 0, r"pairs found: 2"),
    *[Case(f"grouped-{group}", _model(_grouped(group)), 0, r"pairs found") for group in (2, 4, 8)],
    Case("conv-1d", _model(_conv_nd(1)), 0, r"pairs found: 1"),
    Case("conv-3d", _model(_conv_nd(3)), 0, r"pairs found: 1"),
    Case("dynamic-spatial-dims", _model(_dynamic_spatial), 0, r"input shape \?,3,\?,\? is dynamic: used 1,3,224,224"),
    Case("dynamic-spatial-dims-input-shape", _model(_dynamic_spatial, "--input-shape", "2,3,16,16"), 0,
         r"refinement stats\)\n(.|\n)*synthetic inputs: 8 pink-noise"),
    Case("input-shape-after-the-batch", _model(_dynamic_spatial, "--input-shape", "3,16,16"), 0,
         r"refinement stats\)\n(.|\n)*synthetic inputs: 8 pink-noise"),
    Case("input-shape-wrong-rank", _model(_dynamic_spatial, "--input-shape", "16,16"), 2, "does not fit"),
    Case("input-shape-clashes-static-dim", _model(chain_model, "--input-shape", "1,3,9,9"), 2, "does not fit"),
    Case("input-shape-unknown-input", _model(chain_model, "--input-shape", "y:1,3,8,8"), 2, "no input 'y'"),
    Case("input-shape-not-numbers", _model(chain_model, "--input-shape", "1,3,a,8"), 2, "integer dims"),
    Case("several-inputs-and-outputs", _model(_several_inputs_outputs), 0, r"refinement skipped"),
    Case("names-not-utf8", _names_not_utf8, 2, "not valid UTF-8"),
    Case("conv-output-is-graph-output", _model(_conv_output_is_graph_output), 0, r"other consumers"),
    Case("no-weighted-layers", _model(_no_weighted_layers), 2, r"no Conv, Gemm or MatMul"),
    Case("float16-conv", _model(_float16), 0, r"conv16 .*float"),
    Case("residual-scheme-3-6", _model(residual_model, "--scheme", "3/6"), 0, r"pairs found: 1"),
    # external data
    Case("external-data-ok", _external("weights.bin"), 0, r"pairs found: 2"),
    Case("external-data-parent", _external("../x.bin"), 2, "outside the model's folder"),
    Case("external-data-deep-parent", _external("../../x.bin", write=False), 2, "outside the model's folder"),
    Case("external-data-absolute", _external(lambda f: str(f / "abs.bin")), 2, "outside the model's folder"),
    Case("external-data-symlink-out", _external(_symlink_outside, write=False), 2, "outside the model's folder"),
    Case("external-data-missing", _external("weights.bin", write=False), 2, "is missing"),
    Case("external-data-short", _external("weights.bin", length_cut=16), 2, "shorter than"),
    Case("external-data-output", _external_output, 0, r"external data"),
    # outputs
    Case("output-missing-folder", _output_missing_folder, 2, "does not exist"),
    Case("output-is-input", _output_is_input, 2, "is the input file"),
    Case("output-is-input-other-spelling", _output_is_input_other_spelling, 2, "is the input file"),
    Case("output-is-symlink-to-input", _output_is_input_symlink, 2, "is the input file"),
    Case("output-is-folder", _output_is_folder, 2, "is a folder"),
    Case("output-unwritable", _output_unwritable, 2, "not writable"),
    # usage
    Case("bad-scheme", _model(chain_model, "--scheme", "9/1"), 2, "--scheme"),
    Case("bad-samples", _model(chain_model, "--samples", "0"), 2, "--samples"),
    Case("exclude-unknown-node", _model(chain_model, "--exclude", "nope"), 2, "--exclude"),
]


def _truncate(folder: Path) -> Path:
    path = folder / "in.onnx"
    path.write_bytes(chain_model().SerializeToString()[:300])
    return path
