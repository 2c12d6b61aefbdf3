"""Compile a native extension on first use, once per source version, safe against kills and races.

Both native parts (the C++ codec, `codec/native.py`, and the CUDA kernels, `kernels/ops.py`) are
JIT-built by `torch.utils.cpp_extension` into torch's extension cache. Three things go wrong
with a plain `load()`, and this module handles them:

- torch serializes builds with a `lock` file that only its creator removes: a build killed with
  SIGKILL leaves it, and every later process waits for it forever, silently. Here an `flock`
  (`locks.waiting_lock`), which the OS drops with the process, is held around the build; whoever
  holds it knows no one else is building, so a `lock` file it finds is stale and is removed.
  Waiting for a live builder ends after `timeout_s` with an error naming the lock.
- The cache directory was keyed by the extension's name, so two checkouts of the same version
  rebuilt in turn (their source paths differ) and two versions overwrote each other. Here it is
  keyed by a hash of the sources, headers, flags, torch, CUDA and Python versions:
  `TORCH_EXTENSIONS_DIR/NAME-HASH/`; any checkout or install of the same sources reuses it.
- A build takes a minute or more with no sign of life. One line on stderr says that it starts
  and how long it usually takes.

A finished build is marked by a `built` stamp file written after the library; a library without
one (a build killed while linking) is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .locks import waiting_lock

STAMP = "built"
LOCK = "qmoe-build.lock"
TORCH_LOCK = "lock"  # torch's FileBaton


@dataclass(frozen=True)
class NativeBuild:
    """What to compile and how; `name` is the module (or library) name the sources expect."""

    name: str
    sources: tuple[Path, ...]
    what: str  # for messages: "the C++ codec"
    usual: str  # how long a build usually takes, for the message: "about a minute on 2 cores"
    headers: tuple[Path, ...] = ()  # included by the sources: part of the cache key
    extra_cflags: tuple[str, ...] = ()
    extra_cuda_cflags: tuple[str, ...] = ()
    extra_ldflags: tuple[str, ...] = ()
    is_python_module: bool = True
    timeout_s: float = 1800.0  # longest wait for another process's build of the same sources
    include_dirs: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"NativeBuild.name must be an identifier, got {self.name!r}")
        if not self.sources:
            raise ValueError("NativeBuild.sources must name at least one file")
        if self.timeout_s <= 0:
            raise ValueError(f"NativeBuild.timeout_s must be > 0, got {self.timeout_s}")


def cache_key(build: NativeBuild) -> str:
    """16 hex digits of sha256 over everything the compiled library depends on."""
    import torch

    h = hashlib.sha256()
    for part in (build.name, torch.__version__, str(torch.version.cuda), sys.implementation.cache_tag,
                 platform.machine(), *build.extra_cflags, "|", *build.extra_cuda_cflags, "|",
                 str(build.is_python_module), *build.extra_ldflags):
        h.update(part.encode() + b"\0")
    for path in (*build.sources, *build.headers):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_directory(build: NativeBuild) -> Path:
    """Where `build` is compiled and cached: TORCH_EXTENSIONS_DIR (default: torch's cache) / NAME-HASH."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"{build.name}-{cache_key(build)}"


def load_native(build: NativeBuild, verbose: bool = False) -> tuple[Path, ModuleType | None]:
    """The compiled library's path and, for a Python module, the module; built when not cached.

    Raises what the compiler raises (OSError, RuntimeError, subprocess.CalledProcessError) and
    QmoeError after `build.timeout_s` s waiting for another process building the same sources.
    """
    directory = build_directory(build)
    library = directory / f"{build.name}.so"
    if not (directory / STAMP).is_file():
        directory.mkdir(parents=True, exist_ok=True)
        with waiting_lock(directory / LOCK, f"qmoe building {build.what}", build.timeout_s,
                          f"qmoe: waiting for another process building {build.what} in {directory}"):
            if not (directory / STAMP).is_file():  # not built by the process we waited for
                return library, _compile(build, directory, verbose)
    return library, _import(build, library)


def _compile(build: NativeBuild, directory: Path, verbose: bool) -> ModuleType | None:
    """Build into `directory` (holding its build lock) and load the result: the module, or None
    for a library of ops (loaded into torch.ops)."""
    from torch.utils.cpp_extension import load

    stale = directory / TORCH_LOCK
    if stale.exists():  # we hold the build lock, so its creator is dead (killed mid-build)
        stale.unlink()
    print(f"qmoe: building {build.what} into {directory} (once per version; usually {build.usual})",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    loaded = load(name=build.name, sources=[str(s) for s in build.sources], extra_cflags=list(build.extra_cflags),
                  extra_cuda_cflags=list(build.extra_cuda_cflags) or None, extra_ldflags=list(build.extra_ldflags),
                  extra_include_paths=[str(d) for d in build.include_dirs], build_directory=str(directory),
                  is_python_module=build.is_python_module, verbose=verbose)
    (directory / STAMP).write_text(f"{time.monotonic() - started:.1f} s\n")
    return loaded if isinstance(loaded, ModuleType) else None


def _import(build: NativeBuild, library: Path) -> ModuleType | None:
    import torch

    if not build.is_python_module:
        torch.ops.load_library(str(library))
        return None
    spec = importlib.util.spec_from_file_location(build.name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"{library}: not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_optional(build: NativeBuild, fallback: str) -> Any | None:
    """The compiled module (for a library of ops: its `torch.ops` namespace, which the sources
    register under `build.name`), or None after one warning naming `build.what`, the compiler's
    first line and `fallback` (what runs instead): the native code is an accelerator, never required."""
    try:
        module = load_native(build)[1]
    except (ImportError, OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"qmoe: {build.what} could not be built ({reason}); {fallback}", RuntimeWarning, stacklevel=3)
        return None
    if module is None:
        import torch

        return getattr(torch.ops, build.name)
    return module
