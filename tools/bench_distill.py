"""Distillation benchmark: what each setting of the onnxruntime distillation costs and buys.

    python tools/bench_distill.py --models cifar10_resnet56 --configs steps=300 steps=150,schedule=cosine
    python tools/bench_distill.py --folded --configs objective=logits,tv=1e-4 refine=stats,synthetic=pink
    python tools/bench_distill.py --whole --readme   # the default, and the whole command's time

For each model (from models/, or ../shared/models; with --folded, a copy with its BatchNorm folded by the
tool's own pass) it times 100 onnxruntime forward passes of the float model on a batch of 64 (the
yardstick of the speed target) and one forward pass of the distillation batch, then for each setting
(comma-separated KEY=VALUE: steps, rate, schedule, samples, objective, tv, l2, cutoff for
``distill_inputs``; refine, synthetic for the tool; "synthetic=pink" skips distillation) and seed it
makes the inputs, reports the time per step against that forward pass, the final loss, and the top-1 of
the 2/6 model refined on those inputs (exact846, jpeg10k); with --whole, also the whole default
command's wall time against the yardstick.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

import dfmpc_onnx
from bench_accuracy import DATASETS, ROOT, SHARED, load_cifar, publish, top1
from dfmpc_onnx.distill import STEPS, Priors, batchnorm_loss, distill_inputs, with_input_shape
from dfmpc_onnx.fold import fold_batchnorm
from dfmpc_onnx.gradient_rules import RULES
from dfmpc_onnx.gradients import gradient_model, prepare_forward
from dfmpc_onnx.graph import import_graph
from dfmpc_onnx.inputs import synthesis_shape
from dfmpc_onnx.load import load_model, load_whole_model
from dfmpc_onnx.options import Options
from dfmpc_onnx.synthetic import model_domain, standard_noise
from dfmpc_onnx.runtime import graph_session


def model_path(name: str) -> Path:
    local = ROOT / "models" / f"{name}.onnx"
    return local if local.exists() else SHARED / "models" / f"{name}.onnx"


def forward_seconds(path: Path, batch: int, repeat: int) -> float:
    """Median wall time of one onnxruntime forward pass of the float model on a batch of ``batch``."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal([batch] + list(spec.shape[1:])).astype(np.float32)
    session.run(None, {spec.name: x})
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, {spec.name: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def final_loss(model, x: np.ndarray) -> float | None:
    """The BatchNorm-statistics loss of ``x`` (None for a model without BatchNorm)."""
    forward = prepare_forward(with_input_shape(model, len(x)))
    if not any(node.op_type == "BatchNormalization" for node in forward.graph.node):
        return None
    session = graph_session(gradient_model(forward, batchnorm_loss, [], RULES), forward, "benchmark")
    return float(session.run(["loss"], {forward.graph.input[0].name: x})[0])


def folded_copy(path: Path, workdir: Path) -> Path:
    """The model at ``path`` with its BatchNormalization folded into the convs by the tool's own pass."""
    graph = import_graph(load_whole_model(path))
    fold_batchnorm(graph)
    out = workdir / f"{path.stem}_folded.onnx"
    onnx.save(gs.export_onnx(graph.cleanup().toposort()), out)
    return out


def start_noise(path: Path, samples: int, seed: int) -> tuple[np.ndarray, object]:
    """Pink noise in the model's input domain, as the tool starts its distillation from, and the domain."""
    skeleton, weights = load_model(path)
    options = Options(samples=samples, seed=seed)
    domain = model_domain(skeleton, weights, {}, options)
    shape = synthesis_shape(skeleton, {})
    return domain.apply(standard_noise(shape, "pink", samples, seed, domain.channel_axis)), domain


def parse_config(text: str) -> tuple[dict, dict]:
    """"steps=150,rate=0.2,refine=stats" as (``distill_inputs`` keywords, ``quantize`` keywords)."""
    distill, tool = {}, {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key in ("refine", "synthetic"):
            tool[key] = value
        elif key in ("tv", "l2", "cutoff"):
            distill.setdefault("priors", {})[key] = float(value)
        elif key in ("steps", "samples"):
            distill[key] = int(value)
        elif key == "rate":
            distill["learning_rate"] = float(value)
        else:
            distill[key] = value
    if "priors" in distill:
        distill["priors"] = Priors(**distill["priors"])
    return distill, tool


def run(models: list[str], configs: list[str], datasets: list[str], whole: bool, workdir: Path,
        seeds: list[int], folded: bool) -> list[dict]:
    data = {name: load_cifar(name) for name in datasets}
    results = []
    for name in models:
        path = folded_copy(model_path(name), workdir) if folded else model_path(name)
        model = load_whole_model(path)
        yardstick = 100 * forward_seconds(path, 64, 20)
        for config, seed in [(config, seed) for config in configs for seed in seeds]:
            settings, tool = parse_config(config)
            samples, steps = settings.pop("samples", 64), settings.get("steps", STEPS)
            start = time.perf_counter()
            x = None
            if tool.get("synthetic") != "pink":
                noise, domain = start_noise(path, samples, seed)
                x = distill_inputs(model, noise, seed, domain=domain, **settings)
                tool = {"synthetic": "distill", "synthetic_inputs": x, **tool}
            seconds = time.perf_counter() - start
            out = workdir / "out.onnx"
            dfmpc_onnx.quantize_file(path, out, scheme="2/6", check=False, seed=seed, **tool)
            step = forward_seconds(path, samples, 5)
            row = dict(model=name + (" (BN folded)" if folded else ""), config=config, seed=seed,
                       seconds=round(seconds, 1), step_ms=round(1000 * seconds / max(steps, 1), 1),
                       forward_ms=round(1000 * step, 1), loss=None if x is None else final_loss(model, x),
                       yardstick=round(yardstick, 1), top1={d: top1(out, *data[d]) for d in datasets})
            if whole:
                start = time.perf_counter()
                dfmpc_onnx.quantize_file(path, out, scheme="2/6", seed=seed)
                row["whole"] = round(time.perf_counter() - start, 1)
            print(row, flush=True)
            results.append(row)
    return results


def markdown(results: list[dict], datasets: list[str]) -> str:
    head = " | ".join(f"top-1 {name} (%)" for name in datasets)
    lines = [f"| model | setting | seed | distill (s) | per step (ms) | forward of the batch (ms) "
             f"| final loss | {head} | whole command (s) | 100 forward passes, batch 64 (s) |",
             "|---|---|---|---|---|---|---|" + "---|" * len(datasets) + "---|---|"]
    for r in results:
        scores = " | ".join(f"{r['top1'][d]:.2f}" for d in datasets)
        loss = "-" if r["loss"] is None else f"{r['loss']:.2f}"
        lines.append(f"| {r['model']} | {r['config'] or 'default'} | {r['seed']} | {r['seconds']:.1f} | {r['step_ms']:.0f} "
                     f"| {r['forward_ms']:.0f} | {loss} | {scores} | {r.get('whole', '-')} | {r['yardstick']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar10_resnet20", "cifar10_resnet56"])
    parser.add_argument("--configs", nargs="+", default=[""], help="settings (default: the tool's defaults)")
    parser.add_argument("--folded", action="store_true", help="BN-folded copies of the models")
    parser.add_argument("--data", nargs="+", choices=sorted(DATASETS), default=["exact846", "jpeg10k"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of the synthetic inputs (default 0)")
    parser.add_argument("--whole", action="store_true", help="also time the whole default command")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--key", default="distill", help="the README markers to write between (default distill)")
    args = parser.parse_args()
    if not all((SHARED / "data" / DATASETS[d]).exists() for d in args.data):
        print(f"skipped: {SHARED}/data lacks the CIFAR-10 test images", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        results = run(args.models, args.configs, args.data, args.whole, Path(workdir), args.seeds, args.folded)
    publish(markdown(results, args.data), results, args.out, args.key, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
