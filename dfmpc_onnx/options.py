"""Every option of the tool in one place: its choices, default, help and validation (``Options``,
``OutputOptions``), and the one resolution of the ``auto`` values, fallbacks included, into the ``Plan``
that runs and that the report prints. The command line is generated from these fields (``cli.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .values import (ModelFacts, Scheme, parse_input_shape, parse_input_shapes, parse_protect, parse_scale_block,
                     undistilled)

WIDTHS = (2, 4, 6, 8)
"""The bit widths ``--target-bits`` chooses from (3 and 5 bits are stored in 4 and 6, so never cheaper)."""
DEFAULT_SCHEME = "2/6"
TOKEN_BLOCK = 32
"""``--scale-block auto`` in a transformer: weights per scale (README, "Vision transformers")."""
PROTECT_DB = 6.0
"""``--protect``'s default: the output SQNR below which one pair's LOW producers are raised (README, "Protected
pairs": chosen on the shared models)."""
SYNTHETIC_KINDS = {"distill": "distilled", "pink": "pink-noise", "noise": "white-noise", "leaves": "dead-leaves"}
"""How the report names each kind of synthetic input."""


def option(default, help: str, *, choices: tuple | None = None, flag: str | tuple[str, ...] | None = None,
           metavar: str | None = None, cli: str = "value", parse=None, shown: str | None = None):
    """A field of ``Options``: its default and what the command line shows. ``cli`` says how the flag
    reads: "value" (one value; ``parse`` turns the text into it), "negate" (--no-X sets False),
    "toggle" (--X / --no-X), "switch" (--X sets True), "many" (one or more values), "csv" (a
    comma-separated list), "repeat" (the flag may be given several times). ``shown`` is the default as
    help and the README state it, where the field's own (None) means "decided later"."""
    return field(default=default, metadata=dict(help=help, choices=choices, flag=flag, metavar=metavar, cli=cli,
                                                parse=parse, shown=shown))


@dataclass(frozen=True)
class Options:
    """What ``quantize`` does. Every field can be given to ``quantize`` as a keyword; ``auto`` values are
    resolved per model by ``resolve``."""

    scheme: Scheme | None = option(
        None, "LOW/HIGH bit widths of pair producers / consumers and unpaired layers; B is uniform B bits. LOW=2 "
              "is ternary (Eqs. 3-4), other widths DoReFa (Eq. 6)", metavar="LOW/HIGH", shown=DEFAULT_SCHEME)
    target_bits: float | None = option(
        None, "instead of --scheme, choose 2/4/6/8 bits per pair and per unpaired layer for an average of at most "
              "B stored bits per quantized weight (integers and scales, as the file holds them), by output "
              "agreement with the float model on the synthetic inputs (inference only, no data)", metavar="B",
        parse=float)
    protect: float | None = option(
        PROTECT_DB, "with --scheme, raise a pair to HIGH/HIGH when its LOW producers alone (the rest of the model "
                    "float) leave the output SQNR on the synthetic inputs below DB decibels; off: the scheme as "
                    "given (with --refine none --kbit-rounding nearest, the paper)", metavar="DB|off",
        parse=parse_protect)
    format: str = option("qdq", "qdq: integer weights + DequantizeLinear; float: the same weights as float "
                                "initializers, for any runtime", choices=("qdq", "float"))
    storage: str = option("auto", "integer types of qdq weights: exact spends the width's own bits (INT2/UINT2 need "
                                  "opset 25, which OpenVINO 2026.4 does not load); portable uses only INT4 (opset 21) "
                                  "and INT8, one DequantizeLinear per weight up to 7 bits, same weight values; int8: "
                                  "portable with INT8 for INT4, what integer kernels read; auto: int8 with "
                                  "--activations, else exact", choices=("auto", "exact", "portable", "int8"))
    activations: str = option("none", "also quantize the activations (QuantizeLinear/DequantizeLinear, uint8/uint16 "
                                      "per tensor) around every quantized layer and the residual Adds, Concats and "
                                      "pools between, so runtimes run them on integers; ranges from the synthetic "
                                      "inputs, which statistics matching runs them on; 8-bit weights on the integer grid",
                              choices=("none", "8", "16"))
    activation_range: str = option("mse", "how --activations sets each range: min/max, the 0.01/99.99 "
                                             "percentiles, or the clipping with the least squared error",
                                   choices=("minmax", "percentile", "mse"))
    granularity: str = option("auto", "quantizer scales per tensor (the paper) or per output channel; auto: per "
                                      "tensor for ternary layers, per channel for k-bit layers",
                              choices=("auto", "tensor", "channel"))
    ternary_threshold: str = option("auto", "twn: Delta = 0.7 mean|W| (Eq. 4); optimal: the exact least-squares "
                                            "threshold; auto: optimal under --refine refit, else twn",
                                    choices=("auto", "twn", "optimal"))
    kbit_range: str = option("max", "M of the k-bit quantizer (Eq. 6): max|W| (the paper), the clipped range "
                                    "with the least squared error, or per output channel the clipped range with the "
                                    "least output error on the layer's inputs (synthetic)",
                             choices=("max", "mse", "output"))
    kbit_grid: str = option("dorefa", "levels of the k-bit quantizer: Eq. 6's 2^k odd levels (the paper, no zero), "
                                      "or the symmetric integers -(2^(k-1)-1)..2^(k-1)-1 times M/(2^(k-1)-1) (plain "
                                      "rounding as users know it, zero exact); auto: per layer the one with the "
                                      "least output error on the layer's inputs (synthetic)",
                            choices=("dorefa", "integer", "auto"))
    scale_block: int | str = option("auto", "N weights of an output channel per scale (blocks, ONNX's block_size; "
                                            "opset 21) in MatMul, Gemm and 1x1 conv layers whose inputs N divides at "
                                            "least twice, k-bit ones on the integer grid; 0: a scale per channel or "
                                            f"tensor (--granularity); auto: {TOKEN_BLOCK} in a transformer (MatMuls "
                                            "over tokens), else 0", metavar="N|auto", parse=parse_scale_block)
    error_feedback: str = option("auto", "re-round each layer's codes column by column on its grid, each column's "
                                         "error fed back onto the columns not yet rounded through the inverse "
                                         "covariance of the layer's input on the synthetic inputs (GPTQ); auto: on "
                                         "with --refine refit (inputs distilled from BatchNorm statistics) and in a "
                                         "transformer (README)",
                                 choices=("auto", "on", "off"))
    kbit_rounding: str = option("kernel-sum", "how k-bit weights are rounded: each to the nearest level (the "
                                              "paper), or then the fewest moved one level so that every kernel's sum over "
                                              "its spatial taps (its response to a constant input) keeps its float "
                                              "value (depthwise kernels often nearly cancel)",
                                choices=("nearest", "kernel-sum"))
    lambda1: float = option(0.5, "weight of the bias term of the closed form")
    lambda2: float = option(0.0, "weight of the ||c||^2 term of the closed form")
    compensate: bool = option(True, "plain rounding, c = 1 ('Original' in the paper)", flag="--no-compensation",
                              cli="negate")
    placement: str = option("producer", "where c is applied; consumer (Eq. 7 literally) needs --format float and "
                                        "runs no refinement (it works on producer-placed weights)",
                            choices=("producer", "consumer"))
    refine: str = option("auto", "after compensation, data-free: stats matches each quantized conv's per-channel "
                                 "output mean and variance (a transformer MatMul's per feature over the tokens) to "
                                 "the float model's on synthetic inputs (on noise, a k-bit layer's mean only); "
                                 "refit first re-solves each pair consumer by least squares on them; bias subtracts "
                                 "the expected output error from BatchNorm statistics; none is the paper alone. "
                                 "auto: refit on distilled inputs, stats on noise (dropped if it does not also hold "
                                 "on white and low-contrast noise), none with --placement consumer",
                         choices=("auto", "none", "bias", "stats", "refit"))
    synthetic: str = option("auto", "synthetic inputs: 1/f^2 pink noise (each image its own contrast and mean "
                                    "colour), white noise, dead leaves (disks of random colour, one over another), or "
                                    "pink noise optimised so that the model's BatchNorm "
                                    "layers see their running statistics, or, in a classifier without BatchNorm, so "
                                    "that each is classified as a chosen class under image priors (run by "
                                    "onnxruntime, on --providers). auto: distill when the model has BatchNorm "
                                    "statistics or is a classifier of at most 0.25 GMAC per input, else dead "
                                    "leaves in a transformer (MatMuls over tokens) and pink in other models",
                            choices=("auto", "pink", "noise", "leaves", "distill"))
    input_mean: tuple[float, ...] = option((), "the mean of the model's input per channel (comma-separated, or one "
                                                "value for all), for the synthetic inputs; default: from the model",
                                            metavar="M[,M...]", cli="csv")
    input_std: tuple[float, ...] = option((), "the standard deviation of the model's input per channel, as "
                                              "--input-mean", metavar="S[,S...]", cli="csv")
    input_range: tuple[float, float] | None = option(
        None, "the range of the model's input (e.g. 0,255 for raw pixels): synthetic inputs are made and kept in "
              "it; default: from the model", metavar="LO,HI", cli="csv")
    samples: int = option(64, "number of synthetic inputs")
    seed: int = option(0, "seed of the synthetic inputs (0 or more)")
    relu6: str = option("refuse", "a Clip(0, 6) between producer and consumer: refuse the pair; pair across it "
                                  "(exact, c sits on the producer); relu: first replace each Clip that its input "
                                  "statistics say is rarely reached by Relu (a model change, reported)",
                        choices=("refuse", "pair", "relu"))
    keep_first: bool = option(True, "keep the first layer out of pairs, at HIGH bits", cli="toggle")
    keep_last: bool = option(True, "keep the last layer (classifier) out of pairs, at HIGH bits, and out of "
                                   "statistics matching (its output is the model's)", cli="toggle")
    exclude: tuple[str, ...] = option((), "leave these Conv/Gemm/MatMul nodes in float", metavar="NODE_NAME",
                                      cli="many")
    check: bool = option(True, "skip the onnxruntime comparison of the float and quantized model",
                         flag="--no-check", cli="negate")
    providers: tuple[str, ...] = option(("cpu",), "comma-separated onnxruntime providers for the check and the "
                                                  "distillation: cpu, cuda", cli="csv")
    check_batch: int = option(1, "batch size for dynamic batch dims in the check")
    min_agreement: float | None = option(
        None, "fail the check (exit 3, nothing written unless --keep-failed) when the quantized model agrees with "
              "the float model's top-1 on fewer than P percent of the synthetic inputs", metavar="P", parse=float)
    input_shapes: tuple[tuple[str | None, tuple[int, ...]], ...] = option(
        (), "shape for an input with dynamic dims, used by the check and the synthetic inputs (the output keeps "
            "the dynamic dims); NAME: is needed for models with several inputs; repeatable",
        flag="--input-shape", metavar="[NAME:]D0,D1,...", cli="repeat", parse=parse_input_shape)

    def __post_init__(self) -> None:
        _normalise(self)
        _check_choices(self)
        _check_numbers(self)
        _check_combinations(self)

    def per_channel(self, bits: int) -> bool:
        """Whether a layer quantized to ``bits`` gets one quantizer scale per output channel.

        "tensor" (the paper) and "channel" apply to every layer; "auto" is per tensor for ternary layers
        and per channel for k-bit ones (k >= 3). Measured (README): per channel costs ternary layers
        accuracy on the CIFAR ResNets, while k-bit layers gain from it, and a lot in models whose folded
        BatchNorm leaves channel ranges orders of magnitude apart (EfficientNet-Lite0 at 8/8: 73 % per
        tensor, 88 % per channel)."""
        if self.granularity == "auto":
            return bits >= 3
        return self.granularity == "channel"


@dataclass(frozen=True)
class OutputOptions:
    """How ``quantize_file`` and the command line write and show the result."""

    external_data: bool | None = option(None, "store the weights in OUTPUT.data beside the model (automatic above "
                                              "2 GiB)", cli="switch")
    keep_failed: bool = option(False, "write the output even when it fails the onnxruntime check (exit status "
                                      "still 3)", cli="switch")
    report: Path | None = option(None, "also write the full report as JSON", metavar="PATH.json", parse=Path)
    quiet: bool = option(False, "print nothing but errors", flag=("-q", "--quiet"), cli="switch")
    verbose: bool = option(False, "also print the time of each stage", flag=("-v", "--verbose"), cli="switch")

    def __post_init__(self) -> None:
        if self.quiet and self.verbose:
            raise InputError("-q and -v exclude each other")


def flags(item: dataclasses.Field) -> tuple[str, ...]:
    """The command-line flags of an option field: its own, or --NAME with dashes."""
    flag = item.metadata["flag"] or "--" + item.name.replace("_", "-")
    return (flag,) if isinstance(flag, str) else tuple(flag)


def _normalise(options: Options) -> None:
    """Lists to tuples, a scheme's text to a ``Scheme``, a dict of input shapes to pairs (frozen fields)."""
    def put(name, value):
        object.__setattr__(options, name, value)
    if options.scheme is not None and not isinstance(options.scheme, Scheme):
        try:
            put("scheme", Scheme.parse(options.scheme))
        except ValueError as err:
            raise InputError(f"--scheme: {err}") from None
    put("exclude", tuple(options.exclude))
    put("activations", str(options.activations))
    if isinstance(options.protect, str):
        put("protect", parse_protect(options.protect))
    providers = options.providers.split(",") if isinstance(options.providers, str) else options.providers
    put("providers", tuple(p.strip() for p in providers if p.strip()))
    put("input_shapes", parse_input_shapes(options.input_shapes))
    put("scale_block", parse_scale_block(options.scale_block))
    for name in ("input_mean", "input_std", "input_range"):
        value = getattr(options, name)
        if value is not None:
            try:
                value = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
            except ValueError:
                raise InputError(f"--{name.replace('_', '-')}: '{getattr(options, name)}' is not a list of numbers") from None
            put(name, tuple(value) if value or name != "input_range" else None)


def _check_choices(options: Options) -> None:
    for item in dataclasses.fields(options):
        choices = item.metadata["choices"]
        value = getattr(options, item.name)
        if choices and value not in choices:
            raise InputError(f"{flags(item)[0]} must be one of {', '.join(choices)}, not '{value}'")


def _check_numbers(options: Options) -> None:
    if not all(math.isfinite(v) and v >= 0 for v in (options.lambda1, options.lambda2)):
        raise InputError("--lambda1 and --lambda2 must be finite and non-negative")
    if options.samples < 2:
        raise InputError("--samples must be at least 2")
    if not 0 <= options.seed < 2**63:
        raise InputError("--seed must be between 0 and 2^63 - 1")
    if options.check_batch < 1:
        raise InputError("--check-batch must be at least 1")
    if options.target_bits is not None and not (
            math.isfinite(options.target_bits) and min(WIDTHS) <= options.target_bits <= max(WIDTHS)):
        raise InputError(f"--target-bits must be between {min(WIDTHS)} and {max(WIDTHS)}")
    if not options.providers:
        raise InputError("--providers names no execution provider")
    if options.protect is not None and not math.isfinite(options.protect):
        raise InputError("--protect takes a finite number of dB or 'off'")
    if options.min_agreement is not None and not 0 <= options.min_agreement <= 100:
        raise InputError("--min-agreement must be a percentage between 0 and 100")
    if not all(math.isfinite(v) for v in options.input_mean + options.input_std + (options.input_range or ())):
        raise InputError("--input-mean, --input-std and --input-range take finite numbers")
    if any(v <= 0 for v in options.input_std):
        raise InputError("--input-std must be positive")
    if options.input_range is not None and (len(options.input_range) != 2 or options.input_range[0] >= options.input_range[1]):
        raise InputError("--input-range takes LO,HI with LO < HI")
    if options.input_range is not None and (options.input_mean or options.input_std):
        raise InputError("--input-range and --input-mean/--input-std exclude each other")


def _check_combinations(options: Options) -> None:
    if options.target_bits is not None and options.scheme is not None:
        raise InputError("--scheme and --target-bits exclude each other: --target-bits chooses the widths")
    if options.target_bits is not None and options.format != "qdq":
        raise InputError("--target-bits needs --format qdq (the budget is stored bits)")
    if options.activations != "none" and options.storage == "exact":
        raise InputError("--activations needs --storage int8 or portable (or auto): onnxruntime's integer kernels, which "
                         "quantized activations select, take no INT2/UINT2 weights")
    if options.placement == "consumer" and (options.format == "qdq" or options.relu6 == "pair"
                                            or options.refine not in ("auto", "none")):
        raise InputError("--placement consumer needs --format float, runs no refinement (--refine none) and "
                         "refuses --relu6 pair (c on the consumer would move the clip point)")


DISTILL_MACS = 2.5e8
"""The largest classifier without BatchNorm statistics that ``--synthetic auto`` distils: each step is a
forward and a backward pass of the batch, and a 0.125 GMAC CIFAR ResNet-56 takes about half a minute on
two cores, a 0.4 GMAC EfficientNet-Lite0 at 224 x 224 about eight minutes for no gain (README)."""


@dataclass(frozen=True)
class Plan:
    """The options as they run on one model: every ``auto`` resolved, and ``decisions`` saying how."""

    options: Options
    facts: ModelFacts
    scheme: Scheme | None
    """None under --target-bits."""
    synthetic: str | None
    """The synthetic inputs made, None when nothing needs them or the model cannot take them."""
    refine: str
    ternary_threshold: str
    storage: str = "exact"
    """exact, portable or int8 (``--storage auto`` resolved)."""
    protect: bool = False
    """Whether the pairs are probed and raised (``--protect`` under a LOW < HIGH scheme, with inputs)."""
    feedback: bool = False
    """Whether the codes are re-rounded with error feedback (``--error-feedback`` resolved, with inputs)."""
    scale_block: int = 0
    """Weights per scale in the layers ``plan.scale_block`` admits (``--scale-block`` resolved); 0: none."""
    decisions: tuple[str, ...] = ()

    @property
    def needs_inputs(self) -> bool:
        return self.synthetic is not None

    def grid(self, bits: int) -> str:
        """The grid layers at ``bits`` are first quantized on: ``--kbit-grid`` (DoReFa's for auto, until
        ``fit_codes`` chooses), but integer for 8-bit layers under ``--activations``: integer kernels read
        int8, which holds integer codes (up to 127), not DoReFa's (odd, up to 255)."""
        return self.grids(bits)[0]

    def grids(self, bits: int) -> tuple[str, ...]:
        """Every grid a layer at ``bits`` may end on: ``--kbit-grid auto`` chooses among both."""
        if self.options.activations != "none" and bits == 8:
            return ("integer",)
        return ("dorefa", "integer") if self.options.kbit_grid == "auto" else (self.options.kbit_grid,)

    def matches_variance(self, bits: int) -> bool:
        """Whether statistics matching rescales a layer at ``bits`` to the float model's variance, not only its
        mean: on noise only ternary layers, whose alpha (Eq. 4) biases every channel's gain on any input (README,
        "Models without BatchNorm statistics")."""
        return self.synthetic == "distill" or bits == 2

    @property
    def fits_output(self) -> bool:
        """Whether the k-bit grids or ranges are chosen by output error on the synthetic inputs (``fit_codes``)."""
        return self.needs_inputs and (self.options.kbit_grid == "auto" or self.options.kbit_range == "output")

    @property
    def kbit_range(self) -> str:
        """The range the quantizer starts from: ``--kbit-range``, max for output (``fit_codes`` chooses)."""
        return "max" if self.options.kbit_range == "output" else self.options.kbit_range

    def without_distillation(self, reason: str) -> Plan:
        """The plan once distillation, chosen by ``--synthetic auto``, turned out impossible: the inputs
        ``undistilled`` says, and every other ``auto`` resolved again for them."""
        kind = undistilled(self.facts)
        plan = resolve(dataclasses.replace(self.options, synthetic=kind), self.facts)
        used = SYNTHETIC_KINDS[kind].replace("-", " ")
        note = f"distillation not possible ({reason}); used {used} inputs, refinement {plan.refine}"
        return dataclasses.replace(plan, decisions=(note,) + plan.decisions)  # resolved again: its notes replace ours


def resolve(options: Options, facts: ModelFacts) -> Plan:
    """The ``auto`` values for this model, in order: synthetic inputs, then the refinement (none when the
    model cannot take synthetic inputs), then the ternary threshold (each rests on the one before)."""
    decisions = []
    synthetic = options.synthetic
    if synthetic == "auto":
        small = facts.classifier and facts.macs is not None and facts.macs <= DISTILL_MACS
        synthetic = "distill" if facts.has_batchnorm or small else undistilled(facts)
        if not facts.has_batchnorm and facts.classifier and not small:
            size = f"{facts.macs / 1e9:.2f} GMAC per input" if facts.macs else "unknown size"
            decisions.append(f"no BatchNorm statistics: pink noise rather than distillation, which for a classifier "
                             f"of {size} may take many minutes (--synthetic distill runs it)")
    decisions = decisions if options.refine in ("auto", "stats", "refit") or options.target_bits else []
    refine = options.refine
    if refine == "auto":
        # least squares on noise hurts (README, "Results"), and so it did on inputs distilled without BatchNorm
        # statistics (README, "Models without BatchNorm statistics"); refinement needs producer placement
        refit = synthetic == "distill" and facts.has_batchnorm
        refine = "none" if options.placement == "consumer" else "refit" if refit else "stats"
    scheme = options.scheme or (Scheme.parse(DEFAULT_SCHEME) if options.target_bits is None else None)
    protecting = options.protect is not None and scheme is not None and scheme.low < scheme.high
    refining = refine in ("stats", "refit")
    activating = options.activations != "none"
    if protecting and not (refining or activating or options.target_bits) and options.synthetic == "auto":
        synthetic = "pink"  # only the pair probe reads them: distillation would cost more than it informs
    feeding = options.error_feedback == "on" or (options.error_feedback == "auto" and (refine == "refit" or facts.tokens))
    fitting = options.kbit_grid == "auto" or options.kbit_range == "output"
    wanted = refining or options.target_bits is not None or protecting or activating or feeding or fitting
    if wanted and facts.obstacle:
        for needs, flag in ((options.target_bits is not None, "--target-bits"), (activating, "--activations")):
            if needs:
                raise InputError(f"{flag} needs synthetic inputs: {facts.obstacle}")
        decisions += [f"refinement skipped: {facts.obstacle}"] * refining
        decisions += [f"pairs not protected: {facts.obstacle}"] * protecting
        decisions += [f"no error feedback: {facts.obstacle}"] * (options.error_feedback == "on")
        decisions += [f"k-bit grid and range not fitted to outputs (dorefa, max): {facts.obstacle}"] * fitting
        refine, wanted, protecting, feeding = ("none" if refining else refine), False, False, False
    ternary_threshold = options.ternary_threshold
    if ternary_threshold == "auto":
        # with refit each consumer is re-solved against the float outputs, so the smaller weight error of
        # the least-squares threshold carries through; it scored higher there and lower under stats
        ternary_threshold = "optimal" if refine == "refit" else "twn"
    storage = options.storage if options.storage != "auto" else "int8" if activating else "exact"
    block = options.scale_block if options.scale_block != "auto" else TOKEN_BLOCK if facts.tokens and not activating else 0
    if facts.tokens:
        auto = [f"a scale per {block} weights"] * (options.scale_block == "auto" and block > 0) + \
            ["error feedback"] * (options.error_feedback == "auto" and feeding) + \
            ["dead-leaves inputs"] * (synthetic == "leaves" and options.synthetic == "auto" and wanted)
        decisions += [f"transformer (MatMuls over tokens): {', '.join(auto)}"] * bool(auto)
    return Plan(options, facts, scheme, synthetic if wanted else None, refine, ternary_threshold, storage,
                protecting, feeding, block, tuple(decisions))
