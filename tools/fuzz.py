"""Fuzz the loader, the pair finder and the rest of the pipeline with hypothesis, for a bounded time.

    python tools/fuzz.py --minutes 10 [--findings DIR]

Three generators, each run in turn until the time is spent:

- ``graphs``: random CNN graphs built with shape tracking (Conv with every
  group count, kernel, stride, dilation and bias choice; BatchNormalization
  with zero, negative and huge statistics; Relu, LeakyRelu, PRelu, Clip,
  Sigmoid, pools, Pad, Add, Concat, Identity, Dropout, per-channel Mul;
  GlobalAveragePool/Flatten/Gemm, MatMul or Reshape heads; several outputs),
  with weights drawn from normal, zero, tiny, huge and subnormal values;
- ``mutations``: those graphs after one structural corruption (a node or
  initializer removed, nodes reversed, a dimension made 0 or symbolic, a
  weight listed as a graph input, names duplicated, an opset changed);
- ``bytes``: a valid model's serialised bytes with random bytes replaced,
  inserted or cut.

Each input goes through ``dfmpc_onnx.quantize_file`` with random options. The
tool owes every input one of two outcomes: a written model that onnxruntime
loads and runs, or an ``InputError`` (exit status 2) with the input file
unchanged and no output left behind. Anything else (another exception, a
failed onnxruntime check of our own output, a changed input, a stray file)
is a finding: the shrunk input and its traceback go to ``--findings``, and
the script exits 1. Not part of CI; the README records the last run.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from dfmpc_onnx import quantize_file
from dfmpc_onnx.errors import InputError

OPSETS = (7, 9, 11, 13, 17, 21)
SCHEMES = ("2/6", "3/6", "4/8", "6/6", "2/4", "8/8")


class Finding(Exception):
    """The tool broke one of its guarantees on a fuzzed input."""


# ---------------------------------------------------------------- graph maker

class Builder:
    """A graph under construction: nodes, initializers and the (N, C, H, W) shape of each tensor."""

    def __init__(self, draw, opset: int):
        self.draw = draw
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, shape: tuple[int, ...], kind: str | None = None) -> str:
        kind = kind or self.draw(st.sampled_from(("normal", "normal", "normal", "zero", "tiny", "huge",
                                                  "subnormal", "zero_rows")))
        seed = self.draw(st.integers(0, 2**16))
        values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        if kind == "zero":
            values[:] = 0
        elif kind == "tiny":
            values *= np.float32(1e-30)
        elif kind == "huge":
            values *= np.float32(1e30)
        elif kind == "subnormal":
            values *= np.float32(1e-42)
        elif kind == "zero_rows" and values.ndim > 1:
            values[:: 2] = 0
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(values, name))
        return name

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(f"{op}_"), **attrs))
        self.shapes[out] = shape
        return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv(b: Builder, x: str) -> str:
    n, c, *spatial = b.shapes[x]
    draw = b.draw
    group = draw(st.sampled_from(_divisors(c)))
    cout = group * draw(st.integers(1, max(1, 12 // group)))
    kernel = [draw(st.sampled_from((1, 1, 3, 5))) for _ in spatial]
    strides = [draw(st.sampled_from((1, 1, 2))) for _ in spatial]
    dilations = [draw(st.sampled_from((1, 1, 2))) for _ in spatial]
    pads = [draw(st.integers(0, 2)) for _ in spatial] * 2
    out_spatial = []
    for i, size in enumerate(spatial):
        reach = dilations[i] * (kernel[i] - 1) + 1
        padded = size + pads[i] + pads[i + len(spatial)]
        if padded < reach:
            return x
        out_spatial.append((padded - reach) // strides[i] + 1)
    inputs = [x, b.const((cout, c // group, *kernel))]
    if draw(st.booleans()):
        inputs.append(b.const((cout,), "normal"))
    return b.node("Conv", inputs, (n, cout, *out_spatial), group=group, kernel_shape=kernel, strides=strides,
                  dilations=dilations, pads=pads)


def _batchnorm(b: Builder, x: str) -> str:
    c = b.shapes[x][1]
    var_kind = b.draw(st.sampled_from(("positive", "positive", "zero", "negative", "huge")))
    variance = np.abs(np.random.default_rng(c).standard_normal(c)).astype(np.float32) + 0.1
    if var_kind == "zero":
        variance[: c // 2 + 1] = 0
    elif var_kind == "negative":
        variance[0] = -1
    elif var_kind == "huge":
        variance *= np.float32(1e30)
    var_name = b.name("var")
    b.inits.append(numpy_helper.from_array(variance, var_name))
    epsilon = b.draw(st.sampled_from((1e-5, 1e-5, 0.0)))
    inputs = [x, b.const((c,)), b.const((c,), "normal"), b.const((c,), "normal"), var_name]
    return b.node("BatchNormalization", inputs, b.shapes[x], epsilon=epsilon)


def _pool(b: Builder, x: str, op: str) -> str:
    n, c, *spatial = b.shapes[x]
    if min(spatial) < 2:
        return x
    return b.node(op, [x], (n, c, *(s // 2 for s in spatial)), kernel_shape=[2] * len(spatial),
                  strides=[2] * len(spatial))


def _pad(b: Builder, x: str) -> str:
    n, c, *spatial = b.shapes[x]
    value = b.draw(st.sampled_from((0.0, 0.0, 1.0)))
    pads = [0, 0] + [1] * len(spatial) + [0, 0] + [1] * len(spatial)
    shape = (n, c, *(s + 2 for s in spatial))
    if b.opset < 11:
        return b.node("Pad", [x], shape, pads=pads, value=value)
    pads_name, value_name = b.name("pads"), b.name("value")
    b.inits.append(numpy_helper.from_array(np.array(pads, np.int64), pads_name))
    b.inits.append(numpy_helper.from_array(np.array(value, np.float32), value_name))
    return b.node("Pad", [x, pads_name, value_name], shape)


def _merge(b: Builder, x: str, op: str) -> str:
    shape = b.shapes[x]
    partners = [t for t, s in b.shapes.items() if t != x and (
        s == shape if op == "Add" else (len(s) == len(shape) and s[0] == shape[0] and s[2:] == shape[2:]))]
    if not partners:
        return x
    other = b.draw(st.sampled_from(partners))
    if op == "Add":
        return b.node("Add", [x, other], shape)
    return b.node("Concat", [x, other], (shape[0], shape[1] + b.shapes[other][1], *shape[2:]), axis=1)


def _elementwise(b: Builder, x: str, op: str) -> str:
    shape = b.shapes[x]
    if op == "LeakyRelu":
        return b.node(op, [x], shape, alpha=0.1)
    if op == "PRelu":
        return b.node(op, [x, b.const((shape[1],) + (1,) * (len(shape) - 2), "normal")], shape)
    if op == "Clip":
        if b.opset < 11:
            return b.node(op, [x], shape, min=0.0, max=6.0)
        lo, hi = b.name("lo"), b.name("hi")
        b.inits += [numpy_helper.from_array(np.array(0, np.float32), lo),
                    numpy_helper.from_array(np.array(6, np.float32), hi)]
        return b.node(op, [x, lo, hi], shape)
    if op == "Mul":
        return b.node(op, [x, b.const((shape[1],) + (1,) * (len(shape) - 2), "normal")], shape)
    return b.node(op, [x], shape)


def _head(b: Builder, x: str) -> str:
    n, c, *spatial = b.shapes[x]
    kind = b.draw(st.sampled_from(("gemm", "matmul", "reshape", "none")))
    if kind == "none":
        return x
    pooled = b.node("GlobalAveragePool", [x], (n, c, *[1] * len(spatial)))
    if kind == "reshape" and b.opset >= 5:
        shape_name = b.name("shape")
        b.inits.append(numpy_helper.from_array(np.array([-1, c], np.int64), shape_name))
        flat = b.node("Reshape", [pooled, shape_name], (n, c))
    else:
        flat = b.node("Flatten", [pooled], (n, c))
    classes = b.draw(st.integers(1, 10))
    if kind == "matmul":
        return b.node("MatMul", [flat, b.const((c, classes))], (n, classes))
    return b.node("Gemm", [flat, b.const((classes, c)), b.const((classes,), "normal")], (n, classes), transB=1)


STEPS = ("conv", "conv", "conv", "bn", "Relu", "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "MaxPool",
         "AveragePool", "pad", "Add", "Concat", "Identity", "Dropout", "Mul")


@st.composite
def cnn_graphs(draw) -> onnx.ModelProto:
    """A random CNN that onnx's checker accepts, in 1, 2 or 3 spatial dimensions."""
    opset = draw(st.sampled_from(OPSETS))
    b = Builder(draw, opset)
    spatial = draw(st.sampled_from((1, 2, 2, 2, 3)))
    channels = draw(st.integers(1, 6))
    size = draw(st.integers(1, 9 if spatial < 3 else 5))
    shape = (draw(st.integers(1, 2)), channels, *[size] * spatial)
    b.shapes["x"] = shape
    x = "x"
    for step in draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=10)):
        if step == "conv":
            x = _conv(b, x)
        elif step == "bn":
            x = _batchnorm(b, x)
        elif step in ("MaxPool", "AveragePool"):
            x = _pool(b, x, step)
        elif step == "pad":
            x = _pad(b, x)
        elif step in ("Add", "Concat"):
            x = _merge(b, x, step)
        else:
            x = _elementwise(b, x, step)
    outputs = [_head(b, x)]
    if draw(st.booleans()) and len(b.nodes) > 1:
        outputs.append(b.nodes[draw(st.integers(0, len(b.nodes) - 2))].output[0])
    outputs = list(dict.fromkeys(outputs))
    dynamic = draw(st.booleans())
    input_dims = ["batch", channels, *(["size"] * spatial if dynamic else [size] * spatial)]
    graph = helper.make_graph(
        b.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_dims)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, b.shapes[o]) for o in outputs], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


