"""The architecture zoo in models/ (made by tools/make_zoo.py): the exact pairs found and refused in each."""

from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_model
from dfmpc_onnx import quantize

MODELS = Path(__file__).resolve().parent.parent / "models"


def short(name: str | None) -> str | None:
    """'/blocks/blocks.0/body/body.1/body.1.0/Conv' -> 'blocks.0/body.1.0': the module path torch gave the layer."""
    if name is None:
        return None
    parts = [p for p in name.strip("/").split("/") if p not in ("Conv", "Gemm", "MatMul")]
    return "/".join(p for i, p in enumerate(parts) if not any(q.startswith(p + ".") for q in parts[i + 1:]))


def search(model: str, relu6: str = "refuse"):
    _, report = quantize(MODELS / f"{model}.onnx", "2/6", relu6=relu6, refine="none", check=False)
    pairs = {(short(p.producer), short(p.consumer), p.offset, p.path) for p in report.pairs}
    refused = {short(r.producer): r.reason for r in report.refusals}
    return pairs, refused, report


def test_vgg_chain_alternates_low_high():
    pairs, refused, _ = search("vgg_chain")
    assert pairs == {("features.1.0", "features.3.0", 0, ("Relu", "MaxPool")),
                     ("features.4.0", "features.6.0", 0, ("Relu", "MaxPool"))}
    assert set(refused) == {"features.0.0", "classifier"}


def test_bottleneck_pairs_1x1_low_3x3_high_and_stops_at_the_residual_add():
    pairs, refused, _ = search("bottleneck_resnet")
    assert pairs == {("blocks.0/body.0.0", "blocks.0/body.1.0", 0, ("Relu",)),
                     ("blocks.1/body.0.0", "blocks.1/body.1.0", 0, ("Relu",))}
    for name in ("blocks.0/shortcut.0", "blocks.0/body.2.0", "blocks.1/body.2.0"):
        assert "Add" in refused[name] and "ends the chain" in refused[name]


def test_concat_producers_share_their_consumer_on_disjoint_channel_slices():
    pairs, refused, report = search("concat_net")
    assert pairs == {("fire1/expand1.0", "fire2/squeeze.0", 0, ("Relu", "Concat")),
                     ("fire1/expand3.0", "fire2/squeeze.0", 8, ("Relu", "Concat")),
                     ("dense.0", "transition.0", 16, ("Relu", "Concat"))}
    assert "feeds 2 nodes" in refused["fire1/squeeze.0"]  # squeeze output feeds both expand convs
    assert "feeds 2 nodes" in refused["fire2/expand1.0"]  # the fire2 Concat feeds dense and the outer Concat
    consumer = next(layer for layer in report.layers if short(layer.name) == "fire2/squeeze.0")
    assert consumer.role == "high" and consumer.partner.count(",") == 1


def test_mobilenetv2_relu6_choices():
    pairs, refused, _ = search("mobilenetv2_block")
    assert pairs == {("blocks.1/block.2.0", "head.0", 0, ())}
    expand = "blocks.0/block.0.0"
    assert "is not positively homogeneous" in refused[expand] and "Clip" in refused[expand]
    assert "Add" in refused["blocks.0/block.2.0"]
    passed, _, _ = search("mobilenetv2_block", relu6="pair")
    assert passed == pairs | {("blocks.0/block.0.0", "blocks.0/block.1.0", 0, ("Clip",)),
                              ("blocks.1/block.0.0", "blocks.1/block.1.0", 0, ("Clip",))}


def test_old_opset9_with_initializers_as_inputs():
    model = onnx.load(MODELS / "old_opset9.onnx")
    assert model.opset_import[0].version == 9 and len(model.graph.input) > 1
    pairs, refused, report = search("old_opset9")
    assert pairs == {("features.1.0", "features.2.0", 0, ("Relu",))}
    assert set(refused) == {"features.0.0", "fc"}
    assert not report.unfolded_batchnorm


ZOO = ["vgg_chain", "mobilenetv2_block", "bottleneck_resnet", "concat_net", "old_opset9"]
CASES = [(name, "refuse") for name in ZOO] + [("mobilenetv2_block", "pair"), ("mobilenetv2_block", "relu")]


@pytest.mark.parametrize("name,relu6", CASES)
def test_zoo_quantizes_and_placements_agree(name, relu6):
    """Every zoo model quantizes and passes the check; producer and consumer placement agree (float format)."""
    path = MODELS / f"{name}.onnx"
    _, report = quantize(path, "4/8", relu6=relu6, synthetic="pink", samples=8)
    assert report.check is not None and report.check.outputs[0].cosine > 0.9
    if relu6 == "relu":
        assert report.replaced_clips and "replaced by Relu" in " ".join(report.notes)
    if relu6 != "pair":  # consumer placement would move the clip point
        size = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[2].dim_value
        x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
        options = dict(format="float", check=False, refine="none", relu6=relu6)
        producer, _ = quantize(path, "2/6", placement="producer", **options)
        consumer, _ = quantize(path, "2/6", placement="consumer", **options)
        a, b = run_model(producer, x), run_model(consumer, x)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_relu6_pair_refuses_consumer_placement():
    from dfmpc_onnx.errors import InputError
    with pytest.raises(InputError, match="relu6 pair"):
        quantize(MODELS / "mobilenetv2_block.onnx", format="float", refine="none", placement="consumer", relu6="pair")
