"""Streamed execution: the list buffer and block-by-block runner (`stream`), resident and
placed models (`resident`, `placement`), generation (`generate`) and evaluation (`evaluate`).

May import `formats`, `execute` (devices, the modules that multiply), `arch`, `data` and below;
never `compress` (which plugs into the runner through its sparse-block hook).
"""
