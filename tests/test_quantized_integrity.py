"""Quantized checkpoints are verified like packed ones: checksums of every file and of the manifest,
codes against the bit width, the manifest's config against the tensors, all before anything runs;
`qmoe eval`, `qmoe info --verify` and `qmoe pack` end bad input with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_compress import _calib, _model

from qmoe_cli.cli import main
from qmoe_cli.formats.integrity import file_record, manifest_digest

GROUP = "experts/encoder-000/group-00000.safetensors"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(a finished ternary checkpoint of a 4-expert model, its calibration file)."""
    root = tmp_path_factory.mktemp("integrity")
    model, calib = _model(root / "model", experts=4, layers=2), _calib(root / "calib.jsonl", samples=8)
    result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--calib-samples", "8",
                                       "--out", str(root / "q"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root / "q", calib


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _one_line_error(code: int, output: str, *fragments: str) -> None:
    assert code == 1, output
    assert output.startswith("error: ") and output.strip().count("\n") == 0, output
    for fragment in fragments:
        assert fragment in output, output


def _copy(built: tuple[Path, Path], target: Path) -> Path:
    shutil.copytree(built[0], target)
    return target


def _edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], None], *, reseal: bool) -> None:
    """Apply `edit` to the manifest; `reseal`: recompute every file record and the manifest checksum,
    so only the structural checks can tell."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if reseal:
        manifest["files"] = {name: file_record(directory / name) if (directory / name).is_file() else record
                             for name, record in manifest["files"].items()}
        manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def _all_commands_refuse(directory: Path, calib: Path, *fragments: str) -> None:
    """eval, info --verify and pack each end with the same one-line error; pack writes nothing."""
    out = directory.with_name(directory.name + "-packed")
    _one_line_error(*_cli("eval", "--model", str(directory), "--data", str(calib), "--samples", "8", "--device", "cpu"),
                    *fragments)
    _one_line_error(*_cli("info", str(directory), "--verify"), *fragments)
    _one_line_error(*_cli("pack", str(directory), "--out", str(out)), *fragments)
    assert not out.exists() and not list(directory.parent.glob(f".{out.name}*"))


def test_manifest_lists_every_file_and_info_verifies(built) -> None:
    directory, _ = built
    manifest = json.loads((directory / "manifest.json").read_text())
    files = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - {"manifest.json"}
    assert manifest["format_version"] == 2 and set(manifest["files"]) == files
    assert manifest["files"][GROUP] == file_record(directory / GROUP)
    assert manifest["manifest_sha256"] == manifest_digest(manifest)
    code, output = _cli("info", str(directory), "--verify")
    assert code == 0 and "quantized checkpoint" in output and "verified" in output


def test_changed_codes_are_a_checksum_error(built, tmp_path: Path) -> None:
    """The issue's reproduction: 200 bytes of expert_0.wi.codes set to 200."""
    directory = _copy(built, tmp_path / "q")
    tensors = load_file(directory / GROUP)
    tensors["expert_0.wi.codes"].view(-1)[:200] = 200
    save_file(tensors, str(directory / GROUP))
    _all_commands_refuse(directory, built[1], GROUP, "checksum mismatch")


def test_codes_beyond_the_bit_width_are_an_error_even_with_fresh_checksums(built, tmp_path: Path) -> None:
    directory = _copy(built, tmp_path / "q")
    tensors = load_file(directory / GROUP)
    tensors["expert_0.wi.codes"].view(-1)[:200] = 200
    save_file(tensors, str(directory / GROUP))
    _edit_manifest(directory, lambda m: None, reseal=True)
    _all_commands_refuse(directory, built[1], GROUP, "expert_0.wi: code 200 is beyond the ternary grid's largest, 2")


