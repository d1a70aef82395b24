"""How each bit width is stored: integer types, the split of DoReFa codes into parts, packing into
bytes, and the opset every type needs (``storage_parts`` for the policy)."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from numba import njit, prange
from onnx import numpy_helper, version_converter

from .errors import InputError, first_line
from .graph import WEIGHTED_OPS
from .load import constant_tensors, default_opset
from .maths.quantizers import QuantizedWeight
from .options import WIDTHS, Plan


def storage_parts(bits: int, storage: str = "exact", grid: str = "dorefa") -> tuple[tuple[type, int], ...]:
    """How a layer quantized to ``bits`` is stored: (integer type, step) per part, the step in units of
    the quantizer's scale s.

    ``exact`` spends no more bits than the width: ternary codes T (Eq. 3) go
    in INT2 with step 1 (W = s T). DoReFa codes q (Eq. 6) are odd, so
    m = (q - 1) / 2 is a signed ``bits``-bit integer and W = s (2 m + 1): m
    goes in INT4, INT8 or INT16 with step 2, or, for 5 and 6 bits, in an INT4
    high part and a UINT2 low part, m = 4 hi + lo (steps 8 and 2), so that
    6-bit weights take 6 bits. The "+ s" is added after the DequantizeLinear
    nodes; the file stores one scale per channel (``emit_qdq``). Codes of the
    ``integer`` grid are stored themselves (W = s q) in the same types, with
    half the steps and no offset.

    ``portable`` uses only the types that onnxruntime and OpenVINO both load
    (INT4 at opset 21, INT8), and where it can, one DequantizeLinear that
    feeds the layer directly, as QDQ toolchains expect: the codes themselves
    with step 1 (W = s q), DoReFa's in INT4 up to 3 bits (|q| <= 7) and in
    INT8 up to 7 (|q| <= 127), 8-bit DoReFa codes as m in INT8 with the
    "+ s" (|q| <= 255); integer codes in INT4 up to 4 bits, else INT8.

    ``int8`` is ``portable`` with INT8 in place of INT4: integer kernels
    (onnxruntime's QLinearConv, OpenVINO's) read int8 weights only, so under
    ``--activations`` a weight in INT4 leaves its layer to run in float.
    """
    narrow = np.int8 if storage == "int8" else ml_dtypes.int4
    if bits == 2:
        return ((ml_dtypes.int2, 1),) if storage == "exact" else ((narrow, 1),)
    if grid == "integer":
        if bits <= 4:
            return ((narrow, 1),)
        if bits <= 6 and storage == "exact":
            return ((ml_dtypes.int4, 4), (ml_dtypes.uint2, 1))
        return ((np.int8, 1),) if bits <= 8 else ((np.int16, 1),)
    if storage != "exact" and bits <= 7:
        return ((narrow if bits <= 3 else np.int8, 1),)
    if bits <= 4:
        return ((ml_dtypes.int4, 2),)
    if bits <= 6:
        return ((ml_dtypes.int4, 8), (ml_dtypes.uint2, 2))
    if bits <= 8:
        return ((np.int8, 2),)
    if bits <= 16:
        return ((np.int16, 2),)
    raise ValueError(f"no integer storage for {bits}-bit weights")


def stores_offset(bits: int, storage: str = "exact", grid: str = "dorefa") -> bool:
    """Whether the parts hold m = (q - 1) / 2 of DoReFa codes, so that W = s (2 m + 1) needs the "+ s" in the
    graph; otherwise they hold the codes themselves."""
    return grid == "dorefa" and bits > 2 and storage_parts(bits, storage, grid)[-1][1] != 1


TYPE_BITS = {ml_dtypes.int2: 2, ml_dtypes.uint2: 2, ml_dtypes.int4: 4, np.int8: 8, np.int16: 16}
"""Bits per stored integer of each storage type (INT2/UINT2 four and INT4 two to a byte)."""


def stored_weight_bits(bits: int, shape: tuple[int, ...], out_axis: int, per_channel: bool, storage: str = "exact",
                       grid: str = "dorefa", block: int = 0) -> int:
    """Bits the file spends on one weight of ``shape`` quantized to ``bits``, as ``emit.emit_qdq`` writes it:
    the packed integers of every part and the scales (``scale_bits``: one per ``block`` weights, else per
    channel or one). The constants that derive the other parts' scales and the DoReFa offset from them are
    shared by every layer, so no layer's cost."""
    parts = storage_parts(bits, storage, grid)
    total = sum(TYPE_BITS[dtype] for dtype, _ in parts) * int(np.prod(shape))
    scales = int(np.prod(shape)) // block if block else int(shape[out_axis]) if per_channel else 1
    return total + scale_bits(scales, storage)


