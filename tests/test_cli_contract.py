"""One command-line contract for every command, walked as a table: each flag of each command
(found by introspecting the click commands, so a new flag is covered or this test says it lacks
a bad value) with bad values exits 2 with exactly one `error:` line naming the flag as typed, no
traceback, before any model is read."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from qmoe_cli.cli import main

# Bad values per flag (the same flag means the same thing in every command).
BAD: dict[str, list[str]] = {
    "--model": ["./no-such-model", "switch-base-7", "~/no-such-model-either"],
    "--data": ["wikitext3", "no-such-file.jsonl"],
    "--calib": ["c5"],
    "--samples": ["0", "x"],
    "--calib-samples": ["0"],
    "--seed": ["-1", "x"],
    "--device": ["foo", "mps"],
    "--dtype": ["float8"],
    "--threads": ["0", "-2"],
    "--bits": ["5", "tenary"],
    "--method": ["sgd"],
    "--group-size": ["0"],
    "--damp": ["-1", "nan", "inf"],
    "--grid-group": ["0"],
    "--token-cap": ["0", "inf", "nan"],
    "--shared-experts": ["drop"],
    "--out": ["", "."],
    "--dist-timeout": ["0", "nan"],
    "--max-new-tokens": ["0", "-3", "1e9"],
    "--temperature": ["0", "-1", "inf", "nan"],
    "--top-p": ["0", "1.5", "nan"],
    "--batch-size": ["0"],
    "--max-memory": ["lots"],
    "--input": ["no-such-prompts.jsonl"],
    "--dictionary-size": ["5", "70000"],
    "--max-pairs": ["0", "128"],
    "--sample-matrices": ["-1"],
    "--limit": ["0", "-1"],
    "--num-fewshot": ["-1"],
    "--include-path": ["no-such-task-dir"],
    "--top-k": ["0", "x"],
    "--repetition-penalty": ["0", "-1", "nan", "inf"],
    "--format": ["gguf", "hff"],
}
# Flags whose every value passes the command line (what the value means is checked later).
NO_BAD_VALUE = {
    "--prompt": "any text is a prompt; the model's tokenizer checks it (tests/test_generate.py)",
    "--stop": "any non-empty text may end a sequence (tests/test_sampling.py)",
    "--tasks": "task names are lm-eval's, checked when it loads them (tests/test_lm_eval.py: unknown task)",
    "--config": "a config file is read when the export starts (tests/test_export.py)",
}
# What a command needs besides the bad flag for the rest of its command line to be valid.
BASE = {
    "generate": ["--prompt", "a <extra_id_0> b", "--device", "cpu"],
    "pack": ["some-quantized-dir"],
    "info": ["some-dir"],
    "export": ["some-dir", "--format", "hf", "--out", "some-out"],
}
INTERNAL_NAME = re.compile(r"\b[A-Z]\w*(?:Config|Spec)\.\w+")


def _value_options(command: click.Command) -> list[str]:
    """The flags of `command` that take a value, each by its long name."""
    return [max(p.opts, key=len) for p in command.params
            if isinstance(p, click.Option) and not p.is_flag and max(p.opts, key=len) not in ("--help",)]


def _cases() -> list[tuple[str, str, str]]:
    return [(name, flag, value) for name, command in sorted(main.commands.items())
            for flag in _value_options(command) for value in BAD.get(flag, [])]


def test_every_flag_has_bad_values() -> None:
    missing = [f"{name} {flag}" for name, command in main.commands.items() for flag in _value_options(command)
               if flag not in BAD and flag not in NO_BAD_VALUE]
    assert not missing, f"flags without bad values in tests/test_cli_contract.py BAD: {', '.join(missing)}"


def assert_one_error_line(result, code: int, *fragments: str) -> str:
    """The one `error:` line of a failed command, its last line on stderr (`note:` lines may
    precede it), checked; returned."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, result.stderr
    lines = result.stderr.splitlines()
    assert lines and [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    assert all(line.startswith(("note: ", "error: ")) or not line.startswith(("Error", "Usage", "Try", " "))
               for line in lines), result.stderr
    assert "Traceback" not in result.output
    assert not INTERNAL_NAME.search(lines[-1]), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], result.stderr
    return lines[-1]


