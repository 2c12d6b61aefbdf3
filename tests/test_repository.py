"""What a newcomer meets before reading any code: `make test`'s output, the quick start's files,
the README's numbers."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qmoe_cli.cli import eval_command

ROOT = Path(__file__).resolve().parent.parent
PROBE = '''
import pytest

def test_passes():
    pass

@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_on_a_gpu():
    pass
'''


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_prints_the_summary_and_why_tests_skip(tmp_path: Path) -> None:
    """`make test`'s own pytest command line, run on a probe file with the project's configuration."""
    lines = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    [command] = [shlex.split(line) for line in lines.splitlines() if " -m pytest " in line]
    assert command[-1] == "tests"
    settings = dict(word.split("=", 1) for word in command if re.fullmatch(r"[A-Z_]+=\S*", word))  # VAR=value first
    command = command[len(settings):]
    (tmp_path / "test_probe.py").write_text(PROBE)
    probe = [sys.executable, *command[1:-1], "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
             str(tmp_path)]
    done = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **settings})
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^1 passed, 1 skipped", done.stdout, re.MULTILINE), done.stdout
    assert "SKIPPED [1]" in done.stdout and "needs a CUDA GPU" in done.stdout, done.stdout


def test_quick_start_outputs_are_ignored_by_git() -> None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    outputs = ["tiny-switch-gptq-ternary/", "tiny-switch-gptq-ternary-packed/", "tiny-switch-rtn-2/",
               ".tiny-switch-gptq-ternary.partial/", ".tiny-switch-gptq-ternary.lock"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == outputs
    kept = subprocess.run(["git", "check-ignore", "--no-index", "qmoe_cli/", "configs/tiny-switch.toml"], cwd=ROOT)
    assert kept.returncode == 1  # nothing of the project's own is ignored


def test_readme_results_use_eval_default_samples() -> None:
    """The quick start's `qmoe eval` reproduces the README table's number: same sample count."""
    default = next(p.default for p in eval_command.params if p.name == "samples")
    readme = (ROOT / "README.md").read_text()
    quoted = re.findall(r"(\d+) validation samples", readme)
    assert quoted and all(int(n) == default for n in quoted), quoted
