"""How closely the quantized model follows the float one on the tool's synthetic inputs: top-1
agreement of classifier-like outputs and output SQNR, per output (part of the check stage)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .maths.quantizers import decibels

AGREEMENT_WARNING = 90.0
"""Top-1 agreement (percent) below which the summary warns."""
SQNR_WARNING_DB = 10.0
"""Output SQNR below which the summary warns about an output with no argmax to agree on."""


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    sqnr_db: float
    top1_agreement: float | None
    """Percent of positions whose argmax over the last axis agrees; None for outputs that are not
    classifier-like (``classifier_like``)."""


@dataclass(frozen=True)
class Fidelity:
    inputs: str
    """What the inputs were, e.g. "64 distilled inputs"."""
    outputs: tuple[OutputFidelity, ...]

    @property
    def top1_agreement(self) -> float | None:
        """The lowest agreement over the classifier-like outputs (None if there is none)."""
        values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(values) if values else None

    @property
    def sqnr_db(self) -> float:
        """The lowest SQNR over the outputs."""
        return min(o.sqnr_db for o in self.outputs)

    def warnings(self) -> list[str]:
        """One sentence per output that the quantized model follows badly."""
        found = []
        for out in self.outputs:
            if out.top1_agreement is not None and out.top1_agreement < AGREEMENT_WARNING:
                found.append(f"output '{out.name}': the quantized model agrees with the float model's top-1 on only "
                             f"{out.top1_agreement:.1f} % of {self.inputs} (SQNR {out.sqnr_db:.1f} dB); it may have "
                             "lost much of its accuracy")
            elif out.top1_agreement is None and out.sqnr_db < SQNR_WARNING_DB:
                found.append(f"output '{out.name}': SQNR {out.sqnr_db:.1f} dB against the float model on {self.inputs}"
                             "; it may have lost much of its accuracy")
        return found

    def as_dict(self) -> dict:
        return {"top1_agreement": self.top1_agreement, "sqnr_db": self.sqnr_db, "inputs": self.inputs,
                "outputs": [vars(o) for o in self.outputs]}


def scores_shape(shape: tuple) -> tuple:
    """``shape`` without the trailing axes of size 1 after the second: (batch, classes, 1, 1), as a conv
    head with global pooling leaves it, is (batch, classes)."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def classifier_like(shape: tuple) -> bool:
    """Outputs whose last axis (``scores_shape``) holds scores to take an argmax of: (batch, classes), or
    (batch, positions, classes) as sequence recognisers give; not feature maps or single values."""
    shape = scores_shape(shape)
    return len(shape) in (2, 3) and isinstance(shape[-1], int) and shape[-1] >= 2


def one_class_axis(shape: tuple) -> bool:
    """Classifier-like with one score per class and input: (batch, classes) once ``scores_shape`` drops the
    trailing axes of size 1 (not a sequence recogniser's (batch, positions, classes))."""
    return len(scores_shape(shape)) == 2 and classifier_like(shape)


def class_scores(values: np.ndarray) -> np.ndarray | None:
    """``values`` reshaped to ``scores_shape`` when they are classifier-like, else None."""
    return values.reshape(scores_shape(values.shape)) if classifier_like(values.shape) else None


def measure_fidelity(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str],
                     inputs: str) -> Fidelity:
    """Per output: SQNR of ``candidate`` against ``reference``, and the top-1 agreement where it means
    something."""
    outputs = []
    for name, r, c in zip(names, reference, candidate):
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
        noise, signal = float(np.sum((r64 - c64) ** 2)), float(np.sum(r64**2))
        sqnr = decibels(signal, noise)
        agreement = None
        if classifier_like(r.shape):
            agreement = 100.0 * float(np.mean(class_scores(r).argmax(axis=-1) == class_scores(c).argmax(axis=-1)))
        outputs.append(OutputFidelity(name, sqnr, agreement))
    return Fidelity(inputs, tuple(outputs))


def run_batches(session: ort.InferenceSession, inputs: np.ndarray) -> list[np.ndarray]:
    """Every output of ``session`` on ``inputs`` (its one input), in chunks its batch dim allows,
    concatenated."""
    spec = session.get_inputs()[0]
    chunk = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else 32
    inputs = inputs.astype(np.float16) if spec.type == "tensor(float16)" else inputs
    parts = [session.run(None, {spec.name: inputs[start:start + chunk]}) for start in range(0, len(inputs), chunk)]
    return [np.concatenate([np.asarray(part[i]) for part in parts]) for i in range(len(parts[0]))]
