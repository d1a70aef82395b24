"""A small PyTorch interpreter of exported CNN graphs, differentiable in the input (for ``distill.py``)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .errors import InputError


class TorchGraph:
    """Evaluate a constant-folded ONNX CNN graph in PyTorch, differentiably in its input."""

    def __init__(self, graph: gs.Graph, torch):
        self.graph = graph
        self.torch = torch
        self.F = torch.nn.functional
        self.constants = {}
        for node in graph.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and t.name not in self.constants:
                    self.constants[t.name] = torch.tensor(np.asarray(t.values))

    def batchnorm_loss(self, x):
        """Run the graph on ``x``; the summed squared distance of every BN's batch statistics to its running ones."""
        torch = self.torch
        values = {self.graph.inputs[0].name: x}
        loss = x.new_zeros(())
        for node in self.graph.nodes:
            args = [values[t.name] if t.name in values else self.constants.get(t.name) for t in node.inputs]
            if node.op == "BatchNormalization":
                data, gamma, beta, mean, var = args
                epsilon = float(node.attrs.get("epsilon", 1e-5))
                axes = [0] + list(range(2, data.dim()))
                batch_mean = data.mean(dim=axes)
                batch_std = torch.sqrt(data.var(dim=axes, unbiased=False) + epsilon)
                loss = loss + torch.sum((batch_mean - mean) ** 2) + torch.sum((batch_std - torch.sqrt(var + epsilon)) ** 2)
            out = self.run_node(node, args)
            values[node.outputs[0].name] = out
        return loss

    def run_node(self, node: gs.Node, args: list):
        torch, F, op, attrs = self.torch, self.F, node.op, node.attrs
        elementwise = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Identity": lambda x: x, "Dropout": lambda x: x}
        if op in elementwise:
            return elementwise[op](args[0])
        arithmetic = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}
        if op in arithmetic:
            return arithmetic[op](*args)
        if op == "LeakyRelu":
            return F.leaky_relu(args[0], float(attrs.get("alpha", 0.01)))
        if op == "Clip":
            low = args[1] if len(args) > 1 and args[1] is not None else attrs.get("min")
            high = args[2] if len(args) > 2 and args[2] is not None else attrs.get("max")
            return torch.clamp(args[0], min=None if low is None else float(low), max=None if high is None else float(high))
        if op == "BatchNormalization":
            data, gamma, beta, mean, var = args
            return F.batch_norm(data, mean, var, gamma, beta, training=False, eps=float(attrs.get("epsilon", 1e-5)))
        if op == "Conv":
            return self._conv(node, args)
        if op in ("MaxPool", "AveragePool", "GlobalAveragePool"):
            return self._pool(node, args)
        if op in ("Gemm", "MatMul"):
            return self._matmul(node, args)
        if op in ("Flatten", "Reshape", "Concat", "Pad", "Slice"):
            return self._layout(node, args)
        raise InputError(f"--synthetic distill does not support the op {op} ({node.name}); use --synthetic pink")

    def _conv(self, node: gs.Node, args: list):
        F, attrs, w = self.F, node.attrs, args[1]
        bias = args[2] if len(args) > 2 else None
        pads = list(attrs.get("pads", [0] * (2 * (w.dim() - 2))))
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise InputError(f"--synthetic distill does not support auto_pad on {node.name}")
        half = len(pads) // 2
        x = args[0]
        if pads[:half] != pads[half:]:
            x = F.pad(x, _torch_pad_order(pads))
            padding = 0
        else:
            padding = pads[:half]
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
        return conv(x, w, bias, stride=attrs.get("strides", 1), padding=padding,
                    dilation=attrs.get("dilations", 1), groups=attrs.get("group", 1))

    def _pool(self, node: gs.Node, args: list):
        F, attrs = self.F, node.attrs
        if node.op == "GlobalAveragePool":
            return args[0].mean(dim=tuple(range(2, args[0].dim())), keepdim=True)
        kernel = attrs["kernel_shape"]
        pads = list(attrs.get("pads", [0] * (2 * len(kernel))))
        stride = attrs.get("strides", [1] * len(kernel))
        pool = F.max_pool2d if node.op == "MaxPool" else F.avg_pool2d
        half = len(pads) // 2
        if pads[:half] != pads[half:]:
            raise InputError(f"--synthetic distill does not support asymmetric pool pads on {node.name}")
        options = dict(ceil_mode=bool(attrs.get("ceil_mode", 0)))
        if node.op == "AveragePool":
            options["count_include_pad"] = bool(attrs.get("count_include_pad", 0))
        return pool(args[0], kernel, stride, pads[:half], **options)

    def _matmul(self, node: gs.Node, args: list):
        if node.op == "MatMul":
            return args[0] @ args[1]
        attrs = node.attrs
        a, b = args[0], args[1]
        if attrs.get("transA", 0):
            a = a.t()
        if attrs.get("transB", 0):
            b = b.t()
        out = float(attrs.get("alpha", 1.0)) * (a @ b)
        if len(args) > 2 and args[2] is not None:
            out = out + float(attrs.get("beta", 1.0)) * args[2]
        return out

    def _layout(self, node: gs.Node, args: list):
        torch, F, op, attrs = self.torch, self.F, node.op, node.attrs
        if op == "Flatten":
            axis = attrs.get("axis", 1)
            return args[0].reshape(int(np.prod(args[0].shape[:axis])), -1)
        if op == "Reshape":
            shape = [int(s) for s in args[1].tolist()]
            shape = [args[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return args[0].reshape(shape)
        if op == "Concat":
            return torch.cat(args, dim=attrs.get("axis", 1))
        if op == "Pad":
            pads = [int(p) for p in (attrs["pads"] if "pads" in attrs else args[1].tolist())]
            value = float(attrs.get("value", 0.0)) if "pads" in attrs else (
                float(args[2].reshape(-1)[0]) if len(args) > 2 and args[2] is not None and args[2].numel() else 0.0)
            mode = attrs.get("mode", "constant")
            if mode != "constant":
                return F.pad(args[0], _torch_pad_order(pads)[:2 * (args[0].dim() - 2)], mode=mode)
            return F.pad(args[0], _torch_pad_order(pads), value=value)
        return self._slice(node, args)

    def _slice(self, node: gs.Node, args: list):
        data = args[0]
        starts, ends = args[1].tolist(), args[2].tolist()
        axes = args[3].tolist() if len(args) > 3 and args[3] is not None else list(range(len(starts)))
        steps = args[4].tolist() if len(args) > 4 and args[4] is not None else [1] * len(starts)
        index = [slice(None)] * data.dim()
        for start, end, axis, step in zip(starts, ends, axes, steps):
            if step < 0:
                raise InputError(f"--synthetic distill does not support negative Slice steps on {node.name}")
            size = data.shape[axis]
            index[axis] = slice(max(min(start, size), -size), max(min(end, size), -size - 1), step)
        return data[tuple(index)]


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


def _torch_pad_order(pads: list[int]) -> list[int]:
    """ONNX pads (x1_begin, x2_begin, ..., x1_end, x2_end, ...) to torch's (last_begin, last_end, ...)."""
    half = len(pads) // 2
    order = []
    for axis in reversed(range(half)):
        order += [pads[axis], pads[axis + half]]
    return order
