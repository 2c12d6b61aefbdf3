"""Making compressed checkpoints: the streamed compression run (`pipeline`), one sparse block's
expert groups across ranks (`block`), the process group (`distributed`) and `qmoe pack` (`pack`).

The top of the stack beside `run`: may import `run`, `formats`, `arch`, `quant`, `codec`, `data`.
"""
