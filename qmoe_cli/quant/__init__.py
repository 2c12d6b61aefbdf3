"""Quantization algorithms: per-row grids (`grids`) and batched GPTQ over groups of experts (`gptq`).

Pure functions on tensors, below `formats` (a quantized checkpoint's grids dequantize with them)
and `compress` (which drives them). Imports nothing else of the package.
"""
