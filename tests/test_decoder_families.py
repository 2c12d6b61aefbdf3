"""Decoder-only MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) against `transformers`:
`qmoe eval` of the checkpoints `transformers` writes, causal-LM data, top-k routing, and
`qmoe compress` / `pack` / `eval` through the same pipeline."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import DECODER_FAMILIES, causal_lm_loss, save_hf_decoder, write_causal_tokenizer_json

from qmoe_cli.cli import main
from qmoe_cli.formats.open import open_model
from qmoe_cli.formats.quantized import write_manifest
from qmoe_cli.run.stream import ListBuffer, RunConfig, apply_experts, finish_sparse, route, streamed_states

FAMILIES = sorted(DECODER_FAMILIES)
VOCAB = 64


def _sequences(count: int, seed: int, lengths: tuple[int, ...] = (2, 7, 13, 21, 16)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(count)]


def _jsonl(path: Path, sequences: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in sequences))
    return path


def _eval(model: Path, data: Path) -> dict:
    result = CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(data), "--device", "cpu",
                                       "--json", "--samples", "1000"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> tuple[str, Path, object]:
    directory = tmp_path_factory.mktemp(request.param) / "model"
    return request.param, directory, save_hf_decoder(directory, request.param)


def test_eval_equals_transformers(family, tmp_path: Path) -> None:
    name, directory, reference = family
    sequences = _sequences(10, seed=1)
    report = _eval(directory, _jsonl(tmp_path / "data.jsonl", sequences))
    expected = causal_lm_loss(reference, sequences)
    assert report["tokens"] == sum(len(s) - 1 for s in sequences) and report["samples"] == len(sequences)
    assert report["loss"] == pytest.approx(expected, rel=1e-5)
    # Random weights, far from uniform logits: a wrong block would not land within 1e-5.
    assert abs(expected - math.log(VOCAB)) > 0.3


def test_text_is_tokenized_with_the_model_tokenizer(family, tmp_path: Path) -> None:
    name, directory, reference = family
    model = tmp_path / "model"
    model.mkdir()
    for f in directory.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    tok = write_causal_tokenizer_json(model)
    texts = ["w1 w5 w9 w2", "w40 w3", "w7 w7 w7 w8 w30 w31 w32", "w59"]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ids = [tok.encode(t).ids for t in texts]
    assert all(s[0] == 1 for s in ids)  # the post-processor's BOS is part of the sample
    report = _eval(model, data)
    assert report["loss"] == pytest.approx(causal_lm_loss(reference, ids), rel=1e-5)
    assert report["tokens"] == sum(len(s) - 1 for s in ids)


@pytest.mark.parametrize("rows, message", [
    ([{"input_ids": [1, 2], "labels": [2, 3]}], "a causal LM sample is"),
    ([{"input_ids": [5]}], "needs at least 2"),
    ([{"input_ids": [5, 64]}], "outside the model's vocabulary"),
])
def test_causal_data_errors(family, tmp_path: Path, rows: list[dict], message: str) -> None:
    _, directory, _ = family
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["eval", "--model", str(directory), "--data", str(data), "--device", "cpu"])
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output


class _Bank:
    def __init__(self, experts: list[torch.nn.Module]):
        self.experts, self.num_experts = experts, len(experts)

    def load(self, ids, device, dtype):
        return [self.experts[j] for j in ids]


class _GroupedBank(_Bank):
    """A bank with the grouped path (`ExpertBank.routed`), as packed checkpoints offer on a GPU:
    every token through the one expert `index` names, here expert by expert with a mask."""

    def routed(self, device, dtype):
        def run(x, index):
            y = torch.zeros_like(x)
            for j, expert in enumerate(self.experts):
                y[index == j] = expert(x[index == j])
            return y
        return run


class _Block:
    """Norm, top-k softmax router and shared term of random weights: the runner's view of a block."""

    def __init__(self, d: int, experts: int, k: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.router = torch.randn(experts, d, generator=g)
        self.shared = torch.randn(d, d, generator=g) / d
        self.k = k
        self.experts = _Bank([torch.nn.Linear(d, d).requires_grad_(False) for _ in range(experts)])

    def ffn_norm(self, x):
        return x / (x.norm(dim=-1, keepdim=True) + 1)

    def route(self, x):
        weight, index = torch.topk(torch.softmax(x @ self.router.T, -1), self.k, dim=-1)
        return index, weight

    def shared_output(self, x):
        return x @ self.shared.T


@pytest.mark.parametrize("grouped", [False, True], ids=["loaded", "grouped"])
@pytest.mark.parametrize("tokens, d, experts, k, chunk, group", [(97, 13, 5, 2, 16, 2), (1025, 8, 7, 3, 100, 3),
                                                                  (31, 6, 4, 4, 7, 1), (40, 5, 3, 1, 9, 2)])
def test_top_k_experts_equal_a_token_by_token_reference(tokens: int, d: int, experts: int, k: int, chunk: int,
                                                        group: int, grouped: bool) -> None:
    """Experts loaded group by group, or the grouped path (one pass per routing slot)."""
    torch.manual_seed(tokens)
    block = _Block(d, experts, k, seed=tokens)
    if grouped:
        block.experts = _GroupedBank(block.experts.experts)
    buffer = ListBuffer([tokens], d, torch.float32, pin=False)
    buffer.data.copy_(torch.randn(tokens, d))
    x = buffer.data.clone()
    run = RunConfig(torch.device("cpu"), torch.float32, token_chunk=chunk, group_size=group, progress=False)
    routing = route(block, buffer, run)
    out = torch.zeros_like(buffer.data)
    apply_experts(block, block.experts, buffer, routing, run, out)
    finish_sparse(block, buffer, out, run)
    expected = torch.empty_like(x)
    for t in range(tokens):  # every token alone: x + shared + its k experts, each on the same input
        h = block.ffn_norm(x[t:t + 1])
        index, weight = block.route(h)
        y = sum(weight[0, s] * block.experts.experts[int(index[0, s])](h) for s in range(k))
        expected[t] = (x[t:t + 1] + y + block.shared_output(h))[0]
    assert routing.k == k and sum(routing.count(j) for j in range(experts)) == tokens * k
    torch.testing.assert_close(buffer.data, expected, rtol=1e-5, atol=1e-5)


def _logits(model: Path, sequences: list[list[int]]) -> torch.Tensor:
    """Next-token logits [tokens, vocab] of every position, streamed as `qmoe eval` runs them."""
    weights = open_model(str(model)).weights
    run = RunConfig(torch.device("cpu"), torch.float32, progress=False)
    states = streamed_states(weights, weights.arch.stack_tokens(sequences, sequences), run)
    return weights.arch.head(weights.tensor, run.device, run.dtype)(states.data)


@pytest.fixture(scope="module", params=FAMILIES)
def compressed(request, tmp_path_factory) -> dict:
    """One family compressed at ternary and 2 bits with GPTQ (then packed) and RTN, evaluated."""
    root = tmp_path_factory.mktemp(f"compress-{request.param}")
    calib = _jsonl(root / "calib.jsonl", _sequences(32, seed=2, lengths=(24, 17, 30)))
    validation = _sequences(16, seed=3, lengths=(24, 17, 30))
    data = _jsonl(root / "val.jsonl", validation)
    model = root / "model"
    save_hf_decoder(model, request.param)
    reference = _logits(model, validation)
    results: dict = {}
    for bits in ("ternary", "2"):
        for method in ("gptq", "rtn"):
            out = root / f"{method}-{bits}"
            pack = ["--pack"] if method == "gptq" else []  # rtn's packing adds nothing to test
            result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib),
                                               "--out", str(out), "--bits", bits, "--method", method,
                                               "--device", "cpu", "--json", *pack])
            assert result.exit_code == 0, result.output
            error = (_logits(out, validation) - reference).pow(2).mean().item()
            losses = (_eval(out, data)["loss"], _eval(Path(f"{out}-packed"), data)["loss"]) if pack else (None, None)
            results[method, bits] = (*losses, json.loads(result.stdout), error)
    return results


