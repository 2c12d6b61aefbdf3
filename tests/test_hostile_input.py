"""Hostile and broken input ends in the CLI contract (one `error:` line, exit 2 for the command
line, 1 for a bad file or the system, no traceback), checked before any work it would spoil:
files that contradict each other or the model, manifests pointing outside their checkpoint,
outputs that cannot be written, an unreachable or disabled hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import save_hf_switch
from test_cli_contract import assert_one_error_line
from test_compress import _calib, _model

from qmoe_cli.arch.presets import load_preset
from qmoe_cli.cli import main
from qmoe_cli.resources import package_dir

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ["--prompt", "the <extra_id_0> walks", "--device", "cpu", "--max-new-tokens", "2"]


def _tiny_switch_copy(target: Path) -> Path:
    shutil.copytree(package_dir() / load_preset("tiny-switch").local_dir, target)
    return target


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hostile")
    return _model(root / "model", layers=1), _calib(root / "calib.jsonl", samples=4)


@pytest.fixture(scope="module")
def packed_dir(small, tmp_path_factory) -> Path:
    model, calib = small
    out = tmp_path_factory.mktemp("packed") / "q"
    args = ["compress", "--model", str(model), "--calib", str(calib), "--out", str(out), "--device", "cpu",
            "--method", "rtn", "--pack"]
    assert CliRunner().invoke(main, args).exit_code == 0
    return out.with_name("q-packed")


# --- values that contradict the model ------------------------------------------------------------

def test_eos_id_outside_the_vocabulary(tmp_path: Path) -> None:
    model = _tiny_switch_copy(tmp_path / "m")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, vocab + 5]}))
    result = CliRunner().invoke(main, ["generate", "--model", str(model), *PROMPT])
    assert_one_error_line(result, 1, "generation_config.json", f"eos_token_id {vocab + 5}", f"{vocab} tokens")
    result = CliRunner().invoke(main, ["eval", "--model", str(model), "--device", "cpu", "--samples", "1"])
    assert result.exit_code == 0, result.stderr  # eval never reads EOS ids: the same model evaluates


def test_max_new_tokens_past_memory_is_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    from qmoe_cli.run import limits

    monkeypatch.setattr(limits, "host_memory_bytes", lambda: 1 << 30)  # any machine: a 1 GiB host
    result = CliRunner().invoke(main, ["generate", *PROMPT, "--max-new-tokens", "1000000000"])
    assert_one_error_line(result, 2, "--max-new-tokens 1000000000", "1.0 GiB", "give at most about")


@pytest.mark.parametrize("model", ["tiny-switch", "tiny-mixtral"])
def test_the_most_tokens_said_to_fit_do_fit(model: str) -> None:
    from qmoe_cli.errors import UsageError
    from qmoe_cli.formats.open import open_model
    from qmoe_cli.run.limits import check_cache_fits, generation_cache_bytes

    arch, memory = open_model(model).weights.arch, 3 << 28
    with pytest.raises(UsageError) as info:
        check_cache_fits(arch, 3, 17, 10**9, torch.float32, memory)
    fits = int(str(info.value).split("give at most about ")[1].split(",")[0])
    check_cache_fits(arch, 3, 17, fits, torch.float32, memory)  # does not raise
    assert generation_cache_bytes(arch, 3, 17, fits, torch.float32) <= memory
    assert generation_cache_bytes(arch, 3, 17, fits + 1, torch.float32) > memory


def test_config_contradicting_the_weights(small, tmp_path: Path) -> None:
    model, calib = small
    broken = tmp_path / "big"
    shutil.copytree(model, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "d_model": 10**9}))
    for command in (["eval", "--data"], ["compress", "--out", str(tmp_path / "q"), "--calib"]):
        result = CliRunner().invoke(main, [command[0], "--model", str(broken), "--device", "cpu", *command[1:],
                                           str(calib)])
        assert_one_error_line(result, 1, "config.json", "1000000000", "[64, 32]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]  # compress wrote nothing


def test_unknown_family_suggests_the_closest(small, tmp_path: Path) -> None:
    model, calib = small
    broken = tmp_path / "m"
    shutil.copytree(model, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "switch_transformer"}))
    result = CliRunner().invoke(main, ["eval", "--model", str(broken), "--device", "cpu", "--data", str(calib)])
    assert_one_error_line(result, 1, "config.json", "did you mean switch_transformers")


@pytest.mark.parametrize("content", ["garbage", "code"])
def test_unreadable_pickle_weights_are_a_bad_file(tmp_path: Path, content: str) -> None:
    model = save_hf_switch(tmp_path / "m", vocab=64)
    (model / "model.safetensors").unlink()
    weights = model / "pytorch_model.bin"
    if content == "garbage":
        weights.write_bytes(b"not a pickle at all")
    else:  # a pickle that would run code: weights_only refuses it
        torch.save({"shared.weight": torch.zeros(2), "hook": Path("x")}, weights)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input_ids": [5, 6, 1], "labels": [7, 1]}) + "\n")
    result = CliRunner().invoke(main, ["eval", "--model", str(model), "--device", "cpu", "--data", str(data)])
    assert_one_error_line(result, 1, "pytorch_model.bin", "not a readable PyTorch checkpoint")


# --- manifests confined to their checkpoint ------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x/tokenizer.json", "/etc/hostname", "sub/../../tokenizer.json"])
def test_packed_manifest_record_outside_the_checkpoint(packed_dir: Path, tmp_path: Path, name: str) -> None:
    from qmoe_cli.formats.integrity import file_record, manifest_digest

    broken = tmp_path / "p"
    shutil.copytree(packed_dir, broken)
    outside = tmp_path / "x" / "tokenizer.json"
    outside.parent.mkdir()
    outside.write_text("{}")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["files"][name] = file_record(outside)
    manifest["manifest_sha256"] = manifest_digest(manifest)  # re-signed: the digest holds
    (broken / "manifest.json").write_text(json.dumps(manifest))
    for args in (["info", str(broken)], ["eval", "--model", str(broken), "--device", "cpu"]):
        assert_one_error_line(CliRunner().invoke(main, args), 1, str(broken / "manifest.json"), repr(name))


def test_verify_file_refuses_a_name_outside(tmp_path: Path) -> None:
    from qmoe_cli.errors import QmoeError
    from qmoe_cli.formats.integrity import inside, verify_file

    assert inside("experts/a.safetensors") and not inside("../a") and not inside("/a") and not inside("")
    with pytest.raises(QmoeError, match="points outside the checkpoint"):
        verify_file(tmp_path, {"../a": {"bytes": 0, "sha256": "0" * 64}}, "../a", "packed")


# --- outputs: checked before the work, OS errors named ---------------------------------------------

@pytest.mark.parametrize("case", ["symlink loop", "under a file", "dangling symlink"])
def test_unwritable_out_fails_before_any_work(small, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              case: str) -> None:
    model, calib = small
    out = tmp_path / "out"
    if case == "symlink loop":
        os.symlink(tmp_path / "loop", out)
        os.symlink(out, tmp_path / "loop")
    elif case == "under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    else:
        os.symlink(tmp_path / "nowhere", out)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was opened before --out was checked")

    monkeypatch.setattr("qmoe_cli.formats.registry.CheckpointWeights", refuse)
    result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--out", str(out),
                                       "--device", "cpu"])
    assert_one_error_line(result, 1, f"--out {out}")
    result = CliRunner().invoke(main, ["pack", str(tmp_path / "whatever"), "--out", str(out)])
    assert_one_error_line(result, 1, f"--out {out}")


@pytest.mark.parametrize("code,reason,remedy", [(27, "File too large", "allows larger files"),
                                                (28, "No space left on device", "free space")])
def test_write_errors_name_the_file_and_the_next_step(packed_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, code: int, reason: str,
                                                      remedy: str) -> None:
    from safetensors import SafetensorError

    from qmoe_cli import files

    def save_file(tensors, path, metadata=None):  # what safetensors 0.6 raises
        raise SafetensorError(f"Error while serializing: I/O error: {reason} (os error {code})")

    monkeypatch.setattr(files, "save_file", save_file)
    quantized = packed_dir.with_name("q")
    result = CliRunner().invoke(main, ["pack", str(quantized), "--out", str(tmp_path / "p")])
    message = assert_one_error_line(result, 1, str(tmp_path / ".p.partial"), reason, remedy)
    assert ".safetensors" in message  # the file, not only the directory


def test_os_error_message_reads_both_safetensors_formats() -> None:
    from safetensors import SafetensorError

    from qmoe_cli.errors import os_error_message, os_error_of, os_error_remedy

    old = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "x" })')
    new = SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    assert os_error_message(old) == os.strerror(28) and os_error_remedy(old) == "free space"
    assert os_error_message(os_error_of(new, "/d/f.tmp")) == f"/d/f.tmp: {os.strerror(27)}"


# --- --resume with nothing to resume -------------------------------------------------------------

def test_resume_with_nothing_to_resume_says_so(small, tmp_path: Path) -> None:
    model, calib = small
    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--out", str(out),
                                       "--device", "cpu", "--method", "rtn", "--resume"])
    assert result.exit_code == 0, result.stderr
    assert f"note: --resume: {out} has no interrupted run to continue; starting a new one" in result.stderr
    assert (out / "manifest.json").is_file()


# --- the hub: offline, unreachable, local paths ----------------------------------------------------

def test_path_like_model_never_asks_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qmoe_cli.formats import hf

    monkeypatch.setattr(hf, "_download", lambda hub_id: pytest.fail(f"asked the hub for {hub_id}"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "afile").write_text("")
    for name, words in [("./missing", "no such directory"), ("runs/missing", "no such directory"),
                        ("/no/such/dir", "no such directory"), ("~/no-such-qmoe-model", "no such directory"),
                        ("a/b/c", "no such directory"), ("afile", "is a file")]:
        result = CliRunner().invoke(main, ["eval", "--model", name])
        assert_one_error_line(result, 2, f"--model {name}", words)
    assert hf.looks_like_path("runs/x") and not hf.looks_like_path("google/switch-base-8")


@pytest.mark.parametrize("args,names", [
    (["eval", "--model", "google/switch-base-8", "--data", "DATA"], "--model google/switch-base-8"),
    (["eval", "--data", "wikitext2", "--samples", "1"], "WikiText-2"),
    (["compress", "--calib", "c4", "--out", "OUT"], "C4"),
])
def test_unreachable_hub_fails_fast_in_one_line(args: list[str], names: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input_ids": [5, 6, 1], "labels": [7, 1]}) + "\n")
    args = [str(data) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed local port: refused at once
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    start = time.monotonic()
    result = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert time.monotonic() - start < 10
    assert_one_error_line(result, 1, names, "http://127.0.0.1:9", "cannot be reached", "HF_HUB_OFFLINE=1")


# A fresh process (the hub libraries read these variables at import, and HF_HOME points at an
# empty cache) that imports first and then times the command alone: on a loaded machine the
# imports may take seconds of CPU, which is not what the 10 s bound is about (waiting on a hub).
TIMED = """
import json, sys, time
import datasets, huggingface_hub
from click.testing import CliRunner
from qmoe_cli.cli import main
for argv in json.loads(sys.argv[1]):
    start = time.monotonic()
    result = CliRunner().invoke(main, argv)
    print(json.dumps({"code": result.exit_code, "seconds": time.monotonic() - start, "stderr": result.stderr}))
"""


def test_offline_variables_fail_at_once_naming_the_remedy(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input_ids": [5, 6, 1], "labels": [7, 1]}) + "\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    cases = [(["--model", "google/switch-base-8", "--data", str(data)],
              ["google/switch-base-8", "HF_HUB_OFFLINE=1", "local checkpoint directory"]),
             (["--data", "c4"], ["C4", "HF_DATASETS_OFFLINE=1", "--data FILE"]),
             (["--data", "wikitext2"], ["WikiText-2", "HF_DATASETS_OFFLINE=1", "--data FILE"])]
    done = subprocess.run([sys.executable, "-c", TIMED, json.dumps([["eval", "--device", "cpu", *a] for a, _ in cases])],
                          env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    for (_, fragments), line in zip(cases, done.stdout.splitlines(), strict=True):
        run = json.loads(line)
        assert run["code"] == 1 and run["seconds"] < 10, run
        assert run["stderr"].startswith("error: ") and len(run["stderr"].splitlines()) == 1, run
        for fragment in fragments:
            assert fragment in run["stderr"], run
