"""Stage 8: what was done to each layer, as a table for people and JSON for tools."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .check import CheckResult
from .pairs import Pair, Refusal

_SUB_BYTE_BITS = {onnx.TensorProto.INT2: 2, onnx.TensorProto.UINT2: 2,
                  onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}


@dataclass(frozen=True)
class LayerReport:
    name: str
    op: str
    role: str
    """low (pair producer), high (pair consumer), kept (in no pair, HIGH bits) or float."""
    bits: int | None
    partner: str | None
    sqnr_db: float | None
    """Of the weight the model now computes with (with c for producers) against the float weight."""
    c_min: float | None = None
    c_median: float | None = None
    c_max: float | None = None
    note: str | None = None


@dataclass
class Report:
    input: str
    scheme: str
    format: str
    granularity: str
    ternary_threshold: str
    lambda1: float
    lambda2: float
    compensation: bool
    placement: str
    refine: str
    synthetic: str | None
    samples: int | None
    seed: int
    opset_in: int
    opset_out: int
    layers: list[LayerReport]
    pairs: list[Pair]
    refusals: list[Refusal]
    folded_batchnorm: list[str]
    kept_batchnorm: list[tuple[str, str]]
    weight_bytes_before: int
    weight_bytes_after: int
    relu6: str = "refuse"
    kbit_range: str = "max"
    stored_bits: float | None = None
    """Bits per weight in the output file (``stored_bits_per_weight``), scales and offsets included."""
    replaced_clips: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    check: CheckResult | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def count(self, role: str) -> int:
        return sum(layer.role == role for layer in self.layers)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["summary"] = {
            "pairs": len(self.pairs),
            "low_layers": self.count("low"),
            "high_layers": self.count("high"),
            "kept_layers": self.count("kept"),
            "float_layers": self.count("float"),
            "weight_bytes_ratio": self.weight_bytes_after / self.weight_bytes_before if self.weight_bytes_before else None,
        }
        return _json_safe(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def format_table(self) -> str:
        """The per-layer table: layer, role, bits, partner, weight SQNR, c min/median/max."""
        header = ("layer", "op", "role", "bits", "partner", "SQNR dB", "c min", "c med", "c max")
        rows = [header]
        for layer in self.layers:
            rows.append((layer.name, layer.op, layer.role, _fmt(layer.bits), layer.partner or "-",
                         _fmt(layer.sqnr_db, 1), _fmt(layer.c_min, 3), _fmt(layer.c_median, 3), _fmt(layer.c_max, 3)))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
        lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def format_summary(self) -> str:
        lines = [
            f"scheme {self.scheme} ({self.format}, {self.granularity} scales, {self.ternary_threshold} ternary threshold, "
            f"k-bit range {self.kbit_range}, "
            f"compensation {'lambda1=%g lambda2=%g' % (self.lambda1, self.lambda2) if self.compensation else 'off'}, "
            f"refinement {self.refine}"
            + (f" on {self.samples} {self.synthetic} inputs, seed {self.seed})" if self.samples else ")"),
            f"pairs found: {len(self.pairs)}; layers quantized: {self.count('low')} low, "
            f"{self.count('high')} high, {self.count('kept')} kept at high bits; {self.count('float')} left float",
            f"ReLU6 (Clip) handling: {self.relu6}"
            + (f" ({len(self.replaced_clips)} replaced by Relu)" if self.replaced_clips else ""),
            f"BatchNormalization folded: {len(self.folded_batchnorm)}"
            + (f", kept: {len(self.kept_batchnorm)}" if self.kept_batchnorm else ""),
            f"weight bytes: {self.weight_bytes_before:,} -> {self.weight_bytes_after:,}"
            + (f" ({self.weight_bytes_after / self.weight_bytes_before:.1%})" if self.weight_bytes_before else "")
            + (f"; {self.stored_bits:.2f} stored bits per weight" if self.stored_bits is not None else ""),
        ]
        for layer in self.layers:
            if layer.role == "float":
                lines.append(f"left float: {layer.name}: {layer.note}")
        for refusal in self.refusals:
            lines.append(f"not paired: {refusal.producer}: {refusal.reason}")
        for name, reason in self.kept_batchnorm:
            lines.append(f"BatchNormalization not folded: {name}: {reason}")
        lines.extend(f"note: {note}" for note in self.notes)
        if self.check is None:
            lines.append("onnxruntime check: skipped")
        else:
            for out in self.check.outputs:
                lines.append(f"onnxruntime check ({self.check.providers[0]}, batch {self.check.batch}): output "
                             f"'{out.name}' cosine {out.cosine:.4f}, SQNR {out.sqnr_db:.1f} dB")
        return "\n".join(lines)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes the initializers take when packed (INT2 four to a byte, INT4 two)."""
    return sum(_tensor_bytes(tensor) for tensor in model.graph.initializer)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    if tensor.data_type in _SUB_BYTE_BITS:
        return math.ceil(count * _SUB_BYTE_BITS[tensor.data_type] / 8)
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def stored_bits_per_weight(model: onnx.ModelProto) -> float | None:
    """Bits the file spends per weight of its Conv, Gemm and MatMul layers, measured from the file.

    A layer's weight costs every initializer that its weight input is
    computed from through DequantizeLinear, Add, Mul and Reshape nodes
    (integers, scales, zero points, factors, shapes), or its float initializer; the weight count is the
    element count of the stored integers (or floats). Biases are not counted.
    None if the model has no such layer with a constant weight.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node if node.op_type in ("DequantizeLinear", "Add", "Mul", "Reshape")
                 for out in node.output}
    bits = weights = 0
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        sources, count, pending = set(), 0, [node.input[1]]
        while pending:
            name = pending.pop()
            if name in initializers:
                sources.add(name)
            elif name in producers:
                producer = producers[name]
                if producer.op_type == "DequantizeLinear" and producer.input[0] in initializers:
                    count = int(np.prod(initializers[producer.input[0]].dims))
                pending.extend(i for i in producer.input if i)
            else:
                break  # computed from activations: not a weight
        else:
            if not count and len(sources) == 1:
                count = int(np.prod(initializers[next(iter(sources))].dims))
            if count:
                bits += 8 * sum(_tensor_bytes(initializers[name]) for name in sources)
                weights += count
    return bits / weights if weights else None


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value
