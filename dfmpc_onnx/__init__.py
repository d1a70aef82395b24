"""dfmpc-onnx: data-free mixed-precision compensation (DF-MPC) for ONNX CNNs.

    import dfmpc_onnx
    model, report = dfmpc_onnx.quantize("in.onnx", scheme="2/6")
    print(report.format_table())
"""

from .api import quantize, quantize_file
from .errors import CheckError, InputError, InternalError
from .options import Options, OutputOptions, Scheme
from .progress import Console
from .report import Report
from .save import save_model_atomic

__all__ = ["quantize", "quantize_file", "save_model_atomic", "CheckError", "InputError", "InternalError", "Options",
           "OutputOptions", "Scheme", "Console", "Report"]
__version__ = "0.1.0"
