"""Killing a real `qmoe compress` process at a chosen point, for the kill -9 / `--resume` tests:
the file hashes a resumed run must match, and a kill that lands between sparse blocks."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import psutil


def tree_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def finished_blocks(partial: Path) -> int:
    """How many sparse blocks the partial output's manifest lists as finished (0 before it exists)."""
    try:
        return len(json.loads((partial / "manifest.json").read_text())["finished"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def kill_after_a_finished_block(command: list[str], partial: Path) -> int:
    """Run `command` and SIGKILL it once its partial manifest lists a finished sparse block;
    returns how many were finished. Once the partial directory appears, the run goes on in
    slices of ~2 ms between SIGSTOPs, at the lowest priority (so this process gets the CPU back
    on time): a tiny model compresses a block in tens of milliseconds, and the kill must land
    after the first one and before the last."""
    victim = subprocess.Popen(["nice", "-n", "19", *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process = psutil.Process(victim.pid)
    deadline = time.monotonic() + 120
    try:
        while not partial.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)  # imports and calibration data: seconds, nothing written yet
        while (finished := finished_blocks(partial)) == 0 and time.monotonic() < deadline:
            victim.send_signal(signal.SIGSTOP)
            while victim.poll() is None and process.status() != psutil.STATUS_STOPPED:
                time.sleep(0.0002)
            assert victim.poll() is None, "the run ended before a block finished"
            if finished_blocks(partial):
                continue
            victim.send_signal(signal.SIGCONT)
            time.sleep(0.002)
        assert finished, "no sparse block finished in 120 s"
    finally:
        victim.kill()
        victim.wait()
    assert victim.returncode == -signal.SIGKILL
    return finished
