"""The release as a stranger gets it: the wheel holds every file of the tree, and installed from the
wheel alone, away from the checkout, `qmoe` runs the README's quick start and prints what the README
shows. A hand-kept package list lost a module three times; these tests catch the fourth."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# checkout directory -> where its files land in the wheel (pyproject's package-dir)
SHIPPED = {"qmoe_cli": "qmoe_cli", "configs": "qmoe_cli/configs", "kernels": "qmoe_cli/native"}
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "LICENSE")  # what the build reads besides SHIPPED
NOT_SHIPPED = ("__pycache__",)
NOT_SHIPPED_SUFFIXES = (".pyc", ".so")  # bytecode and native builds are made on the user's machine
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def tree_files() -> set[str]:
    """Every file the wheel must hold, as its path in the wheel, from a glob of the checkout."""
    files = set()
    for source, target in SHIPPED.items():
        for path in (ROOT / source).rglob("*"):
            relative = path.relative_to(ROOT / source)
            shipped = not set(relative.parts) & set(NOT_SHIPPED) and path.suffix not in NOT_SHIPPED_SUFFIXES
            if path.is_file() and shipped:
                files.add(f"{target}/{relative.as_posix()}")
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from a copy of the checkout: a fresh copy, so no stale build/
    directory (setuptools copies whatever it holds into the wheel) can hide a missing file."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    ignore = shutil.ignore_patterns(*NOT_SHIPPED, *(f"*{s}" for s in NOT_SHIPPED_SUFFIXES))
    for name in SHIPPED:
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in BUILD_INPUTS:
        shutil.copy2(ROOT / name, source / name)
    # -v: pip shows the build backend's output, and so setuptools' warnings, only when verbose
    done = subprocess.run([*PIP, "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                           "-w", str(work / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = [line for line in (done.stdout + done.stderr).splitlines() if "Warning:" in line]
    assert not warnings, "the build warns (SetuptoolsDeprecationWarning and the like):\n" + "\n".join(warnings)
    [built] = (work / "dist").glob("qmoe-*.whl")
    return built


@pytest.mark.slow
def test_wheel_ships_every_file_of_the_tree_and_the_license(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    expected = tree_files()
    assert {"qmoe_cli/__init__.py", "qmoe_cli/cli.py", "qmoe_cli/configs/tiny-switch.toml",
            "qmoe_cli/native/codec.cpp", "qmoe_cli/assets/tiny-switch/model.safetensors"} <= expected  # the glob works
    assert not expected - names, f"files of the tree missing from the wheel: {sorted(expected - names)}"
    extra = {n for n in names - expected if ".dist-info/" not in n}
    assert not extra, f"the wheel holds files that are not in the tree: {sorted(extra)}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata, metadata[:2000]


def quick_start(readme: str) -> list[tuple[str, list[str]]]:
    """The quick start's console block: (command, the stdout lines it shows) for each `$ ` line."""
    section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```console\n(.*?)```", section, re.DOTALL)
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def squeeze(lines: list[str]) -> list[str]:
    """Lines compared with runs of blanks as one (the README may not keep a table's column padding)
    and the thread count the header reports as N: the README shows 2, the test runs 1, and the
    figures are the same (the next line of the README says which thread counts may move them)."""
    return [re.sub(r"\(\d+ CPU threads?\)", "(N CPU threads)", " ".join(line.split())) for line in lines if line.strip()]


def results_row(readme: str, method: str, bits: str) -> list[str]:
    """The cells of README's results table row for `method`, `bits`."""
    [row] = re.findall(rf"^\| {method} \| {bits} \|(.*)\|$", readme, re.MULTILINE)
    return [cell.strip() for cell in row.split("|")]


@pytest.mark.slow
def test_installed_wheel_runs_the_readme_quick_start_as_printed(wheel: Path, tmp_path: Path) -> None:
    """Installed with `pip install --target` and run with only that directory on the path (cwd
    elsewhere, so the checkout is not importable), with a fresh extension cache so the C++ codec is
    compiled from the installed sources, as on a new machine."""
    target, cwd, cache = tmp_path / "site", tmp_path / "work", tmp_path / "torch_extensions"
    cwd.mkdir()
    done = subprocess.run([*PIP, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    # OMP_NUM_THREADS: fixed, since LAPACK's threaded factorizations may round differently at other
    # counts, which GPTQ can carry into the codes (the README's figures are the same with 1 and 2
    # threads). One thread: beside the other test worker, a second OpenMP thread mostly spin-waits
    # (3x the CPU time for the same result).
    env = {**os.environ, "PYTHONPATH": str(target), "TORCH_EXTENSIONS_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    qmoe = str(target / "bin" / "qmoe")

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
        return done

    where = run([sys.executable, "-c", "import qmoe_cli; print(qmoe_cli.__file__)"]).stdout.strip()
    assert Path(where).is_relative_to(target), where
    assert run([qmoe, "--version"]).stdout.strip() == "qmoe, version " + run(
        [sys.executable, "-c", "import qmoe_cli; print(qmoe_cli.__version__)"]).stdout.strip()
    listed = {line.split()[0] for line in run([qmoe, "presets"]).stdout.splitlines()}
    assert listed == {p.stem for p in (ROOT / "configs").glob("*.toml")}

    readme = (ROOT / "README.md").read_text()
    steps = quick_start(readme)
    assert [shlex.split(command)[:2] for command, _ in steps] == [["qmoe", "compress"], ["qmoe", "eval"]]
    printed = {}
    for command, shown in steps:
        argv = shlex.split(command)
        done = run([qmoe, *argv[1:]])
        assert squeeze(done.stdout.splitlines()) == squeeze(shown), f"README shows, for `{command}`:\n" + "\n".join(
            shown) + f"\nthe run printed:\n{done.stdout}"
        printed[argv[1]] = done
    # the first compress on a fresh cache compiled the codec from the installed kernels/ sources
    assert "building the C++ codec" in printed["compress"].stderr, printed["compress"].stderr
    assert len(list(cache.glob("qmoe_codec-*/built"))) == 1  # the stamp of a finished build (its seconds)
    assert "could not be built" not in printed["compress"].stderr

    # The results table's quick-start row is the run's: the loss eval printed, the packed sizes.
    [loss] = re.findall(r"^\S+\s+\d+\s+\d+\s+(\d+\.\d+)\s+\S+$", printed["eval"].stdout, re.MULTILINE)
    packed = next(Path(cwd).glob("*-packed"))
    info = json.loads(run([qmoe, "info", str(packed), "--json"]).stdout)
    row = results_row(readme, "gptq", "ternary")
    assert row[0] == loss
    assert row[1:4] == [f"{info[k]:.3f}" for k in ("bits_per_weight_codes", "bits_per_weight_all_in",
                                                  "entropy_bits_per_weight")]
