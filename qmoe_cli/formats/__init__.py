"""Checkpoints on disk: original Hugging Face checkpoints (`hf`: lazy, per tensor), quantized and
packed checkpoints (`quantized`, `packed`), the safetensors reader (`safetensors_io`), storage
statistics (`stats`), `qmoe info` (`info`) and opening whatever `--model` names (`open`).

May import `arch`, `codec`, `quant`, `errors`, `files`, `resources`; never `run` or `compress`.
Every checkpoint kind offers the same `arch.ModelWeights`, so the runner cannot tell them apart.
"""
