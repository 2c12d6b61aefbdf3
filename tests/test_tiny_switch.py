"""The shipped `tiny-switch` checkpoint: present, trained, routing spread, and self-describing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from corpus import unigram_entropy_bits  # scripts/corpus.py: pyproject's pytest `pythonpath`
from safetensors.torch import load_file

from qmoe_cli.arch.switch.layers import Router
from qmoe_cli.arch.switch.model import SwitchModel, shift_right
from qmoe_cli.data.datasets import DataSpec, Sample, load_samples
from qmoe_cli.data.tokenizer import load_tokenizer
from qmoe_cli.formats.open import open_model

MIN_EXPERT_SHARE = 0.02  # the acceptance bar of scripts/train_tiny_switch.py


@pytest.fixture(scope="module")
def tiny():
    opened = open_model("tiny-switch")
    yield opened
    opened.weights.close()


@pytest.fixture(scope="module")
def whole(tiny) -> SwitchModel:
    model = SwitchModel(tiny.weights.arch.config).eval()
    model.load_state_dict(load_file(str(tiny.tokenizer_dir / "model.safetensors")))
    return model


def _samples(tiny, count: int) -> list[Sample]:
    spec = DataSpec(source=tiny.default_data, num_samples=count, seed=0, window=tiny.window)
    return list(load_samples(spec, load_tokenizer(tiny.tokenizer_dir)).samples)


def _pad(rows: list[tuple[int, ...]], fill: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


def _forward(model: SwitchModel, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [B, T, V], labels [B, T] with -100 padding, attention mask [B, S])."""
    ids = _pad([s.input_ids for s in samples], 0)
    labels = _pad([s.labels for s in samples], -100)
    mask = _pad([(1,) * len(s.input_ids) for s in samples], 0)
    with torch.no_grad():
        return model(ids, shift_right(labels, 0, 0), mask), labels, mask


def test_preset_resolves_to_the_shipped_files(tiny) -> None:
    directory = tiny.tokenizer_dir
    assert directory.parts[-3:] == ("qmoe_cli", "assets", "tiny-switch")
    assert tiny.kind == "original" and tiny.stored_dtype == torch.float32 and tiny.window == 256
    # The preset's default data are files inside the model directory, given as absolute paths.
    for data in (tiny.default_data, tiny.default_calib):
        assert Path(data).is_absolute() and Path(data).parent == directory and Path(data).is_file()
    assert (directory / "model.safetensors").stat().st_size < 8 * 2**20


def test_validation_loss_is_far_below_unigram_entropy(tiny, whole) -> None:
    samples = _samples(tiny, 128)
    # The unigram baseline over all 128 samples' labels: a handful would underestimate it.
    entropy_nats = unigram_entropy_bits(t for s in samples for t in s.labels) * math.log(2)
    logits, labels, _ = _forward(whole, samples[:16])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()
    # Trained 800 steps on 2 CPU cores: ~0.54 of the unigram entropy; a model that learned
    # nothing beyond word frequencies sits at 1.0.
    assert loss < 0.6 * entropy_nats, f"loss {loss:.3f} nats vs unigram entropy {entropy_nats:.3f} nats"


def test_every_expert_gets_tokens(tiny, whole) -> None:
    chosen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, out, name=name: chosen.__setitem__(name, out[0]))
             for name, m in whole.named_modules() if isinstance(m, Router)]
    try:
        _, labels, mask = _forward(whole, _samples(tiny, 48))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(chosen) == 4  # blocks 1 and 3 of each stack
    real = {"encoder": mask.flatten().bool(), "decoder": (labels != -100).flatten()}
    for name, index in chosen.items():
        counts = torch.bincount(index[real[name.split(".")[0]]], minlength=whole.config.num_experts)
        shares = counts / counts.sum()
        assert shares.min() >= MIN_EXPERT_SHARE, f"{name}: expert shares {[round(s, 3) for s in shares.tolist()]}"


def test_training_record(tiny) -> None:
    record = json.loads((tiny.tokenizer_dir / "training.json").read_text())
    assert "scripts/train_tiny_switch.py" in record["command"] and "--out" in record["command"]
    assert record["model_config"] == tiny.weights.arch.config.to_dict()
    assert record["validation"]["loss_bits"] < record["validation"]["unigram_entropy_bits"]
