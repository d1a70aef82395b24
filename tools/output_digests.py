"""SHA-256 of the tool's output for a fixed list of models and options: run it before and after a change
that should not alter outputs, and diff the two listings.

    python tools/output_digests.py > before.txt   # at one commit
    python tools/output_digests.py > after.txt    # at another
    diff before.txt after.txt

The cases cover every option that changes the written weights (schemes, formats, granularity, ternary
threshold, k-bit range, lambdas, compensation, placement, each refinement, --target-bits, --relu6) on
the models in models/ and the pretrained models (the ResNet-20 in models/, the others from ../shared
when it is present). Refit runs on given
pink-noise inputs so that no case needs PyTorch.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import onnx

import dfmpc_onnx
from dfmpc_onnx.maths.noise import noise_batch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"

PAPER = dict(refine="none", granularity="tensor", protect="off")
CASES = {
    "paper 2/6": dict(scheme="2/6", **PAPER),
    "original 2/6": dict(scheme="2/6", compensate=False, refine="none"),
    "paper 2/6 float": dict(scheme="2/6", format="float", **PAPER),
    "paper 2/6 float consumer": dict(scheme="2/6", format="float", placement="consumer", **PAPER),
    "bias 2/6": dict(scheme="2/6", refine="bias"),
    "stats noise 2/6": dict(scheme="2/6", refine="stats", synthetic="noise"),
    "default pink 2/6": dict(scheme="2/6", synthetic="pink"),
    "optimal pink 2/6": dict(scheme="2/6", ternary_threshold="optimal", synthetic="pink"),
    "refit given-pink 2/6": dict(scheme="2/6", refine="refit", synthetic="given"),
    "default pink 3/6 mse lambda2": dict(scheme="3/6", synthetic="pink", kbit_range="mse", lambda2=0.1),
    "default pink 4/8 channel": dict(scheme="4/8", synthetic="pink", granularity="channel"),
    "default pink target 3": dict(target_bits=3.0, synthetic="pink"),
}
SHARED_CASES = {
    "cifar10_resnet20": list(CASES),
    "cifar10_resnet56": ["paper 2/6", "default pink 2/6", "refit given-pink 2/6", "default pink target 3"],
    "imagenet_efficientnet_lite0": ["default pink 4/8 relu6 refuse", "default pink 4/8 relu6 relu",
                                    "default pink 4/8 relu6 pair"],
}
LITE0_CASES = {f"default pink 4/8 relu6 {choice}": dict(scheme="4/8", synthetic="pink", relu6=choice)
               for choice in ("refuse", "relu", "pair")}


def digest(source: Path, options: dict, folder: Path) -> str:
    options = dict(options)
    if options.get("synthetic") == "given":
        model = onnx.load(source, load_external_data=False)
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        options["synthetic_inputs"] = noise_batch([1] + dims[1:], "pink", 64, 0)
        del options["synthetic"]
    out = folder / "out.onnx"
    try:
        dfmpc_onnx.quantize_file(source, out, check=False, **options)
    except dfmpc_onnx.InputError as err:
        return f"refused: {err}"
    return hashlib.sha256(out.read_bytes()).hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the models in models/ only")
    args = parser.parse_args()
    zoo = [path for path in sorted((ROOT / "models").glob("*.onnx")) if path.stem not in SHARED_CASES]
    jobs = [(path, name) for path in zoo for name in CASES]
    if not args.quick:
        places = {model: ROOT / "models" / f"{model}.onnx" for model in SHARED_CASES}
        places = {model: path if path.exists() else SHARED / f"{model}.onnx" for model, path in places.items()}
        jobs += [(places[model], name) for model, names in SHARED_CASES.items() for name in names
                 if places[model].exists()]
    with tempfile.TemporaryDirectory() as folder:
        for path, name in jobs:
            options = {**CASES, **LITE0_CASES}[name]
            print(f"{path.stem:32s} {name:32s} {digest(path, options, Path(folder))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