@pytest.mark.slow
def test_compress_pack_eval(compressed: dict) -> None:
    for bits in ("ternary", "2"):
        gptq, gptq_packed, summary, gptq_error = compressed["gptq", bits]
        _, _, _, rtn_error = compressed["rtn", bits]
        # Packing is lossless (pack decodes every matrix back to its codes); the loss moves only by
        # float summation order, where few tokens take the decode-matmul straight from codewords.
        assert gptq_packed == pytest.approx(gptq, rel=1e-6)
        assert summary["fallbacks"] == 0
        # Random weights and data: the original's loss is no optimum to get closer to, so GPTQ's
        # gain is measured where it aims, on the model's output: logits nearer the original's.
        assert gptq_error < rtn_error, (bits, gptq_error, rtn_error)


def _hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resume_replays_top_k_blocks_byte_identically(tmp_path: Path) -> None:
    """A run stopped after its first sparse block (the partial directory a crash leaves then,
    rebuilt from a finished run) resumes to the same bytes: the replayed block's top-k experts
    and shared expert reproduce the hidden states the later blocks calibrate on."""
    model = tmp_path / "model"
    save_hf_decoder(model, "qwen2_moe")
    calib = _jsonl(tmp_path / "calib.jsonl", _sequences(16, seed=2, lengths=(24, 17, 30)))
    command = ["compress", "--model", str(model), "--calib", str(calib), "--device", "cpu", "--bits", "ternary"]
    assert CliRunner().invoke(main, [*command, "--out", str(tmp_path / "straight")]).exit_code == 0
    partial = tmp_path / ".resumed.partial"
    shutil.copytree(tmp_path / "straight", partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    first, *later = manifest["finished"]
    assert later, "the model needs two sparse blocks"
    for name in later:
        stack, index = name.split(".")
        removed = f"experts/{stack}-{int(index):03d}"
        shutil.rmtree(partial / removed)
        manifest["files"] = {f: record for f, record in manifest["files"].items() if not f.startswith(removed + "/")}
    manifest.update(finished=[first], blocks={first: manifest["blocks"][first]}, complete=False)
    del manifest["calibration_loss"]
    write_manifest(partial, manifest)
    resumed = CliRunner().invoke(main, [*command, "--out", str(tmp_path / "resumed"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming: 1 sparse blocks already done" in resumed.stderr
    assert _hashes(tmp_path / "resumed") == _hashes(tmp_path / "straight")
