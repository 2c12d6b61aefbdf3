"""Streamed execution: the list buffer and block-by-block runner (`stream`) and evaluation.

May import `formats`, `arch`, `data` and below; never `compress` (which plugs into the runner
through its sparse-block hook).
"""
