"""qmoe: compress Mixture-of-Experts models below one bit per expert weight and run them compressed.

Subpackages follow the data flow and import only downwards:

    cli ─► compress ─► run ─► formats ─► execute ─► arch ─► quant, codec, kernels, data ─► errors, files, resources

`arch` is the seam between model families and everything else (see `arch.base.Architecture`);
`docs/architecture.md` says which module owns which format.
"""

__version__ = "0.1.0"