@pytest.fixture
def no_model_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a checkpoint or reaching the hub fails the test: flags are checked before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was opened before the command line was checked")

    monkeypatch.setattr("qmoe_cli.formats.registry.CheckpointWeights", refuse)
    monkeypatch.setattr("qmoe_cli.formats.registry.read_manifest", refuse)
    monkeypatch.setattr("qmoe_cli.formats.hf._download", refuse)


@pytest.mark.parametrize("command,flag,value", _cases())
def test_bad_flag_value_is_one_usage_error(command: str, flag: str, value: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, no_model_reads: None) -> None:
    base = [a for a in BASE.get(command, []) if not (flag == "--input" and a.startswith(("--prompt", "a <")))]
    monkeypatch.chdir(tmp_path)  # default outputs land here
    result = CliRunner().invoke(main, [command, *base, flag, value])
    assert sorted(tmp_path.iterdir()) == []  # nothing written, no output directory started
    assert_one_error_line(result, 2, flag)
    assert len(result.stderr.splitlines()) == 1, result.stderr  # not even a note: nothing ran


def _switches(command: click.Command) -> list[str]:
    """The on/off flags of `command` (`--symmetric`, `--json`, ...), each by its long name."""
    return [max(p.opts, key=len) for p in command.params if isinstance(p, click.Option) and p.is_flag
            and max(p.opts, key=len) not in ("--help", "--version")]


@pytest.mark.parametrize("command,flag", [(name, flag) for name, command in sorted(main.commands.items())
                                          for flag in _switches(command)])
def test_a_value_given_to_a_switch_is_one_usage_error(command: str, flag: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, no_model_reads: None) -> None:
    """A switch takes no value (`--symmetric=yes`): one usage error naming it, nothing written."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [command, *BASE.get(command, []), f"{flag}=yes"])
    assert sorted(tmp_path.iterdir()) == []
    assert_one_error_line(result, 2, flag)


def test_typos_get_suggestions(no_model_reads: None) -> None:
    result = CliRunner().invoke(main, ["compress", "--bits", "tenary"])
    assert_one_error_line(result, 2, "--bits", "did you mean ternary")
    result = CliRunner().invoke(main, ["eval", "--model", "swich-c2048"])
    assert_one_error_line(result, 2, "--model swich-c2048", "did you mean switch-c2048")
    result = CliRunner().invoke(main, ["eval", "--data", "wikitxt2"])
    assert_one_error_line(result, 2, "--data wikitxt2", "did you mean wikitext2")


def test_library_field_names_become_flags() -> None:
    from qmoe_cli.cli_contract import user_words

    assert user_words("QuantSpec.group_size must be >= 1", "compress") == "--grid-group must be >= 1"
    assert user_words("DataSpec.num_samples bad", "compress") == "--calib-samples bad"
    assert user_words("DataSpec.num_samples bad", "eval") == "--samples bad"
    assert user_words("SwitchConfig.d_model is wrong", "eval") == "SwitchConfig.d_model is wrong"  # no flag sets it


def test_bare_qmoe_prints_the_whole_help() -> None:
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 2
    assert "Usage:" in result.stderr and "Commands:" in result.stderr
    for name in main.commands:
        assert name in result.stderr


def test_presets_in_natural_order() -> None:
    from qmoe_cli.arch.presets import natural_key

    result = CliRunner().invoke(main, ["presets"])
    names = [line.split()[0] for line in result.stdout.splitlines()]
    switch = [n for n in names if n.startswith("switch-base-")]
    assert switch == sorted(switch, key=lambda n: int(n.rsplit("-", 1)[1])) and len(switch) >= 3
    assert names == sorted(names, key=natural_key)
    assert natural_key("a-16") < natural_key("a-128") < natural_key("b-2")


def test_every_computing_command_takes_threads() -> None:
    for name in ("eval", "generate", "compress", "pack"):
        assert "--threads" in _value_options(main.commands[name]), name
