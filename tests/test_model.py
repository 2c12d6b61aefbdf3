"""Parity of our Switch model code with `transformers`, whole and streamed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import save_hf_switch

from qmoe_cli.arch.switch.model import SwitchModel, lm_logits, shift_right
from qmoe_cli.cli import main
from qmoe_cli.formats.hf import CheckpointWeights, resolve_model
from qmoe_cli.run.stream import RunConfig, streamed_states

transformers = pytest.importorskip("transformers")

CASES = {  # name: save_hf_switch arguments
    "sparse-every-2-tied": dict(sparse_step=2, tied=True),
    "every-layer-sparse-untied": dict(sparse_step=1, tied=False, layers=3),  # c2048 style
    "sparse-every-2-untied": dict(sparse_step=2, tied=False),
    "legacy-bin-shard": dict(sparse_step=2, tied=True, safe_serialization=False),
}
CPU = RunConfig(device=torch.device("cpu"), dtype=torch.float32, progress=False, group_size=3)


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory) -> Path:
    return save_hf_switch(tmp_path_factory.mktemp(request.param), **CASES[request.param])


def _batch(seed: int, vocab: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (3, 13), generator=g), torch.randint(2, vocab, (3, 6), generator=g)


def _reference(checkpoint: Path, ids: torch.Tensor, labels: torch.Tensor):
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        return hf(input_ids=ids, labels=labels)


def test_whole_and_streamed_logits_match_transformers(checkpoint: Path) -> None:
    ids, labels = _batch(seed=1)
    reference = _reference(checkpoint, ids, labels)
    weights = CheckpointWeights(resolve_model(str(checkpoint)))
    assert any(name.endswith(".bin") for name in weights.reader.weight_map.values()) == ("bin" in checkpoint.name)
    model = SwitchModel(weights.arch.config).eval()
    model.load_state_dict({name: weights.reader.get(name) for name in model.state_dict()})
    decoder_ids = shift_right(labels, 0, 0)
    with torch.no_grad():
        whole = model(ids, decoder_ids)
    torch.testing.assert_close(whole, reference.logits, atol=1e-5, rtol=0)

    states = streamed_states(weights, {"encoder": ids.tolist(), "decoder": decoder_ids.tolist()}, CPU)
    head = getattr(model, "lm_head", None)
    for s in range(ids.shape[0]):
        with torch.no_grad():
            streamed = lm_logits(states.sample(s), model.shared.weight, head, weights.arch.config)
        torch.testing.assert_close(streamed, reference.logits[s], atol=1e-5, rtol=0)


def test_padded_batch_matches_unpadded_samples(tmp_path: Path) -> None:
    """The whole model's padding masks make a padded batch equal to samples run alone."""
    checkpoint = save_hf_switch(tmp_path / "m", sparse_step=2)
    weights = CheckpointWeights(resolve_model(str(checkpoint)))
    model = SwitchModel(weights.arch.config).eval()
    model.load_state_dict({name: weights.reader.get(name) for name in model.state_dict()})
    ids, labels = _batch(seed=2)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    with torch.no_grad():
        batched = model(ids, shift_right(labels, 0, 0), mask)
        alone = model(ids[:1, :9], shift_right(labels[:1], 0, 0))
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)


def test_eval_cli_loss_matches_transformers(checkpoint: Path, tmp_path: Path) -> None:
    ids, labels = _batch(seed=3)
    data = tmp_path / "pretokenized.jsonl"
    data.write_text("".join(json.dumps({"input_ids": i, "labels": l}) + "\n"
                            for i, l in zip(ids.tolist(), labels.tolist())))
    reference = _reference(checkpoint, ids, labels)  # equal-length labels: token mean = HF mean
    result = CliRunner().invoke(main, ["eval", "--model", str(checkpoint), "--data", str(data),
                                       "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tokens"] == labels.numel() and report["samples"] == 3
    assert abs(report["loss"] - reference.loss.item()) < 1e-4
    assert report["datasets"]["pretokenized.jsonl"]["loss"] == pytest.approx(report["loss"])
    assert report["perplexity"] == pytest.approx(torch.exp(torch.tensor(report["loss"])).item(), rel=1e-6)
