"""The quantize and solve stages: each layer's bit width, its quantized weight, and the producers'
compensation c (the maths in ``maths/quantizers.py`` and ``maths/compensation.py``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .graph import Layer, from_rows, to_rows
from .maths.compensation import solve_compensation
from .maths.statistics import expected_output_error
from .maths.quantizers import QuantizedWeight, quantize_rows
from .options import Options, Plan, Scheme
from .pairs import PairSearch


@dataclass(frozen=True)
class QuantizedLayer:
    """One layer's outcome. ``role``: ``low`` (pair producer), ``high`` (pair consumer) or ``unpaired``
    (in no pair, at HIGH bits). ``quantized`` is the weight before compensation and ``compensation`` the
    producer's c (Eq. 7), None for other roles. ``weight`` and ``bias`` are what the output computes
    with: c on the producer (``compensated``), then whatever the refinement stage changed."""

    layer: Layer
    role: str
    partner: str | None
    quantized: QuantizedWeight
    compensation: np.ndarray | None
    weight: QuantizedWeight
    bias: np.ndarray | None

    def dequantized(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight in the graph's layout, bias) as the layer computes them."""
        return from_rows(self.weight.dequantize(), self.layer.weight.shape, self.layer.out_axis), self.bias


def compensated(q: QuantizedWeight, bias: np.ndarray | None,
                c: np.ndarray | None) -> tuple[QuantizedWeight, np.ndarray | None]:
    """Producer placement of c (spec section 3): row j's scale and bias b_j multiplied by c_j."""
    if c is None:
        return q, bias
    new_bias = None if bias is None else (bias.astype(np.float64) * c).astype(np.float32)
    return q.scaled(c), new_bias


def quantize_layer(layer: Layer, bits: int, plan: Plan) -> QuantizedWeight:
    """``layer``'s weight at ``bits`` (``quantize_weight_rows``), in blocks where ``scale_block`` says."""
    return quantize_weight_rows(to_rows(layer.weight, layer.out_axis), bits, plan, layer.taps,
                                block=scale_block(layer, plan.scale_block))


def quantize_weight_rows(rows: np.ndarray, bits: int, plan: Plan, taps: int = 1, grid: str | None = None,
                         block: int = 0) -> QuantizedWeight:
    """Weight rows at ``bits``: ternary (Eqs. 3-4) or DoReFa (Eq. 6), with the plan's scales, ternary
    threshold, k-bit range, grid (or ``grid``) and rounding (``taps``: the layer's ``Layer.taps``); with
    ``block``, a scale per ``block`` weights of a row on the integer grid (``quantize_rows``)."""
    options = plan.options
    return quantize_rows(rows, bits, options.per_channel(bits), plan.ternary_threshold, plan.kbit_range,
                         block_grid(block, grid or plan.grid(bits)),
                         taps if options.kbit_rounding == "kernel-sum" else 1, block)


def block_grid(block: int, grid: str) -> str:
    """The grid of a layer quantized with ``block`` weights per scale (``scale_block``): the symmetric integers
    in blocks, else ``grid``."""
    return "integer" if block else grid


def scale_block(layer: Layer, block: int) -> int:
    """Weights per scale of ``layer`` under ``--scale-block block``: ``block`` when each output channel reads
    each input feature with one weight (MatMul, Gemm, a 1x1 conv of one group) and ``block`` divides the
    inputs into two blocks or more; else 0 (one scale per channel or tensor). Blocks run along the rows of
    ``to_rows``, the axis DequantizeLinear's ``block_size`` runs along (``emit``); they hold the symmetric
    integers: DoReFa's odd codes would need the scales broadcast to the whole weight for their offset."""
    shape = layer.weight.shape
    one_by_one = layer.op == "Conv" and layer.group == 1 and all(d == 1 for d in shape[2:])
    inputs = int(np.prod(shape)) // layer.out_channels
    fits = block > 0 and inputs % block == 0 and inputs >= 2 * block
    return block if fits and (len(shape) == 2 or one_by_one) else 0


def layer_compensation(layer: Layer, q: QuantizedWeight, options: Options) -> np.ndarray:
    """c for a producer quantized to ``q`` (the closed form of Eqs. 7-10)."""
    return solve_compensation(to_rows(layer.weight, layer.out_axis), q.dequantize(), layer.bias,
                              options.lambda1, options.lambda2)


def scheme_bits(search: PairSearch, layers: dict[str, Layer], scheme: Scheme) -> dict[str, int]:
    """LOW bits for pair producers, HIGH for every other layer."""
    producers = {pair.producer for pair in search.pairs}
    return {name: scheme.low if name in producers else scheme.high for name in layers}


def quantize_layers(layers: dict[str, Layer], search: PairSearch, bits: dict[str, int],
                    plan: Plan) -> dict[str, QuantizedLayer]:
    """The quantize stage: every layer at its width, with its role in the pairs, before compensation."""
    roles = search.roles(list(layers))
    result = {}
    for name, layer in layers.items():
        q = quantize_layer(layer, bits[name], plan)
        result[name] = QuantizedLayer(layer, *roles[name], q, None, q, layer.bias)
    return result


def compensate_layers(qlayers: dict[str, QuantizedLayer], options: Options) -> dict[str, QuantizedLayer]:
    """The solve stage: c for every pair producer (none with ``--no-compensation``), placed on it."""
    if not options.compensate:
        return qlayers
    result = dict(qlayers)
    for name, ql in qlayers.items():
        if ql.role == "low":
            c = layer_compensation(ql.layer, ql.quantized, options)
            weight, bias = compensated(ql.quantized, ql.layer.bias, c)
            result[name] = dataclasses.replace(ql, compensation=c, weight=weight, bias=bias)
    return result


def output_shift(layer: Layer, weight: np.ndarray, input_mean: np.ndarray) -> np.ndarray | None:
    """How far ``weight`` (``layer``'s, in the graph's layout) moves the mean of each output channel from the
    float layer's, given the mean of each input channel (spec section 4: sum_m (sum over the kernel of
    (What - W)[j, m]) E[A_m]); None where the input features do not map onto the channels of the mean."""
    if layer.group is not None and input_mean.size != layer.in_channels:
        return None
    error = weight.astype(np.float64) - layer.weight
    return expected_output_error(error if layer.group is not None or layer.out_axis == 0 else error.T, input_mean,
                                 layer.group)
