"""qmoe: compress Mixture-of-Experts models below one bit per expert weight and run them compressed.

    import qmoe_cli as qmoe
    model = qmoe.load("tiny-mixtral", device="cpu")   # a torch.nn.Module (see docs/python.md)

Subpackages follow the data flow and import only downwards:

    cli, api ─► compress ─► run ─► formats ─► execute ─► arch ─► quant, codec, kernels, data ─► errors, files, resources

`arch` is the seam between model families and everything else (see `arch.base.Architecture`);
`docs/architecture.md` says which module owns which format. The public API (`api`) is imported on
first use of one of its names, so `qmoe --version` and `import qmoe_cli` stay quick (no torch import).
"""

import sys
import types

__version__ = "0.1.0"

_API = ("CacheReserve", "Checkpoint", "CompressConfig", "GenerateConfig", "GenerationStats", "ModelOutput", "Output",
        "PackConfig", "QmoeModel", "QmoeTokenizer", "compress", "evaluate", "load", "open_checkpoint", "pack")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'qmoe_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


class _Package(types.ModuleType):
    """`qmoe_cli.compress` is both the API function and the name of the compress subpackage, which
    Python binds on the package (a plain attribute, which `__getattr__` never overrides) whenever
    the subpackage is first imported, by the API or by the user. A property on the package's class
    outranks that attribute, so `qmoe_cli.compress` is always the function; the binding is ignored
    (the subpackage stays in `sys.modules`, so `from qmoe_cli.compress.pack import ...` and
    `importlib.import_module("qmoe_cli.compress")` reach it)."""

    @property
    def compress(self):
        from .api import compress

        return compress

    @compress.setter
    def compress(self, value: object) -> None:
        pass


sys.modules[__name__].__class__ = _Package
