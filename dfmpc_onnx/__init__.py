"""dfmpc-onnx: data-free mixed-precision compensation (DF-MPC) for ONNX CNNs.

    import dfmpc_onnx
    model, report = dfmpc_onnx.quantize("in.onnx", scheme="2/6")
    print(report.format_table())
"""

from .api import quantize, quantize_file, save_model_atomic
from .errors import CheckError, InputError
from .plan import Scheme
from .report import Report

__all__ = ["quantize", "quantize_file", "save_model_atomic", "CheckError", "InputError", "Scheme", "Report"]
__version__ = "0.1.0"
