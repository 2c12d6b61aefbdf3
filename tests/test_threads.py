"""`--threads`: the default is the cores this process may use (affinity, cgroup quota, shared
among torchrun's local ranks), the choice is applied to torch and reported in `--json`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qmoe_cli import threads
from qmoe_cli.cli import main


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /proc/self/cgroup and /sys/fs/cgroup tree."""
    proc_file = tmp_path / "cgroup"
    proc_file.write_text(proc)
    root = tmp_path / "fs"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return proc_file, root


def test_cgroup_v2_quota_is_the_smallest_on_the_path(tmp_path: Path) -> None:
    proc, root = _cgroup(tmp_path, "0::/job/step\n", {"job/cpu.max": "150000 100000\n",
                                                      "job/step/cpu.max": "max 100000\n", "cpu.max": "max 100000\n"})
    assert threads.cgroup_cpu_limit(proc, root) == 1.5


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    proc, root = _cgroup(tmp_path, "4:memory:/x\n3:cpu,cpuacct:/slurm/job\n",
                         {"cpu,cpuacct/slurm/job/cpu.cfs_quota_us": "300000\n",
                          "cpu,cpuacct/slurm/job/cpu.cfs_period_us": "100000\n",
                          "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert threads.cgroup_cpu_limit(proc, root) == 3.0


def test_no_quota_or_no_cgroup_files(tmp_path: Path) -> None:
    proc, root = _cgroup(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert threads.cgroup_cpu_limit(proc, root) is None
    assert threads.cgroup_cpu_limit(tmp_path / "absent", root) is None


@pytest.mark.parametrize("affinity,quota,expected", [(8, None, 8), (8, 1.5, 2), (8, 0.2, 1), (2, 16.0, 2)])
def test_usable_cores(affinity: int, quota: float | None, expected: int) -> None:
    assert threads.usable_cores(affinity, quota) == expected


def test_default_shares_cores_among_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 12.0)
    assert threads.default_threads({}) == 12
    assert threads.default_threads({"OMP_NUM_THREADS": "3"}) == 3  # the user's, outside torchrun
    # torchrun sets OMP_NUM_THREADS=1 for every rank on its own: not a user's choice
    assert threads.default_threads({"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}) == 3
    assert threads.default_threads({"LOCAL_WORLD_SIZE": "32"}) == 1


def test_eval_sets_and_reports_threads() -> None:
    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(main, ["eval", "--samples", "2", "--device", "cpu", "--threads", "1", "--json"])
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["threads"] == 1 and torch.get_num_threads() == 1
        result = CliRunner().invoke(main, ["eval", "--samples", "2", "--device", "cpu", "--json"],
                                    env={"OMP_NUM_THREADS": None, "LOCAL_WORLD_SIZE": None})
        expected = threads.usable_cores(len(os.sched_getaffinity(0)), threads.cgroup_cpu_limit())
        assert json.loads(result.stdout)["threads"] == expected == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
