"""The synthetic-inputs stage: what refinement, ``--target-bits`` and the fidelity check run on, made from
the model alone, in its input domain (``domain.py``): white or pink noise (``maths/noise.py``), or
inputs distilled from it (``distill.py``), or inputs the caller gives."""

from __future__ import annotations

import numpy as np
import onnx

from .distill import distill_inputs
from .domain import InputDomain, input_domain
from .errors import InputError, first_line
from .fidelity import run_batches
from .graph import import_graph
from .inputs import synthesis_shape
from .load import with_weights
from .maths.noise import noise_batch, photographic_spread
from .options import SYNTHETIC_KINDS, Options, Plan
from .progress import Console
from .runtime import model_session, resolve_providers


def model_domain(skeleton: onnx.ModelProto, weights: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                 options: Options) -> InputDomain | None:
    """The input domain of the model (None when it cannot take synthetic inputs)."""
    shape = synthesis_shape(skeleton, shapes)
    if isinstance(shape, str):
        return None

    def predict(x: np.ndarray) -> np.ndarray:
        try:
            return run_batches(model_session(skeleton, ["CPUExecutionProvider"], weights), x)[0]
        except Exception as err:  # onnxruntime's many error types
            raise InputError(f"onnxruntime cannot run the input model on synthetic inputs: {first_line(err)}") from None
    return input_domain(import_graph(skeleton, weights), shape, options, predict)


def make_synthetic_inputs(skeleton: onnx.ModelProto, weights: dict[str, np.ndarray],
                          shapes: dict[str, tuple[int, ...]], plan: Plan, domain: InputDomain | None,
                          given: np.ndarray | None, console: Console) -> tuple[np.ndarray | None, Plan]:
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
        return synthesize(skeleton, weights, shape, plan.synthetic, options, domain, console, providers), plan
    except InputError as err:
        if options.synthetic != "auto":
            raise
        plan = plan.without_distillation(str(err))
        return synthesize(skeleton, weights, shape, plan.synthetic, options, domain, console), plan


def synthesize(skeleton: onnx.ModelProto, weights: dict[str, np.ndarray], shape: list, kind: str, options: Options,
               domain: InputDomain, console: Console | None = None, providers: list[str] | None = None) -> np.ndarray:
    """``options.samples`` seeded inputs of ``shape`` (static after the batch dim) in ``domain``: "noise",
    "leaves", "pink" (images, each with its own contrast and mean colour: ``maths.photographic_spread``) or
    "distill" (from plain pink noise; it runs the whole float model, so the weights go back in)."""
    z = standard_noise(shape, "pink" if kind == "distill" else kind, options.samples, options.seed, domain.channel_axis)
    if kind == "pink" and len(shape) == 4:
        z = photographic_spread(z, np.random.default_rng((options.seed, 1)), domain.channel_axis)
    start = domain.apply(z)
    if kind != "distill":
        return start
    return distill_inputs(with_weights(skeleton, weights), start, options.seed, console=console, providers=providers,
                          domain=domain)


def standard_noise(shape: list, kind: str, samples: int, seed: int, channel_axis: int = 1) -> np.ndarray:
    """Standardised noise (``maths.noise_batch``) for an NCHW input, or an NHWC one (``channel_axis`` 3),
    the pink spectrum over the spatial axes either way."""
    if channel_axis == 3 and len(shape) == 4:
        return noise_batch([shape[0], shape[3], shape[1], shape[2]], kind, samples, seed).transpose(0, 2, 3, 1).copy()
    return noise_batch(shape, kind, samples, seed)


def validation_inputs(inputs: np.ndarray | None, domain: InputDomain | None, plan: Plan) -> np.ndarray | None:
    """Where the synthetic ``inputs`` are pink noise, inputs of other kinds, as many, in the same domain: half
    white noise, half pink noise at half the contrast (``refine.keep_if_it_generalises``); else None."""
    if inputs is None or domain is None or plan.synthetic != "pink":
        return None
    half, seed = max(1, len(inputs) // 2), plan.options.seed
    shape = list(inputs.shape)
    white = standard_noise(shape, "noise", half, seed + 1, domain.channel_axis)
    faint = standard_noise(shape, "pink", half, seed + 2, domain.channel_axis) * 0.5
    return domain.apply(np.concatenate([white, faint])).astype(inputs.dtype)


def fidelity_inputs(skeleton: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], inputs: np.ndarray | None,
                    plan: Plan, domain: InputDomain | None) -> tuple[np.ndarray, str] | None:
    """The inputs the check compares the two models on, and what they are: the synthetic inputs, or
    seeded pink noise where nothing else needed inputs; None when the model cannot take them."""
    if inputs is not None:
        return inputs, f"{len(inputs)} {SYNTHETIC_KINDS.get(plan.synthetic, 'synthetic')} inputs"
    if domain is None:
        return None
    options = plan.options
    z = standard_noise(synthesis_shape(skeleton, shapes), "pink", options.samples, options.seed, domain.channel_axis)
    return domain.apply(z), f"{options.samples} pink-noise inputs"
