"""Exits from our formats to the tools people use: `qmoe export` to a Hugging Face checkpoint
(dense, or compressed-tensors' packed layout) and the model card every output directory gets.

A stage beside `compress`: may import `run`, `formats`, `arch`, `quant`, `codec`, `data`.
"""
