"""Every op's gradient graph against central finite differences, on small random graphs (no PyTorch)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfmpc_onnx.errors import InputError
from dfmpc_onnx.gradient_rules import RULES
from dfmpc_onnx.gradients import gradient_model, prepare_forward

RNG = np.random.default_rng(0)
X_SHAPE = [2, 4, 6, 6]


def const(name, shape=None, value=None, dtype=np.float32):
    value = RNG.normal(0, 0.5, shape) if value is None else value
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def ints(name, values):
    return const(name, value=values, dtype=np.int64)


def conv(**attrs):
    group = attrs.get("group", 1)
    return [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], [const("w", [6, 4 // group, 3, 3])]


def unary(op, **attrs):
    return [helper.make_node(op, ["x"], ["y"], **attrs)], []


def binary(op, shape, tensor_right=False):
    """x op c (c constant, broadcast from ``shape``), or x op f(x) with a tensor right operand."""
    if not tensor_right:
        value = RNG.uniform(0.5, 1.5, shape)
        return [helper.make_node(op, ["x", "c"], ["y"])], [const("c", value=value)]
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Add", ["s", "half"], ["c"]),
             helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3]), helper.make_node(op, ["x", "m"], ["y"])]
    return nodes, [const("half", value=0.5)]


CASES = {
    "conv": conv(pads=[1, 1, 1, 1]),
    "conv strided": conv(strides=[2, 2], pads=[1, 0, 1, 1]),
    "conv dilated": conv(dilations=[2, 2], pads=[2, 2, 2, 2]),
    "conv grouped": conv(group=2, pads=[1, 1, 1, 1]),
    "conv same": conv(auto_pad="SAME_UPPER", strides=[2, 2]),
    "conv depthwise": ([helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1])], [const("w", [4, 1, 3, 3])]),
    "batchnorm": ([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"])],
                  [const("g", [4]), const("b", [4]), const("m", [4]), const("v", value=RNG.uniform(0.5, 2, 4))]),
    "relu": unary("Relu"),
    "leaky relu": unary("LeakyRelu", alpha=0.1),
    "prelu": ([helper.make_node("PRelu", ["x", "slope"], ["y"])], [const("slope", [4, 1, 1])]),
    "clip": ([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], [const("lo", value=-0.3), const("hi", value=0.6)]),
    "sigmoid": unary("Sigmoid"),
    "hard sigmoid": unary("HardSigmoid", alpha=0.4, beta=0.3),
    "hard swish": ([helper.make_node("Mul", ["x", "three"], ["x3"]), helper.make_node("HardSwish", ["x3"], ["y"])],
                   [const("three", value=3.0)]),
    "add": binary("Add", [4, 1, 1]),
    "sub tensor": binary("Sub", None, tensor_right=True),
    "mul": binary("Mul", [1, 6]),
    "mul tensor (squeeze-excite)": binary("Mul", None, tensor_right=True),
    "div": binary("Div", [4, 1, 1]),
    "div tensor": binary("Div", None, tensor_right=True),
    "max pool overlapping": unary("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "average pool": unary("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "average pool with pads counted": unary("AveragePool", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                                           count_include_pad=1),
    "global average pool": unary("GlobalAveragePool"),
    "global max pool": unary("GlobalMaxPool"),
    "reduce mean": unary("ReduceMean", axes=[1, 3], keepdims=0),
    "pad": ([helper.make_node("Pad", ["x", "pads"], ["y"])], [ints("pads", [0, 1, 2, 0, 0, 2, 1, 1])]),
    "slice with steps": ([helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"])],
                         [ints("s", [1, 0]), ints("e", [6, 5]), ints("a", [2, 3]), ints("st", [2, 3])]),
    "concat": ([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Concat", ["x", "r", "x"], ["y"], axis=1)], []),
    "split": ([helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1), helper.make_node("Mul", ["a", "b"], ["y"])],
              [ints("sizes", [2, 2])]),
    "flatten and gemm": ([helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w", "b"], ["y"],
                                                                                   transB=1, alpha=0.7)],
                         [const("w", [5, 144]), const("b", [5])]),
    "gemm transA": ([helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Transpose", ["f"], ["t"], perm=[1, 0]),
                     helper.make_node("Gemm", ["t", "w"], ["y"], transA=1)], [const("w", [144, 3])]),
    "reshape transpose squeeze": ([helper.make_node("Reshape", ["x", "shape"], ["r"]),
                                   helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 1, 3]),
                                   helper.make_node("Unsqueeze", ["t", "axis"], ["u"]),
                                   helper.make_node("Squeeze", ["u", "axis"], ["y"])],
                                  [ints("shape", [2, 4, 3, 12]), ints("axis", [0])]),
    "sqrt": ([helper.make_node("Mul", ["x", "x"], ["s"]), helper.make_node("Add", ["s", "one"], ["p"]),
              helper.make_node("Sqrt", ["p"], ["y"])], [const("one", value=1.0)]),
    "pow": ([helper.make_node("Pow", ["x", "three"], ["y"])], [const("three", value=3.0)]),
    "exp tanh erf": ([helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Exp", ["t"], ["e"]),
                      helper.make_node("Erf", ["e"], ["y"])], []),
    "softmax": unary("Softmax", axis=1),
    "cast": unary("Cast", to=TensorProto.FLOAT),
    "matmul constant": ([helper.make_node("MatMul", ["x", "w"], ["y"])], [const("w", [6, 3])]),
    "matmul tensors (attention)": ([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]),
                                    helper.make_node("MatMul", ["x", "t"], ["y"])], []),
}


def forward_model(nodes, initializers, opset=17):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "case", [x], [y], initializers)
    return onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8))


def linear_loss(weights):
    """L = sum(R * y): its gradient at y is R."""
    def loss(b, graph):
        r = b.const(weights)
        return b.op("ReduceSum", [b.op("Mul", ["y", r])], keepdims=0), {"y": r}
    return loss


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize("case", CASES)
def test_gradient_matches_central_differences(case):
    forward = prepare_forward(forward_model(*CASES[case]))
    y_shape = [d.dim_value for d in next(v for v in forward.graph.output if v.name == "y").type.tensor_type.shape.dim]
    weights = RNG.normal(size=y_shape).astype(np.float32)
    model = gradient_model(forward, linear_loss(weights), [], RULES)
    x = RNG.normal(size=X_SHAPE).astype(np.float32)
    loss, gradient = run(model, x)
    plain = forward_model(*CASES[case])
    value = lambda z: float(np.sum(run(plain, z)[0].astype(np.float64) * weights))
    assert loss == pytest.approx(value(x), rel=1e-4, abs=1e-4)
    for _ in range(3):
        direction = RNG.normal(size=X_SHAPE).astype(np.float32)
        epsilon = 1e-3
        numeric = (value(x + epsilon * direction) - value(x - epsilon * direction)) / (2 * epsilon)
        analytic = float(np.sum(gradient.astype(np.float64) * direction))
        # float32 evaluations: the differences carry an error of about 1e-7 |L| / epsilon
        assert analytic == pytest.approx(numeric, rel=2e-2, abs=1e-3 * (1 + abs(float(loss))))


def test_an_old_opset_model_is_converted_first():
    nodes = [helper.make_node("Pad", ["x"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1]),
             helper.make_node("Conv", ["p", "w"], ["y"])]
    forward = prepare_forward(forward_model(nodes, [const("w", [3, 4, 3, 3])], opset=9))
    assert forward.opset_import[0].version == 17
    model = gradient_model(forward, linear_loss(np.ones([2, 3, 6, 6], np.float32)), [], RULES)
    assert run(model, RNG.normal(size=X_SHAPE).astype(np.float32))[1].shape == tuple(X_SHAPE)


def test_an_unsupported_op_is_named():
    forward = prepare_forward(forward_model(*unary("Sin")))
    with pytest.raises(InputError, match="does not support the op Sin"):
        gradient_model(forward, linear_loss(np.ones(X_SHAPE, np.float32)), [], RULES)
