"""The README's table of options, generated from ``dfmpc_onnx/options.py`` (the one place each option is
defined), so that the two cannot disagree.

    python tools/options_table.py            # print it
    python tools/options_table.py --readme   # put it into README.md between its options markers
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from bench_accuracy import ROOT, replace_between_markers
from dfmpc_onnx.options import Options, OutputOptions, flags


def usage(item: dataclasses.Field) -> str:
    """The flag as a user types it: its names, and its value or choices."""
    meta, names = item.metadata, flags(item)
    if meta["cli"] == "toggle":
        return f"`{names[0]}/--no-{names[0][2:]}`"
    value = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else meta["metavar"] or item.name.upper()
    shown = " ".join(f"`{name}`" for name in names)
    if meta["cli"] in ("negate", "switch"):
        return shown
    return f"`{names[-1]} {value}`" + (" ..." if meta["cli"] == "many" else "")


def default(item: dataclasses.Field) -> str:
    value = item.metadata["shown"] or item.default
    if item.metadata["cli"] in ("negate", "switch"):
        return "off" if item.metadata["cli"] == "switch" else "on (the flag turns it off)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value in (None, ()):
        return "-"
    return ",".join(value) if isinstance(value, tuple) else str(value)


def table() -> str:
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for kind in (Options, OutputOptions):
        for item in dataclasses.fields(kind):
            text = item.metadata["help"].replace("|", "\\|")
            lines.append(f"| {usage(item)} | {default(item)} | {text} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    text = table()
    print(text)
    if args.readme:
        replace_between_markers(ROOT / "README.md", "options",
                                f"Generated from `dfmpc_onnx/options.py` by `python tools/options_table.py --readme`:\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