@st.composite
def mutated_graphs(draw) -> onnx.ModelProto:
    """A random CNN after one structural corruption."""
    model = draw(cnn_graphs())
    graph = model.graph
    kind = draw(st.sampled_from(("drop_node", "drop_init", "reverse", "dim", "init_as_input", "duplicate_name",
                                 "opset", "dtype", "rename_output")))
    if kind == "drop_node" and len(graph.node) > 0:
        del graph.node[draw(st.integers(0, len(graph.node) - 1))]
    elif kind == "drop_init" and len(graph.initializer) > 0:
        del graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
    elif kind == "reverse":
        nodes = list(graph.node)[::-1]
        del graph.node[:]
        graph.node.extend(nodes)
    elif kind == "dim":
        dims = graph.input[0].type.tensor_type.shape.dim
        dim = dims[draw(st.integers(0, len(dims) - 1))]
        choice = draw(st.sampled_from((0, -1, "sym")))
        if choice == "sym":
            dim.dim_param = "d"
        else:
            dim.dim_value = choice
    elif kind == "init_as_input" and len(graph.initializer) > 0:
        init = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    elif kind == "duplicate_name" and len(graph.node) > 1:
        graph.node[1].output[0] = graph.node[0].output[0]
    elif kind == "opset":
        model.opset_import[0].version = draw(st.sampled_from((1, 6, 8, 10, 12, 16, 19, 22, 25, 99)))
    elif kind == "dtype" and len(graph.initializer) > 0:
        init = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        array = numpy_helper.to_array(init).astype(draw(st.sampled_from((np.float16, np.float64, np.int32))))
        init.CopyFrom(numpy_helper.from_array(array, init.name))
    elif kind == "rename_output":
        graph.output[0].name = "nowhere"
    return model


