"""``dfmpc-onnx IN.onnx OUT.onnx --scheme 2/6``: a thin shell over ``dfmpc_onnx.quantize_file``.

Exit statuses: 0 success, 2 bad input or usage, 3 the quantized model failed
the onnxruntime check, 1 an internal error (a bug: please report it).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from . import __version__
from .api import quantize_file
from .errors import CheckError, InputError, first_line
from .report import Report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfmpc-onnx",
        description="Data-free mixed-precision compensation: rewrite a float ONNX CNN with ternary/low-bit "
                    "producer layers compensated by higher-bit consumer layers. No data, no fine-tuning.")
    parser.add_argument("input", type=Path, help="float ONNX model")
    parser.add_argument("output", type=Path, help="where to write the quantized model (never the input)")
    parser.add_argument("--scheme", default="2/6",
                        help="LOW/HIGH bit widths; LOW=2 is ternary (Eqs. 3-4), other widths DoReFa (Eq. 6). "
                             "Default 2/6")
    parser.add_argument("--target-bits", type=float, metavar="B",
                        help="instead of --scheme's two widths, choose 2/4/6/8 bits per pair and per unpaired layer "
                             "for an average of at most B stored bits per quantized weight, by output agreement "
                             "with the float model on the synthetic inputs (inference only, no data)")
    parser.add_argument("--format", choices=("qdq", "float"), default="qdq",
                        help="qdq: integer weights + DequantizeLinear (default); float: dequantized float weights")
    parser.add_argument("--granularity", choices=("auto", "tensor", "channel"), default="auto",
                        help="quantizer scales per tensor (the paper) or per output channel; auto (default): per "
                             "tensor for ternary layers, per channel for k-bit layers")
    parser.add_argument("--ternary-threshold", choices=("auto", "twn", "optimal"), default="auto",
                        help="twn: Delta = 0.7 mean|W| (Eq. 4); optimal: the exact least-squares threshold; "
                             "auto (default): optimal with --refine refit, else twn")
    parser.add_argument("--kbit-range", choices=("max", "mse"), default="max",
                        help="M of the k-bit quantizer (Eq. 6): max|W| (the paper, default) or the clipped range "
                             "with the least squared error")
    parser.add_argument("--lambda1", type=float, default=0.5, help="weight of the bias term (default 0.5)")
    parser.add_argument("--lambda2", type=float, default=0.0, help="weight of the ||c||^2 term (default 0)")
    parser.add_argument("--no-compensation", dest="compensate", action="store_false",
                        help="plain rounding, c = 1 ('Original' in the paper)")
    parser.add_argument("--placement", choices=("producer", "consumer"), default="producer",
                        help="where c is applied; consumer (Eq. 7 literally) needs --format float")
    parser.add_argument("--refine", choices=("auto", "none", "bias", "stats", "refit"), default="auto",
                        help="after compensation: stats matches each quantized conv's per-channel output mean and "
                             "variance to the float model's on synthetic inputs; refit first re-solves each pair "
                             "consumer by least squares on them (use with distilled inputs); bias subtracts the "
                             "expected output error from BatchNorm statistics; none is the paper alone. "
                             "auto (default): refit with distilled inputs, stats with noise")
    parser.add_argument("--synthetic", choices=("auto", "pink", "noise", "distill"), default="auto",
                        help="synthetic inputs: 1/f^2 pink noise, white noise, or pink noise optimised so that the "
                             "model's BatchNorm layers see their running statistics (needs PyTorch). auto (default): "
                             "distill when PyTorch is installed and the model has BatchNorm statistics, else pink")
    parser.add_argument("--samples", type=int, default=64, help="number of synthetic inputs (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (default 0)")
    parser.add_argument("--relu6", choices=("refuse", "pair", "relu"), default="refuse",
                        help="a Clip(0, 6) between producer and consumer: refuse the pair (default); pair across it "
                             "(exact, c sits on the producer); relu: first replace each Clip that its input "
                             "statistics say is rarely reached by Relu (a model change, reported)")
    parser.add_argument("--keep-first", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the first layer out of pairs, at HIGH bits (default on)")
    parser.add_argument("--keep-last", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the last layer (classifier) out of pairs, at HIGH bits (default on)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE_NAME",
                        help="leave these Conv/Gemm/MatMul nodes in float")
    parser.add_argument("--external-data", action="store_true", default=None,
                        help="store the weights in OUTPUT.data beside the model (automatic above 2 GiB)")
    parser.add_argument("--keep-failed", action="store_true",
                        help="write the output even when it fails the onnxruntime check (exit status still 3)")
    parser.add_argument("--report", type=Path, metavar="PATH.json", help="also write the full report as JSON")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the onnxruntime comparison of the float and quantized model")
    parser.add_argument("--providers", default="cpu",
                        help="comma-separated onnxruntime providers for the check: cpu (default), cuda")
    parser.add_argument("--check-batch", type=int, default=1, help="batch size for dynamic batch dims in the check")
    parser.add_argument("--input-shape", action="append", default=[], metavar="[NAME:]D0,D1,...",
                        help="shape for an input with dynamic dims, used by the check and the synthetic inputs "
                             "(the output keeps the dynamic dims); NAME: is needed for models with several inputs; "
                             "repeatable")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="also print the time of each stage")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        if args.report is not None and args.report.resolve().parent.is_dir() is False:
            raise InputError(f"{args.report}: report folder does not exist")
        report = quantize_file(
            args.input, args.output, scheme=args.scheme, format=args.format, granularity=args.granularity,
            ternary_threshold=args.ternary_threshold, kbit_range=args.kbit_range,
            lambda1=args.lambda1, lambda2=args.lambda2, compensate=args.compensate, placement=args.placement,
            refine=args.refine, synthetic=args.synthetic, samples=args.samples, seed=args.seed,
            relu6=args.relu6, target_bits=args.target_bits, keep_first=args.keep_first, keep_last=args.keep_last, exclude=args.exclude, check=args.check,
            providers=[p.strip() for p in args.providers.split(",") if p.strip()], check_batch=args.check_batch,
            input_shapes=parse_input_shapes(args.input_shape),
            external_data=args.external_data, keep_failed=args.keep_failed, log=log)
    except (InputError, CheckError) as err:
        kept = " (written anyway: --keep-failed)" if isinstance(err, CheckError) and args.output.exists() \
            and args.keep_failed else ""
        print(f"dfmpc-onnx: error: {err}{kept}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("dfmpc-onnx: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: one line, the traceback only when asked
        if args.verbose:
            traceback.print_exc()
        print(f"dfmpc-onnx: internal error: {type(err).__name__}: {first_line(err)} "
              "(no output written; rerun with -v for the traceback)", file=sys.stderr)
        return 1
    if args.report is not None:
        _write_report(report, args.report)
    if not args.quiet:
        print(report.format_table())
        print()
        print(report.format_summary())
        if args.verbose:
            print("stage times: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in report.timings.items()))
        print(f"wrote {args.output}")
    return 0


def parse_input_shapes(specs: list[str]) -> dict[str | None, tuple[int, ...]]:
    """``--input-shape`` values, "1,3,224,224" or "input:1,3,224,224", as {name or None: dims}."""
    shapes: dict[str | None, tuple[int, ...]] = {}
    for spec in specs:
        name, _, dims = spec.rpartition(":")
        try:
            shapes[name or None] = tuple(int(d) for d in dims.replace("x", ",").split(","))
        except ValueError:
            raise InputError(f"--input-shape: '{spec}' is not [NAME:]D0,D1,... with integer dims") from None
    return shapes


def _write_report(report: Report, path: Path) -> None:
    try:
        path.write_text(report.to_json() + "\n")
    except OSError as err:
        print(f"dfmpc-onnx: warning: cannot write report {path}: {err.strerror}", file=sys.stderr)