EDITS = {  # the edits, and others a manifest's numbers can suffer
    "layer_norm_epsilon 0.5": lambda m: m["config"].update(layer_norm_epsilon=0.5),
    "vocab_size 10": lambda m: m["config"].update(vocab_size=10),
    "d_ff 113": lambda m: m["config"].update(d_ff=113),
    "group_size 0": lambda m: m["settings"].update(group_size=0),
    "grid_group 32": lambda m: m["settings"].update(grid_group=32),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_manifest_is_a_checksum_error(built, tmp_path: Path, edit: str) -> None:
    directory = _copy(built, tmp_path / "q")
    _edit_manifest(directory, EDITS[edit], reseal=False)
    _all_commands_refuse(directory, built[1], "manifest.json: checksum mismatch")


@pytest.mark.parametrize("edit, fragments", [
    (lambda m: m["config"].update(vocab_size=10), ("head.safetensors", "shared.weight", "[10, 32]")),
    (lambda m: m["config"].update(d_ff=113), (GROUP, "expert_0.wi.codes", "[113, 32]")),
    (lambda m: m["config"].update(num_experts=3), ("router", "[3, 32]")),
    (lambda m: m["config"].update(num_layers=1), ("blocks/encoder-001.safetensors", "no part of the model")),
    (lambda m: m["config"].update(encoder_sparse_step=2), (GROUP, "no part of the model")),
    (lambda m: m["config"].update(layer_norm_epsilon=-1), ("layer_norm_epsilon",)),
    (lambda m: m["settings"].update(group_size=0), ("group_size",)),
    (lambda m: m["settings"].update(group_size=3), ("encoder-000/group-00001.safetensors", "not listed")),
    (lambda m: m["settings"].update(grid_group=32), (GROUP, "expert_0.wo.lo", "[32, 2]")),
    (lambda m: m["settings"].update(bits="2"), (GROUP, "scale")),
    (lambda m: m["settings"].pop("bits"), ("malformed manifest", "bits")),
    (lambda m: m["files"].pop(GROUP), (GROUP, "not listed")),
    (lambda m: m["files"].update({"../x": m["files"][GROUP]}), ("malformed manifest", "../x")),
    (lambda m: m.update(complete=False), ("incomplete", "--resume")),
], ids=["vocab_size", "d_ff", "num_experts", "num_layers", "sparse_step", "epsilon", "group_size-0", "group_size-3",
        "grid_group", "bits", "no-bits", "unlisted", "outside", "incomplete"])
def test_a_resealed_manifest_must_still_match_the_tensors(built, tmp_path: Path, edit, fragments) -> None:
    """Checksums recomputed after the edit: the config is checked against every tensor header."""
    directory = _copy(built, tmp_path / "q")
    _edit_manifest(directory, edit, reseal=True)
    _all_commands_refuse(directory, built[1], *fragments)


def test_old_format_versions_are_refused_clearly(built, tmp_path: Path) -> None:
    directory = _copy(built, tmp_path / "q")

    def version_1(manifest: dict[str, Any]) -> None:  # as qmoe wrote it before checksums
        manifest.update(format_version=1)
        del manifest["files"], manifest["manifest_sha256"]

    _edit_manifest(directory, version_1, reseal=False)
    _all_commands_refuse(directory, built[1], "format version 1", "compress the model again")


def test_resume_verifies_what_it_reads_back(built, tmp_path: Path) -> None:
    """A partial run resumed: finished blocks replayed from verified files give byte-identical
    output; a finished block's file corrupted since is an error, not a different model."""
    directory, calib = built
    command = ["compress", "--model", str(directory.parent / "model"), "--calib", str(calib), "--calib-samples", "8",
               "--device", "cpu"]
    for name, corrupt in (("clean", False), ("corrupt", True)):
        out = tmp_path / name
        partial = shutil.copytree(directory, tmp_path / f".{name}.partial")

        def unfinish(manifest: dict[str, Any]) -> None:  # killed in decoder.0: its files written, not yet listed
            manifest.update(complete=False, finished=manifest["finished"][:2])
            manifest["files"] = {n: r for n, r in manifest["files"].items() if not n.startswith("experts/decoder")}
            del manifest["calibration_loss"], manifest["blocks"]["decoder.0"], manifest["blocks"]["decoder.1"]

        _edit_manifest(partial, unfinish, reseal=True)
        (partial / "experts/decoder-001/group-00000.safetensors.tmp").write_bytes(b"half a file")
        if corrupt:
            with open(partial / GROUP, "r+b") as handle:
                handle.seek(-1, 2)
                handle.write(b"\x7f")
        code, output = _cli(*command, "--out", str(out), "--resume")
        if corrupt:
            assert output.startswith("resuming: 2 sparse blocks already done\n")
            _one_line_error(code, output.split("\n", 1)[1], GROUP, "checksum mismatch")
            assert not out.exists()
        else:
            assert code == 0, output
            assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == \
                {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
