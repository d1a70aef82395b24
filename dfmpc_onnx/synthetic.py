"""The synthetic-inputs stage: what refinement and ``--target-bits`` run on, made from the model alone:
white or pink noise (``maths/noise.py``), or inputs distilled from its BatchNorm statistics
(``distill.py``), or inputs the caller gives."""

from __future__ import annotations

import numpy as np
import onnx

from .distill import distill_inputs
from .errors import InputError
from .inputs import synthesis_shape
from .load import with_weights
from .maths.noise import noise_batch
from .options import Plan
from .progress import Console
from .runtime import resolve_providers


def make_synthetic_inputs(skeleton: onnx.ModelProto, weights: dict[str, np.ndarray],
                          shapes: dict[str, tuple[int, ...]], plan: Plan, given: np.ndarray | None,
                          console: Console) -> tuple[np.ndarray | None, Plan]:
    """The plan's synthetic inputs (None when it needs none), and the plan that runs: when distillation
    was chosen by ``--synthetic auto`` and turns out impossible, pink noise replaces it."""
    if not plan.needs_inputs:
        return None, plan
    shape = synthesis_shape(skeleton, shapes)
    if given is not None:
        if list(np.shape(given)[1:]) != shape[1:]:
            raise InputError(f"synthetic_inputs of shape {np.shape(given)} do not fit input {shape}")
        return np.asarray(given, dtype=np.float32), plan
    options = plan.options
    providers = resolve_providers(options.providers)
    try:
        return synthesize(skeleton, weights, shape, plan.synthetic, options.samples, options.seed, console,
                          providers), plan
    except InputError as err:
        if options.synthetic != "auto":
            raise
        plan = plan.without_distillation(str(err))
        return synthesize(skeleton, weights, shape, plan.synthetic, options.samples, options.seed, console), plan


def synthesize(skeleton: onnx.ModelProto, weights: dict[str, np.ndarray], shape: list, kind: str, samples: int,
               seed: int, console: Console | None = None, providers: list[str] | None = None) -> np.ndarray:
    """``samples`` seeded inputs of ``shape`` (static after the batch dim): "noise", "pink" or "distill"
    (distillation runs the whole float model, so it takes the weights back into the skeleton)."""
    if kind == "distill":
        return distill_inputs(with_weights(skeleton, weights), samples, seed, input_shape=shape[1:], console=console,
                              providers=providers)
    return noise_batch(shape, kind, samples, seed)
