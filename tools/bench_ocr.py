"""Text recogniser benchmark: the PaddleOCR PP-OCRv4 recogniser (Paddle2ONNX, opset 12, weights in
Constant nodes, dynamic height and width), float and quantized, on rendered text lines.

    python tools/bench_ocr.py --cache /work/cache/models --readme
    python tools/bench_ocr.py --cache /work/cache/models --runtimes --readme   # onnxruntime and OpenVINO

The model comes from PyPI ``rapidocr-onnxruntime`` 1.4.4 (Apache-2.0), read from a cache folder outside the
repository (``--cache``, $DFMPC_MODEL_CACHE, or ../cache/models); skipped when absent. The lines are seeded
random words and numbers drawn by Pillow's own font, preprocessed as rapidocr does (height 48, width
padded to 320, (x / 255 - 0.5) / 0.5); decoding is greedy CTC over the dictionary in the model's
metadata. Character accuracy is 1 - (edit distance / characters), over all lines.

``--runtimes`` scores instead the float model and the outputs a deployment engineer would pick for each
runtime (weight-only 4/8, 2/6 with ``--storage portable``, W4A8 with ``--activations 8``) in onnxruntime's
CPU provider and in OpenVINO's CPU plugin (default settings), at the tool's own input shape, and W8A8
calibrated at the shape rapidocr feeds it; and the same for the direction classifier of the same package
(``ch_ppocr_mobile_v2.0_cls``, opset 11, 0 or 180 degrees), scored on the lines, every other one turned.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import dfmpc_onnx
from bench_accuracy import ROOT, default_cache, publish

MODEL = "rapidocr_onnxruntime-1.4.4/ch_PP-OCRv4_rec_infer.onnx"
WORDS = ("model quantize data free mixed precision layer weight channel ternary bits compensation network "
         "image text line tensor graph export deploy device small fast accuracy check output input scale "
         "order river table window garden yellow silver market number pencil orange travel").split()
RUNS = (("default 4/8", dict(scheme="4/8")),
        ("4/8, --input-shape 3,48,320", dict(scheme="4/8", input_shapes={None: (3, 48, 320)})),
        ("default 2/6, --input-shape 3,48,320", dict(input_shapes={None: (3, 48, 320)})))
RUNTIME_RUNS = (("default 4/8", dict(scheme="4/8")), ("default 2/6, --storage portable", dict(storage="portable")),
                ("4/8 --activations 8 (W4A8), at the guessed 32 x 32", dict(scheme="4/8", activations="8")),
                ("8 --activations 8 (W8A8), --input-shape 3,48,320 --refine none --synthetic pink",
                 dict(scheme="8", activations="8", refine="none", synthetic="pink", input_shapes={None: (3, 48, 320)})))
"""At 48 x 320 the default synthetic inputs (distilled from the BatchNorm statistics) took over 15 minutes and
16 GB on two cores: the W8A8 row calibrates on pink noise."""
CLASSIFIER = "rapidocr_onnxruntime-1.4.4/ch_ppocr_mobile_v2.0_cls_infer.onnx"
CLS_SHAPE = {None: (3, 48, 192)}
"""rapidocr's cls_image_shape: at the size the tool would guess (224 x 224) its distillation takes many minutes."""
CLASSIFIER_RUNS = (("4/8, --input-shape 3,48,192", dict(scheme="4/8", input_shapes=CLS_SHAPE)),
                   ("2/6, --storage portable --input-shape 3,48,192", dict(storage="portable", input_shapes=CLS_SHAPE)),
                   ("4/8 --activations 8 (W4A8), --input-shape 3,48,192",
                    dict(scheme="4/8", activations="8", input_shapes=CLS_SHAPE)))
RUNTIMES = ("onnxruntime", "OpenVINO")


def render_lines(count: int, seed: int = 0, width: int = 320, turned: bool = False
                 ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``count`` lines of words and numbers, as rapidocr feeds its recogniser (N x 3 x 48 x ``width``),
    their texts, and, with ``turned``, every other line turned by 180 degrees (labels 1) as its direction
    classifier sees text read upside down (labels 0 for upright)."""
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(seed)
    images, texts, labels = [], [], []
    while len(images) < count:
        words = [str(rng.integers(0, 10000)) if rng.random() < 0.25 else str(rng.choice(WORDS))
                 for _ in range(rng.integers(2, 5) if width >= 320 else rng.integers(1, 3))]
        text = " ".join(words)
        font = ImageFont.load_default(size=int(rng.integers(22, 34)))
        left, top, right, bottom = font.getbbox(text)
        canvas = Image.new("RGB", (right + 8, bottom + 8), "white")
        ImageDraw.Draw(canvas).text((4, 4 - top // 2), text, fill=(0, 0, 0), font=font)
        scaled = int(round(canvas.width * 48 / canvas.height))
        if scaled > width:
            continue
        label = int(turned and len(images) % 2 == 1)
        canvas = canvas.rotate(180) if label else canvas
        line = np.zeros((48, width, 3), np.float32)
        line[:, :scaled] = (np.asarray(canvas.resize((scaled, 48)), np.float32) / 255 - 0.5) / 0.5
        images.append(line[:, :, ::-1].transpose(2, 0, 1))  # BGR, channels first, as rapidocr's cv2 pipeline
        texts.append(text)
        labels.append(label)
    return np.ascontiguousarray(np.stack(images)), texts, np.array(labels)


def decode(probabilities: np.ndarray, characters: list[str]) -> list[str]:
    """Greedy CTC: the argmax per position, repeats collapsed, blanks (index 0) dropped."""
    lines = []
    for best in probabilities.argmax(axis=-1):
        kept = [i for k, i in enumerate(best) if i != 0 and (k == 0 or i != best[k - 1])]
        lines.append("".join(characters[i] for i in kept))
    return lines


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def recogniser(path: Path, runtime: str):
    """A function from a batch of lines to the model's per-position probabilities, in ``runtime``."""
    if runtime == "onnxruntime":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch})[0]
    import openvino as ov
    compiled = ov.Core().compile_model(str(path), "CPU")
    return lambda batch: compiled(batch)[compiled.outputs[0]]


