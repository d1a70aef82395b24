"""Peak memory of dfmpc-onnx on a synthetic model with about 1 GiB of weights, as a multiple of the weight bytes.

    python tools/bench_memory.py [--gib 1.0] [--folder DIR] [--external-data] [--keep]

Makes the model with tools/make_large_model.py (1024-channel 3x3 conv chain,
BatchNormalization kept, random weights), then runs the command line in a
child process for each configuration and reads the child's peak resident set
size from the operating system (``os.wait4``). The model maker runs in its
own process, so its memory is not counted. ``--external-data`` makes and
writes the model with external data (needed above 2 GiB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

CONFIGURATIONS = {
    "quantize + onnxruntime check": ["--refine", "none", "--protect", "off"],
    "quantize, --no-check": ["--refine", "none", "--protect", "off", "--no-check"],
}


def weight_bytes(path: Path) -> int:
    """Bytes of float weights in the model's initializers, without loading the external data."""
    model = onnx.load_model(path, load_external_data=False)
    return sum(4 * math.prod(t.dims) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def peak_rss(command: list[str]) -> tuple[int, int, float]:
    """(exit status, peak resident set size in bytes, wall seconds) of ``command`` run as a child."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.stderr.write(child.stderr.read().decode(errors="replace"))
    child.stderr.close()
    return child.returncode, usage.ru_maxrss * 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="weight size of the synthetic model (default 1.0)")
    parser.add_argument("--folder", type=Path, help="where to put the models (default: a temporary folder)")
    parser.add_argument("--external-data", action="store_true", help="input and output with external data")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dfmpc-mem-", dir=args.folder) as folder:
        model = Path(folder, "large.onnx")
        maker = [sys.executable, str(Path(__file__).with_name("make_large_model.py")), str(model), "--gib",
                 str(args.gib)] + (["--external-data"] if args.external_data else [])
        subprocess.run(maker, check=True, stdout=subprocess.DEVNULL)
        weights = weight_bytes(model)
        rows = []
        print(f"model: {weights / 2**30:.3f} GiB of float weights, file {model.stat().st_size:,} bytes"
              + (" + external data" if args.external_data else ""))
        print("| run | peak RSS (GiB) | x weight bytes | wall (s) |")
        print("|---|---|---|---|")
        for label, options in CONFIGURATIONS.items():
            out = Path(folder, "out.onnx")
            command = [sys.executable, "-m", "dfmpc_onnx", str(model), str(out), "-q", *options]
            if args.external_data:
                command.append("--external-data")
            status, peak, seconds = peak_rss(command)
            if status != 0:
                print(f"{label}: exit status {status}", file=sys.stderr)
                return 1
            for path in Path(folder).glob("out.onnx*"):
                path.unlink()
            rows.append({"run": label, "weight_bytes": weights, "peak_rss_bytes": peak,
                         "ratio": peak / weights, "seconds": seconds})
            print(f"| {label} | {peak / 2**30:.2f} | {peak / weights:.2f} | {seconds:.1f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
