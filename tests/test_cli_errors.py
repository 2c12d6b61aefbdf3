"""Bad input ends in a one-line `error:` message naming the culprit, and the right exit code."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner
from hf_models import save_hf_switch
from test_compress import _calib, _model

from qmoe_cli.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_hf_switch(tmp_path_factory.mktemp("model") / "m", vocab=96)


def _eval(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["eval", "--device", "cpu", *args])
    return result.exit_code, result.stderr


def _assert_one_line_error(code: int, stderr: str, expected_code: int, *fragments: str) -> None:
    assert code == expected_code, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr  # notes may precede it
    assert not any(line.startswith(("Error:", "Usage:", "Try ")) for line in stderr.splitlines()), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def _pretokenized(tmp_path: Path, rows: list[dict], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD_ROW = {"input_ids": [5, 6, 7, 1], "labels": [8, 9, 1]}


def test_missing_model(tmp_path: Path) -> None:
    """A path that names nothing is a usage error said as such, never a failed hub download."""
    code, err = _eval("--model", str(tmp_path / "nowhere"))
    _assert_one_line_error(code, err, 2, "--model", "nowhere", "no such directory")
    assert "hub" not in err


def test_unknown_preset_suggests_the_closest() -> None:
    code, err = _eval("--model", "switch-base-7")
    _assert_one_line_error(code, err, 2, "--model switch-base-7", "did you mean switch-base-8", "qmoe presets")


def test_directory_without_weights(tmp_path: Path, model_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(model_dir / "config.json", empty)
    code, err = _eval("--model", str(empty), "--data", str(_pretokenized(tmp_path, [GOOD_ROW])))
    _assert_one_line_error(code, err, 1, str(empty), "no model weights found")


def test_missing_tensor_in_shard(tmp_path: Path, model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    state = load_file(broken / "model.safetensors")
    del state["decoder.block.1.layer.2.mlp.router.classifier.weight"]
    save_file(state, broken / "model.safetensors")
    code, err = _eval("--model", str(broken), "--data", str(_pretokenized(tmp_path, [GOOD_ROW])))
    _assert_one_line_error(code, err, 1, "decoder.block.1.layer.2.mlp.router.classifier.weight", "missing")


def test_index_naming_a_missing_shard(tmp_path: Path, model_dir: Path) -> None:
    broken = tmp_path / "sharded"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"shared.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = _eval("--model", str(broken), "--data", str(_pretokenized(tmp_path, [GOOD_ROW])))
    _assert_one_line_error(code, err, 1, "model-00002-of-00002.safetensors", "missing")


def test_truncated_safetensors(tmp_path: Path, model_dir: Path) -> None:
    broken = tmp_path / "truncated"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _eval("--model", str(broken), "--data", str(_pretokenized(tmp_path, [GOOD_ROW])))
    _assert_one_line_error(code, err, 1, "model.safetensors", "truncated")


def test_garbage_safetensors_header(tmp_path: Path, model_dir: Path) -> None:
    broken = tmp_path / "garbage"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    code, err = _eval("--model", str(broken), "--data", str(_pretokenized(tmp_path, [GOOD_ROW])))
    _assert_one_line_error(code, err, 1, "model.safetensors", "not valid JSON")


def test_data_file_not_jsonl(tmp_path: Path, model_dir: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD_ROW) + "\nthis is not json\n")
    code, err = _eval("--model", str(model_dir), "--data", str(data))
    _assert_one_line_error(code, err, 1, "data.jsonl", "line 2")


def test_empty_data_file(tmp_path: Path, model_dir: Path) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    code, err = _eval("--model", str(model_dir), "--data", str(data))
    _assert_one_line_error(code, err, 1, "empty.jsonl", "no usable samples")


def test_missing_data_file(tmp_path: Path, model_dir: Path) -> None:
    code, err = _eval("--model", str(model_dir), "--data", str(tmp_path / "absent.jsonl"))
    _assert_one_line_error(code, err, 2, "--data", "absent.jsonl", "no such file")


def test_pretokenized_sample_longer_than_window(tmp_path: Path, model_dir: Path) -> None:
    data = _pretokenized(tmp_path, [GOOD_ROW, {"input_ids": [5] * 600 + [1], "labels": [8, 1]}])
    code, err = _eval("--model", str(model_dir), "--data", str(data))
    _assert_one_line_error(code, err, 1, "line 2", "601 tokens", "window is 512")


def test_text_data_without_tokenizer(tmp_path: Path, model_dir: Path) -> None:
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    code, err = _eval("--model", str(model_dir), "--data", str(data))
    _assert_one_line_error(code, err, 1, "text.jsonl line 1", "no tokenizer")


def test_bad_flag_values_are_usage_errors(model_dir: Path) -> None:
    code, err = _eval("--model", str(model_dir), "--samples", "0")
    _assert_one_line_error(code, err, 2, "--samples")
    code, err = _eval("--model", str(model_dir), "--device", "cuda:7", "--data", "x.jsonl")
    assert code in (1, 2) and "Traceback" not in err


def test_debug_shows_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "nowhere"), "--debug"])
    assert result.exit_code == 1 and result.exception is not None


# --- usage errors: one line, exit 2 -------------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["eval", "--samples", "0"], "--samples"),
    (["eval", "--no-such-flag"], "--no-such-flag"),
    (["eval", "--device", "foo"], "--device"),
    (["compress", "--device", "foo", "--out", "x"], "--device"),
    (["eval", "--device", "mps"], "--device"),
    (["compress", "--out", ""], "--out"),
    (["pack", ".", "--out", ""], "--out"),
    (["eval", "--threads", "0"], "--threads"),
])
def test_usage_errors_are_one_line(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(main, args)
    _assert_one_line_error(result.exit_code, result.stderr, 2, fragment)
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_invalid_json_message_says_at_once(tmp_path: Path, model_dir: Path) -> None:
    data = tmp_path / "control.jsonl"
    data.write_text('{"text": "a\tb"}\n')
    code, err = _eval("--model", str(model_dir), "--data", str(data))
    _assert_one_line_error(code, err, 1, "control.jsonl line 1", "Invalid control character at column")
    assert "at at" not in err


# --- the filesystem says no: one line, exit 1 ---------------------------------------------------

def test_pack_of_a_file_is_one_line(tmp_path: Path) -> None:
    some_file = tmp_path / "some-file"
    some_file.write_text("not a checkpoint")
    result = CliRunner().invoke(main, ["pack", str(some_file)])
    _assert_one_line_error(result.exit_code, result.stderr, 1, str(some_file), "not a directory")


# /sys refuses new entries to everyone, root included (a chmod-ed directory does not stop root).
@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, where nobody may create files")
def test_out_in_an_unwritable_directory_is_one_line(compress_setup: tuple[Path, Path], quantized_dir: Path) -> None:
    model, calib = compress_setup
    result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--device", "cpu",
                                       "--out", "/sys/kernel/qmoe-out"])
    _assert_one_line_error(result.exit_code, result.stderr, 1, "/sys/kernel/")
    result = CliRunner().invoke(main, ["pack", str(quantized_dir), "--out", "/sys/kernel/qmoe-packed"])
    _assert_one_line_error(result.exit_code, result.stderr, 1, "/sys/kernel/")


@pytest.fixture(scope="module")
def compress_setup(tmp_path_factory) -> tuple[Path, Path]:
    """A small random Switch model (every block sparse) and its calibration file."""
    root = tmp_path_factory.mktemp("compress")
    return _model(root / "model"), _calib(root / "calib.jsonl")


def _compress(setup: tuple[Path, Path], out: Path, *extra: str):
    model, calib = setup
    return CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--out", str(out),
                                     "--device", "cpu", "--json", *extra])


NO_SPACE = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _disk_full_on(monkeypatch: pytest.MonkeyPatch, fails: Callable[[str], bool]) -> None:
    """safetensors' writer raises what it raises on a full disk for the files `fails` picks."""
    from safetensors import SafetensorError

    from qmoe_cli import files

    real = files.save_file

    def save_file(tensors, path, metadata=None):
        if fails(str(path)):
            raise SafetensorError(NO_SPACE)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(files, "save_file", save_file)