@st.composite
def mutated_bytes(draw) -> bytes:
    """A valid model's bytes with some bytes replaced, inserted or removed, or cut short."""
    data = bytearray(draw(cnn_graphs()).SerializeToString())
    rnd = draw(st.randoms(use_true_random=False))  # uniform positions: hypothesis's integers favour the ends
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = rnd.randrange(len(data))
        edit = draw(st.sampled_from(("replace", "replace", "insert", "delete", "truncate")))
        if edit == "replace":
            data[at] = rnd.randrange(256)
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del data[at:at + rnd.randint(1, 8)]
        else:
            del data[at:]
    return bytes(data)


options = st.fixed_dictionaries({
    "scheme": st.sampled_from(SCHEMES),
    "format": st.sampled_from(("qdq", "float")),
    "granularity": st.sampled_from(("tensor", "channel")),
    "refine": st.sampled_from(("none", "none", "bias", "stats", "refit")),
    "keep_first": st.booleans(),
    "keep_last": st.booleans(),
})


# ---------------------------------------------------------------- the oracle

def run_case(data: bytes, opts: dict, findings: Path) -> str:
    """Quantize ``data`` with ``opts`` and check the tool kept its guarantees; returns "ok" or "refused"."""
    with tempfile.TemporaryDirectory(prefix="dfmpc-fuzz-") as folder:
        source, destination = Path(folder, "in.onnx"), Path(folder, "out.onnx")
        source.write_bytes(data)
        try:
            try:
                quantize_file(source, destination, synthetic="pink", samples=4, **opts)
                outcome = "ok"
            except InputError:
                outcome = "refused"
            if source.read_bytes() != data:
                raise Finding("the input file was changed")
            leftovers = sorted(p.name for p in Path(folder).iterdir() if p.name != "in.onnx"
                               and not (outcome == "ok" and p.name == "out.onnx"))
            if leftovers:
                raise Finding(f"files left behind: {leftovers}")
            if outcome == "ok":
                session = ort.InferenceSession(str(destination), providers=["CPUExecutionProvider"])
                if not session.get_outputs():
                    raise Finding("written model has no outputs")
            return outcome
        except Exception as err:
            _record(data, opts, err, findings)
            raise


