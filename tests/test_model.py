"""Parity of our Switch model code with `transformers`, whole and streamed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import drop_stack_embeddings, save_hf_switch

from qmoe_cli.arch.switch.model import SwitchModel, lm_logits, shift_right
from qmoe_cli.cli import main
from qmoe_cli.formats.hf import CheckpointWeights, resolve_model
from qmoe_cli.formats.quantized import QuantizedWeights
from qmoe_cli.formats.safetensors_io import SafetensorsFile
from qmoe_cli.run.stream import RunConfig, streamed_states

transformers = pytest.importorskip("transformers")

CASES = {  # name: save_hf_switch arguments; untied ones store four different embedding / head matrices
    **{f"sparse-every-{step}-{'tied' if tied else 'untied'}": dict(sparse_step=step, tied=tied, layers=3 + step)
       for step in (1, 2, 3) for tied in (True, False)},
    "legacy-bin-shard": dict(sparse_step=2, tied=True, safe_serialization=False),
    # c2048 as on the hub: untied head, one input embedding stored as `shared.weight` alone
    "shared-embedding-only-untied": dict(sparse_step=1, tied=False, layers=3, one_embedding=True),
}
CPU = RunConfig(device=torch.device("cpu"), dtype=torch.float32, progress=False, group_size=3)


def _case(name: str, root: Path) -> tuple[Path, Path]:
    """(the checkpoint qmoe reads, the one `transformers` reads as the reference)."""
    reference = save_hf_switch(root / name, **CASES[name])
    if not name.startswith("shared-embedding-only"):
        return reference, reference
    return drop_stack_embeddings(reference, root / "without-stack-embeddings"), reference


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory) -> tuple[Path, Path]:
    return _case(request.param, tmp_path_factory.mktemp(request.param))


def _batch(seed: int, vocab: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (3, 13), generator=g), torch.randint(2, vocab, (3, 6), generator=g)


def _reference(checkpoint: Path, ids: torch.Tensor, labels: torch.Tensor):
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        return hf(input_ids=ids, labels=labels)


def test_whole_and_streamed_logits_match_transformers(checkpoint: tuple[Path, Path]) -> None:
    checkpoint, hf = checkpoint
    ids, labels = _batch(seed=1)
    reference = _reference(hf, ids, labels)
    weights = CheckpointWeights(resolve_model(str(checkpoint)))
    assert any(name.endswith(".bin") for name in weights.reader.weight_map.values()) == ("bin" in checkpoint.name)
    model = SwitchModel(weights.arch.config).eval()
    model.load_state_dict({name: weights.tensor(name, None, torch.device("cpu")) for name in model.state_dict()})
    decoder_ids = shift_right(labels, 0, 0)
    with torch.no_grad():
        whole = model(ids, decoder_ids)
    torch.testing.assert_close(whole, reference.logits, atol=1e-5, rtol=0)

    states = streamed_states(weights, {"encoder": ids.tolist(), "decoder": decoder_ids.tolist()}, CPU)
    head = model.lm_head.weight if hasattr(model, "lm_head") else model.shared.weight
    for s in range(ids.shape[0]):
        with torch.no_grad():
            streamed = lm_logits(states.sample(s), head, weights.arch.config)
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


def _pretokenized(path: Path, ids: torch.Tensor, labels: torch.Tensor) -> Path:
    path.write_text("".join(json.dumps({"input_ids": i, "labels": l}) + "\n"
                            for i, l in zip(ids.tolist(), labels.tolist())))
    return path


def test_eval_cli_loss_matches_transformers(checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, hf = checkpoint
    ids, labels = _batch(seed=3)
    data = _pretokenized(tmp_path / "pretokenized.jsonl", ids, labels)
    reference = _reference(hf, ids, labels)  # equal-length labels: token mean = HF mean
    result = CliRunner().invoke(main, ["eval", "--model", str(checkpoint), "--data", str(data),
                                       "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tokens"] == labels.numel() and report["samples"] == 3
    assert abs(report["loss"] - reference.loss.item()) < 1e-4
    assert report["datasets"]["pretokenized.jsonl"]["loss"] == pytest.approx(report["loss"])
    assert report["perplexity"] == pytest.approx(torch.exp(torch.tensor(report["loss"])).item(), rel=1e-6)


@pytest.mark.parametrize("case, head", [
    ("sparse-every-2-untied", {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}),
    ("shared-embedding-only-untied", {"shared.weight", "lm_head.weight"}),
    ("sparse-every-3-tied", {"shared.weight"}),
])
def test_quantized_and_packed_checkpoints_keep_the_embeddings(case: str, head: set[str], tmp_path: Path) -> None:
    """Compressed checkpoints store each embedding and the head under the source's names, and
    their loss is `transformers`' with the experts replaced by the dequantized ones."""
    checkpoint, hf = _case(case, tmp_path)
    ids, labels = _batch(seed=4)
    data = _pretokenized(tmp_path / "data.jsonl", ids, labels)
    quantized = tmp_path / "q"
    result = CliRunner().invoke(main, ["compress", "--model", str(checkpoint), "--calib", str(data), "--bits", "4",
                                       "--method", "rtn", "--out", str(quantized), "--pack", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    stored = SafetensorsFile(quantized / "head.safetensors")
    assert set(stored.entries) == head | {"encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"}
    stored.close()

    weights = QuantizedWeights.open(quantized)
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(hf).eval()
    with torch.no_grad():
        for stack, i in weights.arch.sparse_blocks():
            bank = weights.experts(stack, i)
            for j in range(weights.arch.num_experts):
                for m in weights.arch.expert.matrices:
                    model.get_parameter(weights.arch.expert_tensor(stack, i, j, m)).copy_(bank.matrix(j, m))
        reference = model(input_ids=ids, labels=labels).loss.item()
    weights.close()
    for directory in (quantized, tmp_path / "q-packed"):
        result = CliRunner().invoke(main, ["eval", "--model", str(directory), "--data", str(data), "--device", "cpu",
                                           "--json"])
        assert result.exit_code == 0, result.output
        assert abs(json.loads(result.stdout)["loss"] - reference) < 1e-4, directory
