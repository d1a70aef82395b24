"""The paper's mathematics and the refinement's, as pure numpy and Numba functions (no onnx import).

One module per topic, one function per equation, the symbols of ``../shared/spec/dfmpc-math.md`` and the
paper's equation numbers in the docstrings:

- ``quantizers``: ternary (Eqs. 3-4, and the least-squares threshold) and DoReFa k-bit (Eq. 6)
- ``compensation``: the closed-form coefficient c (Eqs. 7-10)
- ``batchnorm``: folding BatchNormalization into a conv, and the mean of a rectified Gaussian
- ``statistics``: per-channel statistics matching, the ridge refit and bias correction (spec section 4)
- ``noise``: white and 1/f^beta ("pink") noise
"""