def scale_bits(scales: int, storage: str) -> int:
    """Bits of a layer's scales: one float32 for a single scale; else one uint8 code each and two float32
    (``LogScales``) under ``exact``, one float32 each under ``portable`` and ``int8``."""
    if scales == 1:
        return 32
    return 8 * scales + 64 if storage == "exact" else 32 * scales


def shared_constant_bits(ranks: set[int], storage: str = "exact", grids: tuple[str, ...] = ("dorefa",)) -> int:
    """At most what the constants ``emit.emit_qdq`` shares between layers cost, whatever the widths in
    ``WIDTHS``: one float32 per power-of-two factor between the parts' scales, for the DoReFa offset its
    factor and one int64 reshape target per weight rank, and under ``exact`` the base 2 and the uint8 zero
    point of the scale codes (``LogScales``)."""
    factors, offset = set(), False
    for bits in WIDTHS:
        for grid in grids:
            parts = storage_parts(bits, storage, grid)
            factors |= {step / parts[-1][1] for _, step in parts if step != parts[-1][1]}
            if stores_offset(bits, storage, grid):
                factors.add(1.0 / parts[-1][1])
                offset = True
    return 32 * len(factors) + (64 * sum(ranks) if offset else 0) + (32 + 8 if storage == "exact" else 0)


LOG_SCALE_ZERO = 128
"""The zero point of the uint8 scale codes: s_j = S 2^(t (e_j - 128))."""
LOG_SCALE_OCTAVES = 16
"""A channel whose scale is more than 2^16 below its layer's largest is stored as zero: it computes nothing
next to the other channels (folded BatchNorm leaves such channels), and the codes' 255 steps span at most
16 octaves, each at most 4.5 % (a gain error within 2.2 %; most layers' scales span a few octaves, a step
of about 1 %)."""


@dataclass(frozen=True)
class LogScales:
    """Per-channel scales as ``exact`` stores them, a byte each: s_j = S 2^(t (e_j - 128)) for a uint8 code
    e_j in 1..255, with t (the step, in octaves) and S one float32 each for the layer; e_j = 0 is s_j = 0 where
    ``zeros`` (a row whose nonzero codes must give zero weights: DoReFa's odd codes, or c_j = 0).

    The scales span log2(max/min) octaves in 254 steps, so the relative error of a channel's scale is at most
    half a step; the codes of the weights do not change."""

    codes: np.ndarray
    step: np.float32
    base: np.float32
    zeros: bool

    def values(self) -> np.ndarray:
        """s_j in float32, as the graph computes them: (e_j - 128) t (DequantizeLinear), 2^x (Pow), times S."""
        exponent = (self.codes.astype(np.int32) - LOG_SCALE_ZERO).astype(np.float32) * self.step
        scale = np.power(np.float32(2.0), exponent) * self.base
        return np.where(self.codes == 0, np.float32(0), scale) if self.zeros else scale


def log_scales(q: QuantizedWeight) -> LogScales | None:
    """q's per-channel (or per-block) scales as ``LogScales``; None for a single scale (every channel's the same)."""
    scale = q.scale.astype(np.float64)
    if np.any(scale < 0) or not np.all(np.isfinite(scale)):
        raise ValueError("scales must be finite and non-negative")
    if not q.block and np.all(scale == scale[0]):
        return None
    live = scale > scale.max() * 2.0**-LOG_SCALE_OCTAVES
    octaves = np.log2(np.where(live, scale, scale.max()))
    low = octaves[live].min()
    step = np.float32((octaves.max() - low) / 254)
    base = np.float32(2.0 ** (low + float(step) * (LOG_SCALE_ZERO - 1)))
    index = np.rint((octaves - low) / step) if step > 0 else np.zeros_like(octaves)
    codes = np.where(live, 1 + index, 0).astype(np.uint8)
    coded = np.any(q.codes.reshape(scale.shape + (-1,)) != 0, axis=-1)  # each scale's weights: a row or a block
    zeros = bool(np.any(~live & coded))
    return LogScales(np.where(live | zeros, codes, 1).astype(np.uint8), step, base, zeros)


