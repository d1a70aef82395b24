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
import onnx_graphsurgeon as gs

from .pairs import clip_bounds, is_relu6

RARE = 3.0
"""Standard deviations between every channel's mean pre-activation and the clip point."""


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

    Returns the replaced Clip names and (name, reason) for those kept.
    """
    replaced, kept = [], []
    for clip in clips:
        hi = clip_bounds(clip)[1]
        if clip.name not in statistics:
            kept.append((clip.name, "no statistics of its input"))
            continue
        mean, std = (np.asarray(v, np.float64).reshape(-1) for v in statistics[clip.name])
        reach = float(np.max(mean + rare * std))
        if reach > hi:
            kept.append((clip.name, f"mean + {rare:g} std reaches {reach:.2f} > {hi:g}"))
            continue
        clip.op = "Relu"
        clip.attrs.clear()
        while len(clip.inputs) > 1:
            clip.inputs.pop()
        replaced.append(clip.name)
    return replaced, kept
