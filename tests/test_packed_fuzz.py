"""Fuzzing the packed checkpoint: flipped, truncated and extended bytes anywhere in it.

Every case must end in a clean `QmoeError` or in a model whose output is exactly the original's
(a flip the format makes harmless, e.g. in manifest whitespace) — never another exception, a
crash, a hang or a silently different model. Files are mutated in place and restored.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_compress import _calib, _model

from qmoe_cli.cli import main
from qmoe_cli.errors import QmoeError
from qmoe_cli.formats.open import open_model
from qmoe_cli.run.stream import RunConfig, streamed_losses

CASES = 300
RUN = RunConfig(device=torch.device("cpu"), dtype=torch.float32, progress=False)
INPUTS = [[5, 9, 13, 21, 34, 1], [7, 11, 3, 1]]
LABELS = [[8, 12, 1], [4, 6, 10, 1]]


def _outputs(directory: Path) -> torch.Tensor:
    model = open_model(str(directory))
    try:
        loss, _ = streamed_losses(model.weights, INPUTS, LABELS, RUN)
    finally:
        model.weights.close()
    return loss


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    model, calib = _model(root / "model", experts=4, layers=2), _calib(root / "calib.jsonl")
    runner = CliRunner()
    result = runner.invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--out",
                                  str(root / "q"), "--pack", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root / "q-packed"


def _mutate(path: Path, rnd: random.Random) -> str:
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


def test_every_corruption_is_a_clean_error_or_harmless(packed: Path) -> None:
    reference = _outputs(packed)
    files = sorted(p for p in packed.rglob("*") if p.is_file())
    # weight the small, structured files up: the manifest and dictionary matter most
    weights = [8 if p.name == "manifest.json" else 4 if p.parent.name.startswith(("encoder", "decoder")) or
               p.name == "dictionary.safetensors" else 1 for p in files]
    rnd = random.Random(1234)
    outcomes = {"error": 0, "harmless": 0}
    for case in range(CASES):
        path = rnd.choices(files, weights=weights)[0]
        original = path.read_bytes()
        what = _mutate(path, rnd)
        try:
            output = _outputs(packed)
        except QmoeError:
            outcomes["error"] += 1
        except Exception as exc:  # noqa: BLE001 - anything but a clean error fails the test
            pytest.fail(f"case {case} ({what}): {type(exc).__name__}: {exc}")
        else:
            assert torch.equal(output, reference), f"case {case} ({what}) silently changed the model"
            outcomes["harmless"] += 1
        finally:
            path.write_bytes(original)
    assert outcomes["error"] > CASES * 0.9, outcomes
    assert torch.equal(_outputs(packed), reference)


def test_cli_reports_corruption_in_one_line(packed: Path) -> None:
    group = next(packed.glob("experts/*/group-*.safetensors"))
    original = group.read_bytes()
    try:
        group.write_bytes(original[:-3])
        result = CliRunner().invoke(main, ["info", str(packed), "--verify"])
    finally:
        group.write_bytes(original)
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "checksum mismatch" in result.output