def with_stored_scale(q: QuantizedWeight, storage: str) -> tuple[QuantizedWeight, LogScales | None]:
    """``q`` with its scales as the file keeps them, and how it keeps them: ``LogScales`` under ``exact``
    (None for a single scale, and under ``portable`` and ``int8``: float32)."""
    stored = log_scales(q) if storage == "exact" else None
    return q.with_scale(q.scale.astype(np.float32) if stored is None else stored.values()), stored


OPSET_FOR_TYPE = {ml_dtypes.int2: 25, ml_dtypes.uint2: 25, ml_dtypes.int4: 21, np.int8: 13, np.int16: 21}
"""The first opset whose DequantizeLinear takes the type with a per-axis scale."""


def storage_opset(bits: int, storage: str = "exact", grid: str = "dorefa") -> int:
    """The opset that ``storage_parts(bits, storage, grid)`` needs."""
    return max(OPSET_FOR_TYPE[dtype] for dtype, _ in storage_parts(bits, storage, grid))


def stored_rows(q: QuantizedWeight, storage: str = "exact") -> np.ndarray:
    """The weight rows exactly as the qdq model computes them from its stored integers, in float32:
    each part times (step x scale), summed, plus the scale for m of DoReFa codes."""
    scale = q.entry_scales()
    rows = None
    for (_, step), part in zip(storage_parts(q.bits, storage, q.grid), split_codes(q, storage)):
        term = part.astype(np.float32) * (scale * np.float32(step))
        rows = term if rows is None else rows + term
    return rows + scale if stores_offset(q.bits, storage, q.grid) else rows


def split_codes(q: QuantizedWeight, storage: str = "exact") -> list[np.ndarray]:
    """The integer parts of ``storage_parts(q.bits, storage, q.grid)`` for q's codes (rows), in order."""
    offset = stores_offset(q.bits, storage, q.grid)
    if len(storage_parts(q.bits, storage, q.grid)) == 2:
        return list(_high_and_low(q.codes, offset))
    return [(q.codes - 1) // 2] if offset else [q.codes]  # odd codes: exact, in the codes' own integer type


@njit(cache=True, parallel=True)
def _high_and_low(codes: np.ndarray, odd: bool) -> tuple[np.ndarray, np.ndarray]:
    """m = (q - 1) / 2 (``odd``: DoReFa codes) or m = q, split as m = 4 hi + lo, hi in [-8, 7], lo in [0, 3],
    in one pass."""
    high = np.empty(codes.shape, dtype=np.int8)
    low = np.empty(codes.shape, dtype=np.int8)
    for j in prange(codes.shape[0]):
        for k in range(codes.shape[1]):
            m = (np.int32(codes[j, k]) - 1) >> 1 if odd else np.int32(codes[j, k])
            high[j, k] = m >> 2
            low[j, k] = m & 3
    return high, low


def packed_tensor(name: str, values: np.ndarray, dtype: type) -> onnx.TensorProto:
    """``values`` (integers in range) as a TensorProto of ``dtype``; INT2/UINT2 four and INT4 two to a byte,
    first element in the lowest bits, as the ONNX spec lays them out."""
    if dtype not in (ml_dtypes.int2, ml_dtypes.uint2, ml_dtypes.int4):
        return numpy_helper.from_array(values.astype(dtype), name)
    bits = TYPE_BITS[dtype]
    data_type = {ml_dtypes.int2: onnx.TensorProto.INT2, ml_dtypes.uint2: onnx.TensorProto.UINT2,
                 ml_dtypes.int4: onnx.TensorProto.INT4}[dtype]
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=values.shape)
    tensor.raw_data = _pack(np.ascontiguousarray(values, dtype=np.int8).reshape(-1), bits).tobytes()
    return tensor


