"""Bad input ends in a one-line `error:` message naming the culprit, and the right exit code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hf_models import save_hf_switch

from qmoe_cli.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_hf_switch(tmp_path_factory.mktemp("model") / "m", vocab=96)


def _eval(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["eval", "--device", "cpu", *args])
    return result.exit_code, result.stderr


def _assert_one_line_error(code: int, stderr: str, expected_code: int, *fragments: str) -> None:
    assert code == expected_code, stderr
    errors = [line for line in stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, stderr  # notes may precede it; click usage errors add a usage line
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def _pretokenized(tmp_path: Path, rows: list[dict], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD_ROW = {"input_ids": [5, 6, 7, 1], "labels": [8, 9, 1]}


def test_missing_model(tmp_path: Path) -> None:
    code, err = _eval("--model", str(tmp_path / "nowhere"), "--data", "x.jsonl")
    _assert_one_line_error(code, err, 1, "nowhere", "not a model directory, a preset")


def test_unknown_preset_lists_known_ones() -> None:
    code, err = _eval("--model", "switch-base-7", "--data", "x.jsonl")
    _assert_one_line_error(code, err, 1, "switch-base-7", "switch-base-8", "switch-c2048")


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
    _assert_one_line_error(code, err, 1, "absent.jsonl")


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