def test_disk_full_during_compress_leaves_a_resumable_run(compress_setup, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "q"
    _disk_full_on(monkeypatch, lambda path: "decoder-000" in path and "experts" in path)  # the 3rd sparse block
    result = _compress(compress_setup, out)
    _assert_one_line_error(result.exit_code, result.stderr, 1, ".q.partial", "No space left on device", "--resume")
    partial = json.loads((tmp_path / ".q.partial" / "manifest.json").read_text())
    assert len(partial["finished"]) == 2 and not out.exists()
    monkeypatch.undo()
    result = _compress(compress_setup, out, "--resume")
    assert result.exit_code == 0, result.stderr
    assert "resuming: 2 sparse blocks already done" in result.stderr
    assert json.loads(result.stdout)["threads"] >= 1
    assert not (tmp_path / ".q.partial").exists() and not (tmp_path / ".q.lock").exists()


@pytest.fixture(scope="module")
def quantized_dir(compress_setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "q"
    assert _compress(compress_setup, out, "--method", "rtn").exit_code == 0
    return out


@pytest.mark.parametrize("writer", ["copy", "safetensors"])
def test_disk_full_during_pack_leaves_nothing(quantized_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             writer: str) -> None:
    if writer == "copy":
        def copyfile(src, dst, *, follow_symlinks=True):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as shutil's sendfile copy raises it
        monkeypatch.setattr(shutil, "copyfile", copyfile)
    else:
        _disk_full_on(monkeypatch, lambda path: "experts" in path)
    out = tmp_path / "p"
    result = CliRunner().invoke(main, ["pack", str(quantized_dir), "--out", str(out)])
    _assert_one_line_error(result.exit_code, result.stderr, 1, str(out), "No space left on device", "qmoe pack")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no .p.partial, no lock


def test_resume_after_an_interrupted_pack_stage_points_to_qmoe_pack(compress_setup, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from qmoe_cli.compress import pack

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pack, "_copy_dense", interrupted)  # Ctrl-C while packing
    out = tmp_path / "q"
    result = _compress(compress_setup, out, "--method", "rtn", "--pack")
    assert result.exit_code == 130 and out.is_dir() and not (tmp_path / "q-packed").exists()
    assert f"qmoe pack {out}" in result.stderr
    monkeypatch.undo()
    result = _compress(compress_setup, out, "--method", "rtn", "--pack", "--resume")
    _assert_one_line_error(result.exit_code, result.stderr, 1, "already complete", f"qmoe pack {out}")


# --- concurrent runs on one --out ---------------------------------------------------------------

def test_concurrent_compress_runs_on_one_out_are_refused(tmp_path: Path) -> None:
    """A second run, plain or --resume, while the first is alive is refused naming its pid, and
    leaves nothing behind; SIGKILL of the first leaves no stale lock: --resume then finishes.
    The first run (at the lowest priority) is stopped with SIGSTOP as soon as its partial output
    appears, so it holds the lock, alive, for as long as the checks take."""
    model = _model(tmp_path / "model", experts=8, layers=2, d_model=64, d_ff=128)
    calib = _calib(tmp_path / "calib.jsonl", samples=16, length=32)
    out = tmp_path / "out"
    command = ["compress", "--model", str(model), "--calib", str(calib), "--device", "cpu", "--group-size", "3",
               "--threads", "1", "--out", str(out)]
    first = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "qmoe_cli", *command],
                             stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        manifest = tmp_path / ".out.partial" / "manifest.json"
        deadline = time.monotonic() + 120
        while not manifest.is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first run ended before the second could race it"
        for extra in ([], ["--resume"]):
            result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib),
                                               "--device", "cpu", "--out", str(out), *extra])
            _assert_one_line_error(result.exit_code, result.stderr, 1,
                                   f"another qmoe compress (pid {first.pid}) is writing {out}")
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".out.lock", ".out.partial"]
        resumed = CliRunner().invoke(main, [*command, "--resume"])
        assert resumed.exit_code == 0, resumed.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.jsonl", "model", "out"]
    finally:
        first.kill()
        first.wait()


