"""``dfmpc-onnx IN.onnx OUT.onnx --scheme 2/6``: a thin shell over ``dfmpc_onnx.quantize_file``.

Every flag is generated from the fields of ``options.Options`` and ``options.OutputOptions``, which hold
their defaults, choices, help and validation. Exit statuses: 0 success, 2 bad input or usage, 3 the
quantized model failed the onnxruntime check, 1 an internal error (a bug: please report it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from pathlib import Path

from . import __version__
from .api import quantize_file
from .errors import CheckError, InputError, InternalError, first_line
from .options import Options, OutputOptions, flags
from .progress import Console

ACTIONS = {"negate": "store_false", "switch": "store_true", "toggle": argparse.BooleanOptionalAction,
           "repeat": "append"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfmpc-onnx",
        description="Data-free mixed-precision compensation: rewrite a float ONNX CNN with ternary/low-bit "
                    "producer layers compensated by higher-bit consumer layers. No data, no fine-tuning.")
    parser.add_argument("input", type=Path, help="float ONNX model")
    parser.add_argument("output", type=Path, help="where to write the quantized model (never the input)")
    for kind in (Options, OutputOptions):
        for item in dataclasses.fields(kind):
            add_option(parser, item)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def add_option(parser: argparse.ArgumentParser, item: dataclasses.Field) -> None:
    """The flag of one option field, as its metadata says (``options.option``); an absent flag leaves the
    field's default to ``Options``."""
    meta, cli = item.metadata, item.metadata["cli"]
    shown = meta["shown"] or item.default
    if isinstance(shown, bool):
        shown = "on" if shown else "off"
    elif isinstance(shown, tuple):
        shown = ",".join(shown)
    default = f" (default {shown})" if cli in ("value", "toggle", "csv") and shown not in (None, ()) else ""
    settings = dict(dest=item.name, default=argparse.SUPPRESS, help=meta["help"] + default)
    if cli in ACTIONS:
        settings["action"] = ACTIONS[cli]
    if cli == "csv":
        settings["type"] = str
    if cli in ("value", "many", "csv", "repeat"):
        settings["metavar"] = meta["metavar"] or (item.name.upper() if not meta["choices"] else None)
    if cli == "many":
        settings["nargs"] = "+"
    if cli == "value":
        settings["choices"] = meta["choices"]
        if meta["parse"] is None and item.default is not None and not isinstance(item.default, str):
            settings["type"] = type(item.default)
    parser.add_argument(*flags(item), **settings)


def parse_options(args: dict) -> tuple[Options, OutputOptions]:
    """The parsed flags as ``Options`` and ``OutputOptions`` (validated there); the text of flags with a parser
    is parsed here, so that a bad value is an ``InputError`` (one line, exit status 2), not argparse's traceback."""
    for kind in (Options, OutputOptions):
        for item in dataclasses.fields(kind):
            parse, repeat = item.metadata["parse"], item.metadata["cli"] == "repeat"
            if parse is None or item.name not in args:
                continue
            texts = args[item.name] if repeat else [args[item.name]]
            try:
                values = tuple(parse(text) for text in texts)
            except (TypeError, ValueError):
                raise InputError(f"{flags(item)[0]}: '{', '.join(map(str, texts))}' is not a valid value") from None
            args[item.name] = values if repeat else values[0]
    output_names = {item.name for item in dataclasses.fields(OutputOptions)}
    output = OutputOptions(**{name: value for name, value in args.items() if name in output_names})
    return Options(**{name: value for name, value in args.items() if name not in output_names}), output


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    source, destination = args.pop("input"), args.pop("output")
    verbose, quiet = args.get("verbose", False), args.get("quiet", False)
    try:
        options, output = parse_options(args)
        report = quantize_file(source, destination, options, output,
                               console=Console(None if quiet else sys.stderr))
    except (InputError, CheckError) as err:
        kept = " (written anyway: --keep-failed)" if isinstance(err, CheckError) and destination.exists() \
            and args.get("keep_failed") else ""
        print(f"dfmpc-onnx: error: {err}{kept}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("dfmpc-onnx: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as err:  # a bug (InternalError, or anything unforeseen): one line, the traceback when asked
        if verbose:
            traceback.print_exc()
        message = str(err) if isinstance(err, InternalError) else f"{type(err).__name__}: {first_line(err)}"
        print(f"dfmpc-onnx: internal error: {message} (no output written; rerun with -v for the traceback)",
              file=sys.stderr)
        return 1
    if not quiet:
        for warning in report.warnings():
            print(f"dfmpc-onnx: warning: {warning}", file=sys.stderr)
        print(report.format_table())
        print()
        print(report.format_summary())
        if verbose:
            print("stage times: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in report.timings.items()))
        print(f"wrote {destination}")
    return 0