def character_accuracy(path: Path, images: np.ndarray, texts: list[str], runtime: str = "onnxruntime") -> float:
    metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    characters = ["blank"] + metadata["character"].splitlines() + [" "]
    run = recogniser(path, runtime)
    found = [line for start in range(0, len(images), 16) for line in decode(run(images[start:start + 16]), characters)]
    errors = sum(edit_distance(f, t) for f, t in zip(found, texts))
    return 100.0 * (1 - errors / sum(len(t) for t in texts))


def direction_accuracy(path: Path, images: np.ndarray, labels: np.ndarray, runtime: str = "onnxruntime") -> float:
    """Top-1 of the direction classifier (classes 0 and 180 degrees)."""
    run = recogniser(path, runtime)
    found = np.concatenate([run(images[start:start + 16]).argmax(-1) for start in range(0, len(images), 16)])
    return 100.0 * float(np.mean(found == labels))


def runtime_rows(model: str, source: Path, score, runs: tuple, workdir: Path) -> list[dict]:
    """``score(path, runtime)`` of the float model and of each of ``runs`` in each of ``RUNTIMES``."""
    results = []
    for label, options in (("float", None),) + runs:
        path = source
        row = dict(model=model, method=label, accuracy={})
        if options is not None:
            path = workdir / f"out{len(results)}.onnx"
            try:
                dfmpc_onnx.quantize_file(source, path, **options)
            except dfmpc_onnx.InputError as error:  # the tool refuses: say so in the table
                row["accuracy"] = {runtime: f"refused by the tool: {str(error)[:50]}" for runtime in RUNTIMES}
                print(row, flush=True)
                results.append(row)
                continue
        for runtime in RUNTIMES:
            try:
                row["accuracy"][runtime] = round(score(path, runtime), 2)
            except Exception as error:  # a runtime that refuses the file: say so in the table
                row["accuracy"][runtime] = f"fails: {str(error).splitlines()[0][:60]}"
        print(row, flush=True)
        results.append(row)
    return results


def runtime_table(results: list[dict]) -> str:
    lines = ["| model | output | " + " | ".join(f"accuracy, {r} (%)" for r in RUNTIMES) + " |",
             "|---|---|" + "---|" * len(RUNTIMES)]
    lines += [f"| {r['model']} | {r['method']} | " + " | ".join(str(r["accuracy"][k]) for k in RUNTIMES) + " |"
              for r in results]
    return "\n".join(lines)


def both_runtimes(cache: Path, count: int, workdir: Path) -> list[dict]:
    """The recogniser (character accuracy) and the direction classifier (top-1 of 0 / 180 degrees)."""
    images, texts, _ = render_lines(count)
    results = runtime_rows("PP-OCRv4 recogniser", cache / MODEL,
                           lambda path, runtime: character_accuracy(path, images, texts, runtime), RUNTIME_RUNS, workdir)
    classifier = cache / CLASSIFIER
    if classifier.exists():
        lines, _, labels = render_lines(count, seed=1, width=192, turned=True)
        results += runtime_rows("PP-OCR direction classifier", classifier,
                                lambda path, runtime: direction_accuracy(path, lines, labels, runtime),
                                CLASSIFIER_RUNS, workdir)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--runtimes", action="store_true", help="score the outputs in onnxruntime and OpenVINO")
    args = parser.parse_args()
    source = args.cache / MODEL
    if not source.exists():
        print(f"skipped: {source} is not in the cache", file=sys.stderr)
        return 0
    if args.runtimes:
        with tempfile.TemporaryDirectory() as workdir:
            results = both_runtimes(args.cache, args.lines, Path(workdir))
        publish(runtime_table(results), results, args.out, "ocr-runtimes", args.readme)
        return 0
    images, texts, _ = render_lines(args.lines)
    results = [dict(method="float", accuracy=character_accuracy(source, images, texts), seconds=None, agreement=None)]
    print(results[-1], flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        out = Path(workdir) / "out.onnx"
        for label, options in RUNS:
            start = time.perf_counter()
            report = dfmpc_onnx.quantize_file(source, out, **options)
            fidelity = report.fidelity
            results.append(dict(method=label, accuracy=character_accuracy(out, images, texts),
                                seconds=round(time.perf_counter() - start, 1),
                                agreement=None if fidelity is None else fidelity.top1_agreement,
                                shape=next((n for n in report.notes if "is dynamic" in n), None)))
            print(results[-1], flush=True)
    lines = ["| model | method | character accuracy (%) | top-1 agreement on synthetic inputs (%) | tool time (s) |",
             "|---|---|---|---|---|"]
    for r in results:
        agreement = "-" if r["agreement"] is None else f"{r['agreement']:.1f}"
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| PP-OCRv4 recogniser | {r['method']} | {r['accuracy']:.2f} | {agreement} | {seconds} |")
    publish("\n".join(lines), results, args.out, "ocr", args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
