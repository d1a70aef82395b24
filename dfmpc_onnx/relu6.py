"""``--relu6 relu``: replace Clip(0, hi) (ReLU6) by Relu where the clip is rarely reached.

Clip is not positively homogeneous, so it ends a pair chain. Where a
channel's pre-activation almost never reaches the clip point, Clip and Relu
compute the same thing, and replacing the one by the other opens the chain
(the approach of DFQ, Nagel et al. 2019, and AIMET). The pre-activation's
per-channel mean and standard deviation come from the folded BatchNorm
(beta, |gamma|) or, in models exported with BatchNorm already folded, from
the float model on the synthetic inputs. A Clip is replaced when, on every
channel, mean + RARE * std stays below its upper bound. This changes the
model; the report lists every replaced Clip.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .pairs import clip_bounds, is_relu6
from .sensitivity import activation_statistics

RARE = 3.0
"""Standard deviations between every channel's mean pre-activation and the clip point."""


def relax_relu6(graph: gs.Graph, preactivation: dict[str, tuple[np.ndarray, np.ndarray]], like: onnx.ModelProto,
                inputs: np.ndarray | None, relu6: str) -> tuple[list[str], str | None]:
    """Under ``--relu6 relu``: Clip(0, hi) -> Relu where statistics say the clip is rarely reached, in place.
    The statistics come from folded BatchNorm, else from the float model on ``inputs`` (if any).
    Returns the replaced Clips and a note for the report (None when nothing was asked or the model has
    no ReLU6)."""
    if relu6 != "relu":
        return [], None
    clips = relu6_clips(graph)
    statistics = batchnorm_statistics(clips, preactivation)
    missing = [clip for clip in clips if clip.name not in statistics]
    if missing and inputs is not None:
        measured = activation_statistics(graph, like, inputs, [c.inputs[0].name for c in missing])
        statistics.update({clip.name: (mean, np.sqrt(var)) for clip, (mean, var) in zip(missing, measured)})
    replaced, left = replace_rare_clips(clips, statistics)
    if not clips:
        return replaced, None
    return replaced, (f"--relu6 relu: {len(replaced)} of {len(clips)} Clip(0, max) replaced by Relu (a model change)"
                      + ("; left as Clip: " + "; ".join(f"{name} ({reason})" for name, reason in left) if left else ""))


def relu6_clips(graph: gs.Graph) -> list[gs.Node]:
    """The Clip(0, hi) nodes of ``graph`` with constant, finite bounds."""
    return [node for node in graph.nodes if is_relu6(node)]


def batchnorm_statistics(clips: list[gs.Node], preactivation: dict[str, tuple[np.ndarray, np.ndarray]]
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(mean, std) of each Clip's input that comes straight from a Conv with folded BatchNorm (beta, |gamma|)."""
    statistics = {}
    for clip in clips:
        source = clip.inputs[0].inputs
        if len(source) == 1 and source[0].name in preactivation:
            statistics[clip.name] = preactivation[source[0].name]
    return statistics


def replace_rare_clips(clips: list[gs.Node], statistics: dict[str, tuple[np.ndarray, np.ndarray]],
                       rare: float = RARE) -> tuple[list[str], list[tuple[str, str]]]:
    """Turn each Clip whose every channel has mean + ``rare`` * std <= hi into a Relu, in place.

    Returns the replaced Clip names and (name, reason) for those left as Clip.
    """
    replaced, left = [], []
    for clip in clips:
        hi = clip_bounds(clip)[1]
        if clip.name not in statistics:
            left.append((clip.name, "no statistics of its input"))
            continue
        mean, std = (np.asarray(v, np.float64).reshape(-1) for v in statistics[clip.name])
        reach = float(np.max(mean + rare * std))
        if reach > hi:
            left.append((clip.name, f"mean + {rare:g} std reaches {reach:.2f} > {hi:g}"))
            continue
        clip.op = "Relu"
        clip.attrs.clear()
        while len(clip.inputs) > 1:
            clip.inputs.pop()
        replaced.append(clip.name)
    return replaced, left
