"""Every file qmoe writes gets the mode the umask asks for (safetensors' `save_file` alone makes 0600
files, which other users of a cluster cannot read)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_tiny_tokenizer_json
from test_compress import _calib

from qmoe_cli.arch.switch.config import SwitchConfig
from qmoe_cli.arch.switch.model import random_model, save_pretrained
from qmoe_cli.cli import main


def _modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_every_written_file_honours_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    config = SwitchConfig(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=2,
                          num_decoder_layers=2, num_experts=2, encoder_sparse_step=2, decoder_sparse_step=2)
    calib = _calib(tmp_path / "calib.jsonl", samples=4, length=8)
    old = os.umask(umask)
    try:
        save_pretrained(random_model(config), tmp_path / "model")
        saved = _modes(tmp_path / "model")
        # a source file only its owner may read: its copy still gets the umask's mode
        os.chmod(write_tiny_tokenizer_json(tmp_path / "model"), 0o600)
        result = CliRunner().invoke(main, ["compress", "--model", str(tmp_path / "model"), "--calib", str(calib),
                                           "--out", str(tmp_path / "q"), "--pack", "--device", "cpu"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert saved == {"config.json": mode, "model.safetensors": mode}
    for directory in ("q", "q-packed"):
        modes = _modes(tmp_path / directory)
        assert {"manifest.json", "tokenizer.json", "head.safetensors"} <= modes.keys()
        assert modes == dict.fromkeys(modes, mode), directory
