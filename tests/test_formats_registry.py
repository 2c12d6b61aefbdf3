"""The format registry (`formats.registry`) and the original format's typed description
(`formats.original.OriginalManifest`): which format a directory holds, what `qmoe info` says of an
original checkpoint, and the weight files found and checked in one place. CPU only, no model runs:
the shipped tiny-mixtral directory is read, never written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qmoe_cli.cli import main
from qmoe_cli.errors import QmoeError
from qmoe_cli.formats import registry
from qmoe_cli.formats.original import OriginalManifest, WeightFiles, find_weight_files
from qmoe_cli.resources import package_dir

TINY = package_dir() / "assets" / "tiny-mixtral"


def test_detect_tells_every_format_apart(tmp_path: Path) -> None:
    assert registry.detect(str(TINY)) is registry.ORIGINAL
    assert registry.detect("tiny-switch") is registry.ORIGINAL  # a preset names an original checkpoint
    for kind in ("quantized", "packed"):
        directory = tmp_path / kind
        directory.mkdir()
        (directory / "manifest.json").write_text(json.dumps({"kind": kind}))
        assert registry.detect(str(directory)) is registry.FORMATS[kind]
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "manifest.json").write_text(json.dumps({"kind": "gguf"}))
    assert registry.detect(str(unknown)) is registry.QUANTIZED  # whose check names the kind it reads
    with pytest.raises(QmoeError, match="not a checkpoint directory"):
        registry.detect(str(tmp_path))
    assert sorted(registry.FORMATS) == ["original", "packed", "quantized"]


def test_original_manifest_reads_config_architecture_and_weight_files() -> None:
    manifest = OriginalManifest.read(TINY)
    assert manifest.family == manifest.arch.family == "mixtral" == manifest.config["model_type"]
    assert manifest.weights == WeightFiles(("model.safetensors",), None) and manifest.weights.layout == "safetensors"
    assert manifest.quantization is None and manifest.directory == TINY


def test_weight_files_from_an_index_are_checked_once(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    with pytest.raises(QmoeError, match="shard 'b.safetensors' is listed but missing"):
        find_weight_files(tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"")
    files = find_weight_files(tmp_path)
    assert files.shards == ("a.safetensors", "b.safetensors") and files.index == {"x": "a.safetensors",
                                                                                  "y": "b.safetensors"}
    index.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(QmoeError, match="lists no tensors"):
        find_weight_files(tmp_path)
    with pytest.raises(ValueError, match="WeightFiles.shards"):
        WeightFiles(("../a.safetensors",), None)
    with pytest.raises(ValueError, match="one shard"):
        WeightFiles(("a.safetensors", "b.safetensors"), None)


def test_info_describes_an_original_checkpoint(tmp_path: Path) -> None:
    info = json.loads(CliRunner().invoke(main, ["info", str(TINY), "--json"]).stdout)
    assert info["kind"] == "original" and info["family"] == "mixtral" and info["dtype"] == "float32"
    assert info["files"] == ["model.safetensors"] and info["experts"] == 8 and info["sparse_blocks"] == 4
    assert info["total_bytes"] == sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    text = CliRunner().invoke(main, ["info", str(TINY)]).stdout
    assert text.startswith(f"{TINY}: original checkpoint (mixtral, float32), 1 safetensors shard, ")
    refused = CliRunner().invoke(main, ["info", str(TINY), "--verify"])
    assert refused.exit_code == 2 and "records no checksums" in refused.stderr
    copy = tmp_path / "copy"
    shutil.copytree(TINY, copy)
    (copy / "config.json").unlink()
    missing = CliRunner().invoke(main, ["info", str(copy)])
    assert missing.exit_code == 1 and "not a checkpoint directory" in missing.stderr
