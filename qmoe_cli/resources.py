"""Where the files that ship beside the code are, installed or in a source checkout.

Presets (`configs/`) and native sources (`kernels/`) live at the top of the repository and are
installed as the package data `qmoe_cli.configs` and `qmoe_cli.native` (pyproject's
`package-dir`). Code run from a checkout (`PYTHONPATH=.`, or an editable install) uses the
directories beside its own package first, so it never picks up another checkout's or an
installed copy's files; an installed package (no `pyproject.toml` beside it) uses its package
data.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent  # the repository root, when run from a checkout
_SHIPPED = {"configs": "configs", "native": "kernels"}  # package data name -> checkout directory


def shipped_dir(name: str) -> Path:
    """The directory of package data `name` ("configs" | "native")."""
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / _SHIPPED[name]).is_dir():
        return _CHECKOUT / _SHIPPED[name]
    # Package data directories have no __init__.py: they import as namespace packages, whose
    # search locations are the real directories (importlib.resources would give a MultiplexedPath).
    spec = importlib.util.find_spec(f"qmoe_cli.{name}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return _CHECKOUT / _SHIPPED[name]


def package_dir() -> Path:
    """The package's own directory (holds `assets/`, the embedded tiny model)."""
    return Path(__file__).resolve().parent
