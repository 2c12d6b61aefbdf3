"""Execution of compressed weights: the nn.Modules that multiply them and where they run.

`linear` holds the CPU products (`GridLinear` over a dequantized matrix, `PackedLinear` over a
packed one, never dense whole), `grouped` the GPU path (`DeviceExperts`, `DeviceSharedExpert`: a
block's experts resident and still compressed on a device, run by the grouped kernels), and
`device` the choice of device and compute dtype.

Sits below `formats`: it knows how to multiply a coded matrix, not how one is stored, so the
readers hand it their validated matrices (duck-typed: `rows`, `cols`, `dense`, `sparse_matmul`).
Imports `arch`, `quant`, `kernels` and below; never `formats`, `run` or `compress`.
"""
