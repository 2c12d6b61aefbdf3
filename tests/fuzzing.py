"""What the checkpoint fuzz tests share (`test_packed_fuzz.py`, `test_quantized_fuzz.py`): a
checkpoint's outputs on fixed samples, one random byte mutation of a file, and the rule every
case is held to — a clean `QmoeError`, or outputs exactly the original's."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from qmoe_cli.errors import QmoeError
from qmoe_cli.formats.open import open_model
from qmoe_cli.run.stream import RunConfig, streamed_losses

RUN = RunConfig(device=torch.device("cpu"), dtype=torch.float32, progress=False)
INPUTS = [[5, 9, 13, 21, 34, 1], [7, 11, 3, 1]]
LABELS = [[8, 12, 1], [4, 6, 10, 1]]


def outputs(directory: Path) -> torch.Tensor:
    """Per-sample losses [2] fp64 of the checkpoint in `directory` on two fixed samples."""
    model = open_model(str(directory))
    try:
        loss, _ = streamed_losses(model.weights, INPUTS, LABELS, RUN)
    finally:
        model.weights.close()
    return loss


def mutate(path: Path, rnd: random.Random) -> str:
    """Flip one bit, truncate, or extend `path` in place; says which."""
    data = bytearray(path.read_bytes())
    action = rnd.choices(["flip", "truncate", "extend"], weights=[7, 2, 1])[0]
    if action == "flip":
        at = rnd.randrange(len(data))
        data[at] ^= 1 << rnd.randrange(8)
        detail = f"flip byte {at}"
    elif action == "truncate":
        cut = rnd.randrange(len(data))
        del data[cut:]
        detail = f"truncate to {cut}"
    else:
        data += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))
        detail = "extend"
    path.write_bytes(bytes(data))
    return f"{path.name}: {detail}"


def fuzz_files(directory: Path, weights: dict[Path, int], seed: int, cases: int) -> dict[str, int]:
    """`cases` random mutations (`mutate`) of files of `directory` drawn by `weights`, each run
    (`check_outcome`) and restored; returns the outcomes, after checking the restored checkpoint
    gives its reference outputs again."""
    reference = outputs(directory)
    files = sorted(weights)
    rnd = random.Random(seed)
    outcomes = {"error": 0, "harmless": 0}
    for case in range(cases):
        path = rnd.choices(files, weights=[weights[f] for f in files])[0]
        original = path.read_bytes()
        what = f"case {case} ({mutate(path, rnd)})"
        try:
            check_outcome(directory, reference, what, outcomes)
        finally:
            path.write_bytes(original)
    assert torch.equal(outputs(directory), reference)
    return outcomes


def check_outcome(directory: Path, reference: torch.Tensor, what: str, outcomes: dict[str, int]) -> None:
    """Run the (mutated) checkpoint: a `QmoeError` counts as "error", outputs equal to
    `reference` as "harmless"; anything else (another exception, other outputs) fails the test."""
    try:
        output = outputs(directory)
    except QmoeError:
        outcomes["error"] += 1
    except Exception as exc:  # noqa: BLE001 - anything but a clean error fails the test
        pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
    else:
        assert torch.equal(output, reference), f"{what} silently changed the model"
        outcomes["harmless"] += 1