def _record(data: bytes, opts: dict, err: Exception, findings: Path) -> None:
    """Keep the failing input under a name that identifies the failure, so the shrunk example overwrites it."""
    where = traceback.extract_tb(err.__traceback__)[-1]
    key = hashlib.sha1(f"{type(err).__name__}:{where.filename}:{where.lineno}".encode()).hexdigest()[:10]
    findings.mkdir(parents=True, exist_ok=True)
    (findings / f"{key}.onnx").write_bytes(data)
    (findings / f"{key}.txt").write_text(f"options: {opts}\n\n" + "".join(traceback.format_exception(err)))


def fuzz(minutes: float, findings: Path, batch: int = 25) -> int:
    """Run the three generators in turn until ``minutes`` have passed; 0 when nothing broke."""
    generators = {
        "graphs": cnn_graphs().map(lambda m: m.SerializeToString()),
        "mutations": mutated_graphs().map(lambda m: m.SerializeToString()),
        "bytes": mutated_bytes(),
    }
    counts = {name: {"ok": 0, "refused": 0} for name in generators}
    deadline = time.monotonic() + minutes * 60
    failures = 0
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        for name, strategy in generators.items():
            @settings(max_examples=batch, deadline=None, database=None, derandomize=False,
                      suppress_health_check=list(HealthCheck))
            @given(data=strategy, opts=options)
            def target(data: bytes, opts: dict) -> None:
                counts[name][run_case(data, opts, findings)] += 1

            try:
                target()
            except Exception as err:
                failures += 1
                print(f"finding in {name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                      file=sys.stderr)
        done = ", ".join(f"{n} {c['ok']} written / {c['refused']} refused" for n, c in counts.items())
        print(f"[{(minutes * 60 - max(0.0, deadline - time.monotonic())) / 60:.1f} min] {done}",
              file=sys.stderr, flush=True)
    total = sum(c["ok"] + c["refused"] for c in counts.values())
    print(f"fuzzed {total} inputs in {rounds} rounds ({minutes:g} min): {failures} finding(s)"
          + (f", written to {findings}" if failures else ""))
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to fuzz (default 5)")
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"),
                        help="folder for failing inputs and their tracebacks (default fuzz-findings)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # overflow in the generators' huge weights
    return fuzz(args.minutes, args.findings)


if __name__ == "__main__":
    sys.exit(main())
