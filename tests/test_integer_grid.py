"""``--kbit-grid integer``: symmetric integer k-bit weights (plain rounding as users know it), stored exactly
and portably, beside Eq. 6's DoReFa grid."""

import numpy as np
import onnx
import pytest

from conftest import residual_model, run_model
from dfmpc_onnx import quantize
from dfmpc_onnx.maths.quantizers import integer_quantize
from dfmpc_onnx.storage import split_codes, storage_parts, stored_rows
from test_emit import dequantized_weights


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("per_channel", [True, False])
def test_integer_grid_is_round_to_nearest_on_symmetric_integers(bits, per_channel):
    rows = np.random.default_rng(bits).standard_normal((5, 40)).astype(np.float32)
    rows[0] = 0.0
    q = integer_quantize(rows, bits, per_channel)
    limit = 2 ** (bits - 1) - 1
    assert q.codes.min() >= -limit and q.codes.max() <= limit and q.grid == "integer"
    m = np.abs(rows).max(axis=1) if per_channel else np.full(5, np.abs(rows).max())
    scale = np.where(m > 0, m, 1.0)[:, None] / limit
    expected = np.clip(np.rint(rows / scale), -limit, limit) * scale
    np.testing.assert_allclose(q.dequantize(), expected, rtol=1e-6, atol=1e-7)
    assert np.all(q.dequantize()[rows == 0] == 0)  # zero is a level


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("storage", ["exact", "portable"])
def test_integer_codes_are_stored_in_their_width_without_an_offset(bits, storage):
    q = integer_quantize(np.random.default_rng(0).standard_normal((4, 30)).astype(np.float32), bits, True)
    np.testing.assert_allclose(stored_rows(q, storage), q.dequantize(), rtol=1e-6, atol=1e-7)
    for (dtype, _), part in zip(storage_parts(bits, storage, "integer"), split_codes(q, storage)):
        info = np.iinfo(dtype) if dtype in (np.int8, np.int16) else None
        low, high = (info.min, info.max) if info else (-8, 7) if "int4" in str(dtype) else (0, 3)
        assert low <= part.min() and part.max() <= high


@pytest.mark.parametrize("scheme", ["4/8", "3/6", "6"])
@pytest.mark.parametrize("storage", ["exact", "portable"])
def test_integer_grid_end_to_end(scheme, storage):
    source = residual_model()
    model, report = quantize(source, scheme, kbit_grid="integer", storage=storage, refine="none", protect="off")
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    float_model, _ = quantize(source, scheme, kbit_grid="integer", format="float", refine="none", protect="off",
                              check=False)
    expected = run_model(float_model, x)  # exact storage rounds the scales to float16 (2^-11)
    np.testing.assert_allclose(run_model(model, x), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    assert report.check is not None
    bits = {layer.name: layer.bits for layer in report.layers}
    for name, weight in dequantized_weights(model).items():
        rows = weight.reshape(weight.shape[0], -1)  # output channels first: Conv, and Gemm with transB=1
        limit = 1 if bits[name] == 2 else 2 ** (bits[name] - 1) - 1
        # every row's largest |w| is its scale times the limit, so w / (max|w| / limit) are the integer codes
        codes = rows / (np.abs(rows).max(axis=1, keepdims=True) / limit)
        np.testing.assert_allclose(codes, np.rint(codes), atol=1e-3)
