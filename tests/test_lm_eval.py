"""`qmoe eval --tasks`: lm-evaluation-harness tasks on our runtime (`run/harness.py`), offline with
small local tasks (tests/data/lm_eval), against lm-eval's own `hf` model on the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import save_hf_decoder, write_causal_tokenizer_json

from qmoe_cli.cli import main

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install qmoe[eval])")

TASKS = Path(__file__).parent / "data" / "lm_eval"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A transformers-written Mixtral with a tokenizer both runtimes read, and the local tasks
    with their data paths made absolute; compressed to 4 bits and packed too."""
    root = tmp_path_factory.mktemp("lm-eval")
    model = root / "model"
    save_hf_decoder(model, "mixtral", config_override={"sliding_window": None})
    write_causal_tokenizer_json(model)
    (model / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "<pad>", "unk_token": "<unk>"}))
    tasks = root / "tasks"
    tasks.mkdir()
    for path in TASKS.iterdir():
        text = path.read_text()
        (tasks / path.name).write_text(text.replace("DATA_DIR", str(tasks)) if path.suffix == ".yaml" else text)
    calib = root / "calib.jsonl"
    g = torch.Generator().manual_seed(0)
    calib.write_text("".join(json.dumps({"input_ids": torch.randint(4, 64, (20,), generator=g).tolist()}) + "\n"
                             for _ in range(8)))
    result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--out",
                                       str(root / "q4"), "--bits", "4", "--method", "rtn", "--device", "cpu",
                                       "--pack"])
    assert result.exit_code == 0, result.output
    return dict(model=model, tasks=tasks, q4=root / "q4", packed=root / "q4-packed")


def _samples(lm, tasks: Path, names: list[str]) -> dict:
    from lm_eval import simple_evaluate

    from qmoe_cli.run.harness import task_manager

    out = simple_evaluate(model=lm, tasks=names, task_manager=task_manager(str(tasks)),
                          log_samples=True, num_fewshot=0)
    return {name: [s["resps"] for s in out["samples"][name]] for name in names}


def _leaves(value) -> list:
    """The scalars of nested lm-eval responses, in order: log-likelihoods (float), is-greedy
    flags (bool), generated texts (str)."""
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _ours(directory: Path):
    from qmoe_cli.formats.open import open_model
    from qmoe_cli.run.harness import QmoeLM
    from qmoe_cli.run.stream import RunConfig

    return QmoeLM(open_model(str(directory)), RunConfig(CPU, torch.float32, progress=False))


def test_loglikelihoods_equal_lm_evals_hf_model(setup: dict) -> None:
    """Every request's log-likelihood (multiple choice and rolling) as lm-eval's `hf` model gives it
    on the same checkpoint, to fp32 rounding: both sum at most ~60 log-probs of magnitude ~5 whose
    logits come from the same weights in another operation order (1e-6 relative per logit)."""
    from lm_eval.models.huggingface import HFLM

    names = ["qmoe_tiny_choice", "qmoe_tiny_text", "qmoe_tiny_generate"]
    theirs = _samples(HFLM(pretrained=str(setup["model"]), dtype="float32", device="cpu"), setup["tasks"], names)
    ours = _samples(_ours(setup["model"]), setup["tasks"], names)
    for name in names[:2]:
        a, b = _leaves(ours[name]), _leaves(theirs[name])
        assert len(a) == len(b) > 0 and any(isinstance(x, float) for x in a)
        for x, y in zip(a, b):
            assert x == (pytest.approx(y, rel=1e-4, abs=1e-4) if isinstance(y, float) else y)
    assert ours["qmoe_tiny_generate"] == theirs["qmoe_tiny_generate"]  # greedy text, cut at "w7"
    assert any(text.strip() for text in _leaves(ours["qmoe_tiny_generate"]))


@pytest.mark.parametrize("which", ["q4", "packed"])
def test_cli_runs_tasks_on_compressed_checkpoints(setup: dict, which: str) -> None:
    result = CliRunner().invoke(main, ["eval", "--model", str(setup[which]), "--tasks", "qmoe_tiny_choice",
                                       "--include-path", str(setup["tasks"]), "--limit", "5", "--device", "cpu",
                                       "--json"])
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout.strip().splitlines()[-1])["results"]["qmoe_tiny_choice"]
    assert 0.0 <= results["acc,none"] <= 1.0


def test_quantized_and_packed_score_alike(setup: dict) -> None:
    """A packed checkpoint computes what its quantized source computes (lossless packing)."""
    names = ["qmoe_tiny_choice"]
    q, p = _samples(_ours(setup["q4"]), setup["tasks"], names), _samples(_ours(setup["packed"]), setup["tasks"], names)
    a, b = _leaves(q[names[0]]), _leaves(p[names[0]])
    assert len(a) == len(b) > 0
    assert all(x == (pytest.approx(y, rel=1e-5) if isinstance(y, float) else y) for x, y in zip(a, b))


def test_table_without_json(setup: dict) -> None:
    result = CliRunner().invoke(main, ["eval", "--model", str(setup["model"]), "--tasks", "qmoe_tiny_choice",
                                       "--include-path", str(setup["tasks"]), "--limit", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "qmoe_tiny_choice" in result.output and "acc" in result.output


def test_unknown_task_and_switch_are_one_line_usage_errors(setup: dict) -> None:
    result = CliRunner().invoke(main, ["eval", "--model", str(setup["model"]), "--tasks", "no_such_task",
                                       "--include-path", str(setup["tasks"])])
    assert result.exit_code == 2 and "no_such_task" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-switch", "--tasks", "qmoe_tiny_choice",
                                       "--include-path", str(setup["tasks"])])
    assert result.exit_code == 2 and "encoder-decoder" in result.output


def test_missing_lm_eval_says_how_to_install(monkeypatch, setup: dict) -> None:
    import sys

    import qmoe_cli.run

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    monkeypatch.delitem(sys.modules, "qmoe_cli.run.harness", raising=False)
    monkeypatch.delattr(qmoe_cli.run, "harness", raising=False)  # else `from .run import harness` reuses it
    result = CliRunner().invoke(main, ["eval", "--model", str(setup["model"]), "--tasks", "qmoe_tiny_choice"])
    assert result.exit_code == 1 and "pip install 'qmoe[eval]'" in result.output
    assert len(result.output.strip().splitlines()) == 1

