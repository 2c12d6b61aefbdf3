"""Checkpoints on disk, one owner per format: original Hugging Face checkpoints (`original`: its
typed description; `hf`: lazy, per tensor; `fp8`, `mxfp4`), quantized checkpoints (`quantized`: layout and reader; `quantized_manifest`: its
typed manifest; `quantized_writer`: its expert files), packed checkpoints (`packed`: layout,
validated matrices and reader; `packed_manifest`: its typed manifest), checksums (`integrity`),
the safetensors reader (`safetensors_io`), storage statistics (`stats`), `qmoe info` (`info`)
and opening whatever `--model` names (`open`). `registry` is the one place that tells which
format a directory holds (`detect`) and what each does (`FORMATS`).

Readers hand validated matrices to `execute`, which multiplies them: nothing here is an
nn.Module. May import `execute`, `arch`, `codec`, `quant`, `kernels`, `data`, `errors`, `files`,
`resources`; never `run` or `compress`. Every checkpoint kind offers the same
`arch.ModelWeights`, so the runner cannot tell them apart.
"""
