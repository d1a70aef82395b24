"""The report stage: what was done to each layer, as a table for people and JSON for tools."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

import onnx_graphsurgeon as gs

from .allocate import Protection
from .check import CheckResult
from .domain import InputDomain
from .fidelity import Fidelity
from .fold import FoldResult
from .graph import WEIGHTED_OPS, to_rows
from .load import default_opset
from .options import SYNTHETIC_KINDS, Plan
from .pairs import Pair, PairSearch, Refusal
from .plan import QuantizedLayer
from .storage import runtime_note

_SUB_BYTE_BITS = {onnx.TensorProto.INT2: 2, onnx.TensorProto.UINT2: 2,
                  onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}


@dataclass(frozen=True)
class LayerReport:
    name: str
    op: str
    role: str
    """low (pair producer), high (pair consumer), unpaired (in no pair, HIGH bits) or float."""
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
    """What ``quantize`` did: the options as they ran (every ``auto`` resolved), a row per weighted layer,
    the pairs and refusals, sizes, notes and the onnxruntime check."""

    input: str
    scheme: str
    """LOW/HIGH, or "target B bits" under --target-bits."""
    format: str
    storage: str
    """exact, portable or int8 integer types (qdq only)."""
    granularity: str
    scale_block: int
    """Weights per scale in the layers that take blocks (``--scale-block``); 0: none."""
    ternary_threshold: str
    kbit_range: str
    lambda1: float
    lambda2: float
    compensate: bool
    placement: str
    relu6: str
    refine: str
    feedback: bool
    """Whether the codes were re-rounded with error feedback (``--error-feedback``)."""
    activation_bits: int | None
    activation_range: str
    synthetic: str | None
    """The synthetic inputs used, None when nothing ran on them."""
    samples: int | None
    seed: int
    opset_in: int
    opset_out: int
    layers: list[LayerReport]
    pairs: list[Pair]
    refusals: list[Refusal]
    folded_batchnorm: list[str]
    unfolded_batchnorm: list[tuple[str, str]]
    weight_bytes_before: int
    weight_bytes_after: int
    input_domain: str | None = None
    """Where the synthetic inputs were made (``domain.InputDomain.describe``)."""
    stored_bits: float | None = None
    """Bits per weight in the output file (``stored_bits_per_weight``), scales and offsets included."""
    replaced_clips: list[str] = field(default_factory=list)
    protection: list[Protection] = field(default_factory=list)
    """Under --protect: each pair consumer's LOW producers measured alone, and whether they were raised."""
    activation_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Under --activations: the calibrated range of each quantized activation."""
    shape_guessed: bool = False
    """Whether a dynamic input dim was given a common size by the tool (no --input-shape)."""
    domain_guessed: bool = False
    """The synthetic inputs' range was guessed (``domain.InputDomain.guessed``)."""
    notes: list[str] = field(default_factory=list)
    check: CheckResult | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def count(self, role: str) -> int:
        return sum(layer.role == role for layer in self.layers)

    @property
    def fidelity(self) -> Fidelity | None:
        return self.check.fidelity if self.check else None

    def warnings(self) -> list[str]:
        """What the user must not miss: the quantized model follows the float one badly, or its activation
        ranges were calibrated at an input size the tool guessed (a text recogniser calibrated at 32 x 32
        kept half its characters at 48 x 320, README), which the check on the same inputs cannot see."""
        warnings = self.fidelity.warnings() if self.fidelity else []
        if self.activation_ranges and self.shape_guessed:
            warnings.append("the activation ranges were calibrated at an input size the tool guessed (see the note): "
                            "inputs of another size may fall outside them; give the size the model is deployed at "
                            "with --input-shape")
        if self.activation_ranges and self.domain_guessed:
            warnings.append("the activation ranges were calibrated on inputs in a range the tool guessed (see "
                            "'synthetic inputs'): real inputs outside it are clipped; give the model's input range "
                            "with --input-range LO,HI or --input-mean/--input-std")
        return warnings

    def to_dict(self) -> dict:
        data = asdict(self)
        data["fidelity"] = self.fidelity.as_dict() if self.fidelity else None
        data["warnings"] = self.warnings()
        data["summary"] = {
            "pairs": len(self.pairs),
            "low_layers": self.count("low"),
            "high_layers": self.count("high"),
            "unpaired_layers": self.count("unpaired"),
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
        compensation = f"lambda1={self.lambda1:g} lambda2={self.lambda2:g}" if self.compensate else "off"
        lines = [
            f"scheme {self.scheme} ({self.format}" + (f" {self.storage}" if self.format == "qdq" else "")
            + f", {self.granularity} scales" + (f" or one per {self.scale_block} weights" if self.scale_block else "")
            + f", {self.ternary_threshold} ternary "
            f"threshold, k-bit range {self.kbit_range}" + (", error feedback" if self.feedback else "")
            + f", compensation {compensation}, refinement {self.refine})",
            f"pairs found: {len(self.pairs)}; layers quantized: {self.count('low')} low, {self.count('high')} high, "
            f"{self.count('unpaired')} unpaired at high bits; {self.count('float')} left float",
            f"ReLU6 (Clip) handling: {self.relu6}"
            + (f" ({len(self.replaced_clips)} replaced by Relu)" if self.replaced_clips else ""),
            f"BatchNormalization folded: {len(self.folded_batchnorm)}"
            + (f", not folded: {len(self.unfolded_batchnorm)}" if self.unfolded_batchnorm else ""),
            f"weight bytes: {self.weight_bytes_before:,} -> {self.weight_bytes_after:,}"
            + (f" ({self.weight_bytes_after / self.weight_bytes_before:.1%})" if self.weight_bytes_before else "")
            + (f"; {self.stored_bits:.2f} stored bits per weight" if self.stored_bits is not None else ""),
        ]
        domain = f" in the model's input domain: {self.input_domain}" if self.input_domain else ""
        if self.synthetic:
            kind = SYNTHETIC_KINDS.get(self.synthetic)
            lines.append(f"synthetic inputs: {self.samples} {kind}, seed {self.seed}" + (f";{domain}" if domain else ""))
        elif domain and self.fidelity:
            lines.append(f"fidelity inputs{domain}")
        lines += [f"left float: {layer.name}: {layer.note}" for layer in self.layers if layer.role == "float"]
        lines += [f"not paired: {refusal.producer}: {refusal.reason}" for refusal in self.refusals]
        lines += [f"BatchNormalization not folded: {name}: {reason}" for name, reason in self.unfolded_batchnorm]
        if self.activation_ranges:
            lines.append(f"activations quantized: {len(self.activation_ranges)} tensors, uint"
                         f"{self.activation_bits} per tensor, {self.activation_range} ranges on the synthetic inputs")
        lines += [f"note: {note}" for note in self.notes]
        if self.check is None:
            lines.append("onnxruntime check: skipped")
        for out in self.check.outputs if self.check else ():
            lines.append(f"onnxruntime check ({self.check.providers[0]}, batch {self.check.batch}): output "
                         f"'{out.name}' cosine {out.cosine:.4f}, SQNR {out.sqnr_db:.1f} dB")
        for out in self.fidelity.outputs if self.fidelity else ():
            agreement = "" if out.top1_agreement is None else f"top-1 agreement {out.top1_agreement:.1f} %, "
            lines.append(f"fidelity on {self.fidelity.inputs}: output '{out.name}' {agreement}SQNR {out.sqnr_db:.1f} dB")
        if self.fidelity and self.synthetic == "pink":
            lines.append("note: on pink noise the fidelity check predicts accuracy on real inputs only loosely (on a "
                         "Caffe2 SqueezeNet and a ViT it ranked refined and unrefined outputs the wrong way round; "
                         "README, \"Held-out models\")")
        if self.check is not None and self.fidelity is None:
            lines.append("fidelity: not measured (the model cannot take synthetic inputs)")
        lines += [f"warning: {warning}" for warning in self.warnings()]
        return "\n".join(lines)


def make_report(label: str, plan: Plan, source: onnx.ModelProto, result: onnx.ModelProto, search: PairSearch,
                folding: FoldResult, layers: list[LayerReport], replaced_clips: list[str], notes: list[str],
                check: CheckResult | None, timings: dict[str, float], domain: InputDomain | None = None,
                protection: list[Protection] = (), activation_ranges: dict | None = None,
                shape_guessed: bool = False) -> Report:
    """The report of one run: ``source`` is the input's skeleton, ``result`` the output model."""
    options = plan.options
    notes = list(plan.decisions) + notes
    if not any(layer.role != "float" for layer in layers):
        notes.append("no layer was quantized (see 'left float')")
    elif not search.pairs:
        notes.append("no quantizable pair: every quantized layer is at the HIGH bit width")
    notes += [note for note in (runtime_note(result),) if note]
    return Report(
        input=label, scheme=str(plan.scheme) if plan.scheme else f"target {options.target_bits:g} bits",
        format=options.format, storage=plan.storage, granularity=options.granularity, scale_block=plan.scale_block,
        ternary_threshold=plan.ternary_threshold,
        kbit_range=options.kbit_range, lambda1=options.lambda1, lambda2=options.lambda2,
        compensate=options.compensate, placement=options.placement, relu6=options.relu6, refine=plan.refine,
        feedback=plan.feedback,
        activation_bits=None if options.activations == "none" else int(options.activations),
        activation_range=options.activation_range,
        synthetic=plan.synthetic, samples=options.samples if plan.synthetic else None, seed=options.seed,
        opset_in=default_opset(source), opset_out=default_opset(result), layers=layers,
        pairs=list(search.pairs), refusals=list(search.refusals), folded_batchnorm=list(folding.folded),
        unfolded_batchnorm=list(folding.unfolded), weight_bytes_before=initializer_bytes(source),
        weight_bytes_after=initializer_bytes(result), stored_bits=stored_bits_per_weight(result),
        replaced_clips=replaced_clips, notes=notes, check=check, timings=timings,
        input_domain=domain.describe() if domain else None, protection=list(protection),
        activation_ranges=dict(activation_ranges or {}), shape_guessed=shape_guessed,
        domain_guessed=bool(domain and domain.guessed))


def layer_reports(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], left_float: dict[str, str]) -> list[LayerReport]:
    """A row per weighted layer, in graph order: quantized layers with their weight SQNR and c, then why the
    others stayed float."""
    reports: dict[str, LayerReport] = {}
    for name, ql in qlayers.items():
        c = ql.compensation
        reports[name] = LayerReport(
            name=name, op=ql.layer.op, role=ql.role, bits=ql.quantized.bits, partner=ql.partner,
            sqnr_db=ql.weight.sqnr_db(to_rows(ql.layer.weight, ql.layer.out_axis)),
            c_min=None if c is None else float(c.min()),
            c_median=None if c is None else float(np.median(c)),
            c_max=None if c is None else float(c.max()))
    nodes = {node.name: node for node in graph.nodes}
    for name, reason in left_float.items():
        reports[name] = LayerReport(name=name, op=nodes[name].op, role="float", bits=None, partner=None,
                                    sqnr_db=None, note=reason)
    order = {name: index for index, name in enumerate(nodes)}
    return sorted(reports.values(), key=lambda r: order.get(r.name, len(order)))


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


def stored_bits_per_weight(model: onnx.ModelProto) -> float | None:
    """Bits the file spends per weight of its Conv, Gemm and MatMul layers, measured from the file.

    A layer's weight costs every initializer that its weight input is
    computed from through DequantizeLinear, Add, Mul, Reshape, Cast and Pow nodes
    (integers, scales, zero points, factors, shapes), or its float initializer, each initializer counted
    once however many layers share it; the weight count is the element count of the stored integers (or
    floats). Biases are not counted.
    None if the model has no such layer with a constant weight.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node
                 if node.op_type in ("DequantizeLinear", "Add", "Mul", "Reshape", "Cast", "Pow") for out in node.output}
    spent, weights = set(), 0
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
                    count = max(count, int(np.prod(initializers[producer.input[0]].dims)))  # not the scales' codes
                pending.extend(i for i in producer.input if i)
            else:
                break  # computed from activations: not a weight
        else:
            if not count and len(sources) == 1:
                count = int(np.prod(initializers[next(iter(sources))].dims))
            if count:
                spent |= sources
                weights += count
    return 8 * sum(_tensor_bytes(initializers[name]) for name in spent) / weights if weights else None


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
