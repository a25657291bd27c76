"""qcompile's own TIR kernels for the TVM backend (CPU): linear layers in every weight format,
activation quantization, and in-place cache writes."""