def test_concurrent_pack_is_refused(quantized_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from qmoe_cli.locks import output_lock\n"
                               "with output_lock(Path(sys.argv[1]), 'qmoe pack'):\n"
                               "    print('held', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        result = CliRunner().invoke(main, ["pack", str(quantized_dir), "--out", str(out)])
        _assert_one_line_error(result.exit_code, result.stderr, 1, f"another qmoe pack (pid {holder.pid}) is writing")
        assert not out.exists() and not (tmp_path / ".p.partial").exists()
    finally:
        holder.kill()
        holder.wait()
    result = CliRunner().invoke(main, ["pack", str(quantized_dir), "--out", str(out)])  # the OS released it
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


# --- defaults a newcomer meets ------------------------------------------------------------------

def test_a_copy_of_tiny_switch_evaluates_on_its_own_validation_file(tmp_path: Path) -> None:
    from qmoe_cli.resources import package_dir

    copy = tmp_path / "my-tiny-switch"
    shutil.copytree(package_dir() / "assets" / "tiny-switch", copy)
    result = CliRunner().invoke(main, ["eval", "--model", str(copy), "--samples", "4", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.stderr
    original = CliRunner().invoke(main, ["eval", "--samples", "4", "--device", "cpu", "--json"])
    assert json.loads(result.stdout)["datasets"] == json.loads(original.stdout)["datasets"]


def test_build_kernels_says_nothing_about_building_when_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.version, "cuda", None)
    result = CliRunner().invoke(main, ["build-kernels"])
    _assert_one_line_error(result.exit_code, result.stderr, 1, "CPU-only")
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if line.startswith("error:")]
