"""--relu6 relu: Clip(0, 6) becomes Relu only where the BatchNorm statistics say it is rarely reached."""

import numpy as np
import pytest

from conftest import GraphBuilder
from dfmpc_onnx import quantize


def clip_chain(beta: float, gamma: float):
    """stem, conv-BN(beta, gamma)-Clip(0, 6)-conv, conv, head: BN's statistics say how often the clip is reached."""
    g = GraphBuilder()
    x = g.node("Relu", [g.conv("x", 3, 4, name="stem")])
    y = g.conv(x, 4, 4, name="producer")
    y = g.node("BatchNormalization", [y, g.const("gamma", np.full(4, gamma)), g.const("beta", np.full(4, beta)),
                                      g.const("mean", np.zeros(4)), g.const("var", np.ones(4))], epsilon=0.0)
    y = g.node("Clip", [y, g.const("lo", np.array(0.0)), g.const("hi", np.array(6.0))], name="relu6")
    y = g.node("Relu", [g.conv(y, 4, 4, name="consumer")])
    return g.model(g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [y])]), 4, 10, name="fc"))


@pytest.mark.parametrize("beta,gamma,replaced", [(0.0, 1.0, True), (1.0, 1.5, True), (4.0, 1.0, False),
                                                 (0.0, 2.5, False)])
def test_clip_replaced_only_when_rarely_reached(beta, gamma, replaced):
    model, report = quantize(clip_chain(beta, gamma), relu6="relu", refine="none")
    assert (report.replaced_clips == ["relu6"]) is replaced
    ops = [n.op_type for n in model.graph.node]
    assert ("Clip" in ops) is not replaced
    assert {(p.producer, p.consumer) for p in report.pairs} == ({("producer", "consumer")} if replaced else set())


def test_refuse_and_pair():
    _, refused = quantize(clip_chain(0.0, 1.0), relu6="refuse", refine="none")
    assert not refused.pairs and "Clip" in refused.refusals[1].reason
    _, paired = quantize(clip_chain(4.0, 1.0), relu6="pair", refine="none")
    assert [(p.producer, p.path) for p in paired.pairs] == [("producer", ("Clip",))]
