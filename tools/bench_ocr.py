"""Text recogniser benchmark: the PaddleOCR PP-OCRv4 recogniser (Paddle2ONNX, opset 12, weights in
Constant nodes, dynamic height and width), float and quantized, on rendered text lines.

    python tools/bench_ocr.py --cache /work/cache/models --readme

The model comes from PyPI ``rapidocr-onnxruntime`` 1.4.4 (Apache-2.0), read from a cache folder outside the
repository (``--cache``, $DFMPC_MODEL_CACHE, or ../cache/models); skipped when absent. The lines are seeded
random words and numbers drawn by Pillow's own font, preprocessed as rapidocr does (height 48, width
padded to 320, (x / 255 - 0.5) / 0.5); decoding is greedy CTC over the dictionary in the model's
metadata. Character accuracy is 1 - (edit distance / characters), over all lines.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import dfmpc_onnx
from bench_accuracy import ROOT, publish
from bench_heldout import default_cache

MODEL = "rapidocr_onnxruntime-1.4.4/ch_PP-OCRv4_rec_infer.onnx"
WORDS = ("model quantize data free mixed precision layer weight channel ternary bits compensation network "
         "image text line tensor graph export deploy device small fast accuracy check output input scale "
         "order river table window garden yellow silver market number pencil orange travel").split()
RUNS = (("default 4/8", dict(scheme="4/8")),
        ("4/8, --input-shape 3,48,320", dict(scheme="4/8", input_shapes={None: (3, 48, 320)})),
        ("default 2/6, --input-shape 3,48,320", dict(input_shapes={None: (3, 48, 320)})))


def render_lines(count: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``count`` lines of words and numbers, as rapidocr feeds its recogniser: N x 3 x 48 x 320."""
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(seed)
    images, texts = [], []
    while len(images) < count:
        words = [str(rng.integers(0, 10000)) if rng.random() < 0.25 else str(rng.choice(WORDS))
                 for _ in range(rng.integers(2, 5))]
        text = " ".join(words)
        font = ImageFont.load_default(size=int(rng.integers(22, 34)))
        left, top, right, bottom = font.getbbox(text)
        canvas = Image.new("RGB", (right + 8, bottom + 8), "white")
        ImageDraw.Draw(canvas).text((4, 4 - top // 2), text, fill=(0, 0, 0), font=font)
        width = int(round(canvas.width * 48 / canvas.height))
        if width > 320:
            continue
        line = np.zeros((48, 320, 3), np.float32)
        line[:, :width] = (np.asarray(canvas.resize((width, 48)), np.float32) / 255 - 0.5) / 0.5
        images.append(line[:, :, ::-1].transpose(2, 0, 1))  # BGR, channels first, as rapidocr's cv2 pipeline
        texts.append(text)
    return np.ascontiguousarray(np.stack(images)), texts


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


def character_accuracy(path: Path, images: np.ndarray, texts: list[str]) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    characters = ["blank"] + session.get_modelmeta().custom_metadata_map["character"].splitlines() + [" "]
    name = session.get_inputs()[0].name
    found = [line for start in range(0, len(images), 16)
             for line in decode(session.run(None, {name: images[start:start + 16]})[0], characters)]
    errors = sum(edit_distance(f, t) for f, t in zip(found, texts))
    return 100.0 * (1 - errors / sum(len(t) for t in texts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    source = args.cache / MODEL
    if not source.exists():
        print(f"skipped: {source} is not in the cache", file=sys.stderr)
        return 0
    images, texts = render_lines(args.lines)
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
