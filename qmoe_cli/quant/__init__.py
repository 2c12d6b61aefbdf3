"""Quantization: per-row grids (`grids`) and batched GPTQ over groups of experts (`gptq`)."""
