"""Making compressed checkpoints: the streamed compression run (`pipeline`), one sparse block's
expert groups across ranks (`block`, orchestrating its token plan `plan`, its collectives
`exchange`, each owner's GPTQ `solve`, codes `encoded` and their wire form `wire`), the process group (`distributed`) and `qmoe pack` (`pack`). The files themselves
are written by the formats' writers (`formats.quantized_writer`, `formats.packed_manifest`).

The top of the stack beside `run`: may import `run`, `formats`, `execute`, `arch`, `quant`, `codec`,
`data`.
"""
