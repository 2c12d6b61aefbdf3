"""The package layout: subpackages import only downwards, no import cycles, and model families
stay behind the `arch` interface. Imports are read with `ast` (module- and function-level)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmoe_cli import resources

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qmoe_cli"
BASE = {"errors", "files", "resources", "locks", "native_build", "threads"}
# What each subpackage may import (besides itself); `cli` and `__main__` may import anything.
ALLOWED = {
    "compress": {"run", "formats", "arch", "quant", "codec", "kernels", "data"} | BASE,
    "export": {"run", "formats", "arch", "quant", "codec", "kernels", "data"} | BASE,
    "run": {"formats", "arch", "quant", "codec", "kernels", "data"} | BASE,
    "formats": {"arch", "quant", "codec", "kernels", "data"} | BASE,
    "arch": BASE,
    "quant": BASE,
    "codec": BASE,
    "kernels": {"codec"} | BASE,
    "data": BASE,
    "errors": set(),
    "files": {"errors"},
    "resources": set(),
    "locks": {"errors"},
    "native_build": {"locks"},
    "threads": set(),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that module `name` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_package else name.split(".")[:-1]
            if node.level:
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            candidates = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _unit(module: str) -> str:
    """The top-level subpackage or module of `qmoe_cli.x.y` ("x"); "" for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_subpackages_import_only_downwards() -> None:
    wrong = []
    for module, targets in _graph().items():
        unit = _unit(module)
        if unit in ("", "cli", "__main__"):
            continue
        for target in targets:
            other = _unit(target)
            if other != unit and other != "" and other not in ALLOWED[unit]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_families_stay_behind_the_architecture_interface() -> None:
    """Only `arch` itself names a family's modules; the runner, compressor and formats ask an
    `Architecture`."""
    leaks = [f"{module} -> {target}" for module, targets in _graph().items() for target in targets
             if target.startswith("qmoe_cli.arch.switch") and not module.startswith("qmoe_cli.arch")]
    assert not leaks, "\n".join(leaks)


def test_native_sources_ship_from_the_top_level_kernels_directory() -> None:
    native = resources.shipped_dir("native")
    for name in ("codec.cpp", "binding.cpp", "decode_matmul.cu", "decode_matmul.h"):
        assert (native / name).is_file(), name
    assert (resources.shipped_dir("configs") / "tiny-switch.toml").is_file()


def test_checkout_files_come_from_beside_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a source checkout, files come from beside the package, even when another copy is
    installed; an installed package (no pyproject.toml beside it) uses its package data."""
    monkeypatch.setattr(resources.importlib.util, "find_spec", lambda name: None)
    assert resources.shipped_dir("configs") == ROOT / "configs"
    assert resources.shipped_dir("native") == ROOT / "kernels"


def test_installed_package_uses_its_package_data(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "qmoe_cli" / "native").mkdir(parents=True)
    (site / "kernels").mkdir()  # another distribution's top-level package must not be taken
    code = ("import sys; sys.modules.pop('qmoe_cli', None); from qmoe_cli.resources import shipped_dir; "
            "print(shipped_dir('native'))")
    for name in ("__init__.py", "resources.py"):
        (site / "qmoe_cli" / name).write_text((ROOT / "qmoe_cli" / name).read_text())
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == site / "qmoe_cli" / "native"


def test_python_m_from_a_checkout(tmp_path: Path) -> None:
    """`PYTHONPATH=. python -m qmoe_cli` from a checkout; run in another directory so the checkout
    on PYTHONPATH, not an install, provides the package."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "qmoe_cli", "presets"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "tiny-switch" in done.stdout and "switch-c2048" in done.stdout
