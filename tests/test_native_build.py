"""Native builds (`qmoe_cli.native_build`): a build killed with SIGKILL does not hang later runs,
a live builder is waited for with a timeout naming the lock, and the cache is keyed by the sources.

The killed-build test compiles a small C++ library of its own (seconds, not the codec's minute)
through the same helper the codec and the CUDA kernels use, in a temporary TORCH_EXTENSIONS_DIR.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmoe_cli.errors import QmoeError
from qmoe_cli.locks import try_lock
from qmoe_cli.native_build import LOCK, STAMP, TORCH_LOCK, NativeBuild, build_directory, load_native

ROOT = Path(__file__).resolve().parent.parent
HAS_COMPILER = bool(shutil.which("c++") or shutil.which("g++")) and bool(shutil.which("ninja"))
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="needs a C++ compiler and ninja")

# Slow enough to compile (a second or more) that the build can be killed in the middle of it.
SOURCE = """
#include <map>
#include <regex>
#include <string>
extern "C" int qmoe_answer() {
    std::map<std::string, int> m{{"answer", 42}};
    return std::regex_match("42", std::regex("[0-9]+")) ? m["answer"] : -1;
}
"""

BUILD_SCRIPT = """
import ctypes
import sys
from pathlib import Path
from qmoe_cli.native_build import NativeBuild, load_native
library, _ = load_native(NativeBuild(name=sys.argv[1], sources=(Path(sys.argv[2]),), what="a test library",
                                     usual="seconds", is_python_module=False, timeout_s=float(sys.argv[3])))
print(library, ctypes.CDLL(str(library)).qmoe_answer())  # loaded by torch.ops.load_library, with libtorch
"""


def _build(name: str, source: Path, timeout_s: float = 60.0) -> NativeBuild:
    return NativeBuild(name=name, sources=(source,), what="a test library", usual="seconds",
                       is_python_module=False, timeout_s=timeout_s)


def _run_build(name: str, source: Path, extensions: Path, timeout_s: float = 60.0) -> subprocess.Popen:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, name, str(source), str(timeout_s)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@needs_compiler
def test_a_build_killed_mid_way_does_not_hang_the_next(tmp_path: Path) -> None:
    source = tmp_path / "answer.cpp"
    source.write_text(SOURCE)
    extensions = tmp_path / "extensions"
    victim = _run_build("qmoe_test_killed", source, extensions)
    deadline = time.monotonic() + 120
    torch_lock = None
    while time.monotonic() < deadline and victim.poll() is None:
        found = list(extensions.glob(f"qmoe_test_killed-*/{TORCH_LOCK}"))
        if found:
            torch_lock = found[0]
            break
        time.sleep(0.002)
    assert torch_lock is not None, f"the build never started: {victim.communicate()}"
    victim.send_signal(signal.SIGKILL)  # torch's lock file stays behind, as in the issue
    victim.wait()
    assert torch_lock.exists() and not (torch_lock.parent / STAMP).exists()

    again = _run_build("qmoe_test_killed", source, extensions)
    try:
        out, err = again.communicate(timeout=120)
    finally:
        again.kill()
    assert again.returncode == 0, err
    building = [line for line in err.splitlines() if "building a test library" in line]
    assert len(building) == 1 and "usually seconds" in building[0], err
    path, answer = out.split()
    library = Path(path)
    assert library.parent == torch_lock.parent and (library.parent / STAMP).is_file() and answer == "42"

    cached = _run_build("qmoe_test_killed", source, extensions)  # a cache hit: no build, no message
    out, err = cached.communicate(timeout=120)
    assert cached.returncode == 0 and out.split() == [path, "42"] and "building" not in err, err


def test_waiting_for_a_live_builder_times_out_naming_the_lock(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    source = tmp_path / "answer.cpp"
    source.write_text(SOURCE)
    build = _build("qmoe_test_waiting", source, timeout_s=0.5)
    directory = build_directory(build)
    directory.mkdir(parents=True)
    held = try_lock(directory / LOCK, "qmoe building a test library")  # another process's build, as flock sees it
    assert isinstance(held, int)
    try:
        with pytest.raises(QmoeError, match=f"timed out after 0.5 s waiting for the lock {directory / LOCK}, "
                                             f"held by qmoe building a test library \\(pid {os.getpid()}\\)"):
            load_native(build)
    finally:
        os.close(held)


def test_cache_is_keyed_by_source_content_not_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    a, b, c = tmp_path / "a" / "x.cpp", tmp_path / "b" / "x.cpp", tmp_path / "c" / "x.cpp"
    for path, text in ((a, SOURCE), (b, SOURCE), (c, SOURCE + "// changed\n")):
        path.parent.mkdir()
        path.write_text(text)
    assert build_directory(_build("qmoe_x", a)) == build_directory(_build("qmoe_x", b))  # two clones share it
    assert build_directory(_build("qmoe_x", a)) != build_directory(_build("qmoe_x", c))
    assert build_directory(_build("qmoe_x", a)).parent == tmp_path / "ext"