@njit(cache=True, parallel=True)
def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    count = values.size
    out = np.empty((count + per_byte - 1) // per_byte, dtype=np.uint8)
    for b in prange(out.size):
        byte = 0
        for k in range(per_byte):
            i = b * per_byte + k
            if i < count:
                byte |= (np.int32(values[i]) & mask) << (bits * k)
        out[b] = np.uint8(byte)
    return out


def runtime_note(model: onnx.ModelProto) -> str | None:
    """Which runtimes are known to load ``model`` when its storage types narrow the choice (measured with
    onnxruntime 1.32 and OpenVINO 2026.4; ``tests/test_storage.py``), else None."""
    if {t.data_type for t in model.graph.initializer} & {onnx.TensorProto.INT2, onnx.TensorProto.UINT2}:
        return ("INT2/UINT2 weights (opset 25): onnxruntime runs this file, OpenVINO 2026.4 refuses it; "
                "--storage portable writes the same weights in INT4/INT8, which both run")
    return None


FLOAT16_SCALES_OPSET = 19
"""The first opset whose DequantizeLinear takes float16 scales (a float16 model's weights)."""
BLOCK_OPSET = 21
"""The first opset whose DequantizeLinear takes ``block_size`` (``--scale-block``)."""
ACTIVATION_OPSET = {8: 13, 16: 21}
"""The opset the activation QuantizeLinear/DequantizeLinear need: uint8 from 13 (the widely supported
form), uint16 from 21."""


def required_opset(plan: Plan, half: bool = False) -> int:
    """The opset whose DequantizeLinear takes every storage type the plan may write (INT2 and UINT2: 25,
    INT4: 21): the scheme's two widths, or every width ``--target-bits`` may choose; and float16 scales
    when ``half``."""
    options = plan.options
    widths = (plan.scheme.low, plan.scheme.high) if plan.scheme is not None else WIDTHS
    weights = ([storage_opset(bits, plan.storage, grid) for bits in widths for grid in plan.grids(bits)]
               if options.format == "qdq" else [])
    activations = [ACTIVATION_OPSET[int(options.activations)]] if options.activations != "none" else []
    blocks = [BLOCK_OPSET] if weights and plan.scale_block else []
    return max(weights + activations + blocks + [FLOAT16_SCALES_OPSET if half and weights else 0])


def upgrade_for_storage(skeleton: onnx.ModelProto, plan: Plan, half: bool = False) -> tuple[onnx.ModelProto, str | None]:
    """``skeleton`` converted to ``required_opset`` when qdq storage needs it and some layer will be
    quantized, and a note saying so (else the skeleton as it is, and None). A float16 model is refused
    under --activations: its QuantizeLinear scales would be float16, and onnxruntime's fused integer
    kernels (QLinearConcat and others) take float32 scales only, so it could not load the output."""
    if half and plan.options.activations != "none":
        raise InputError("--activations on a float16 model: onnxruntime's integer kernels take float32 "
                         "scales only; convert the model to float32 first (weight-only quantization works)")
    opset, needed = default_opset(skeleton), required_opset(plan, half)
    if opset >= needed or not has_float32_weights(skeleton):
        return skeleton, None
    try:
        upgraded = version_converter.convert_version(skeleton, needed)
    except Exception as err:  # the converter raises several unrelated types
        raise InputError(f"cannot upgrade the model to opset {needed} for integer storage ({first_line(err)}); "
                         "use --format float") from None
    widths = str(plan.scheme) if plan.scheme is not None else "--target-bits"
    what = f"{widths} {plan.options.format}" + (f", --activations {plan.options.activations}"
                                                 if plan.options.activations != "none" else "")
    return upgraded, f"opset upgraded from {opset} to {needed} for the integer storage types of {what}"


def has_float32_weights(model: onnx.ModelProto) -> bool:
    """Whether some Conv, Gemm or MatMul of ``model`` reads a float32 initializer or Constant as its weight:
    whether anything will be quantized (``graph.find_layers`` says which)."""
    constants = {name for name, t in constant_tensors(model).items() if t.data_type == onnx.TensorProto.FLOAT}
    return any(node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in constants
               for node in model.graph.node)
