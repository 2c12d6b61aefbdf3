"""Decoder-only MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) against
`transformers`: `qmoe eval` of the checkpoints `transformers` writes, causal-LM data (WikiText-2
windows included), top-k routing, `qmoe compress` / `pack` / `eval` through the same pipeline,
and `--resume` after a real SIGKILL."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import fake_hub_datasets, wikitext_rows
from family_checks import streamed_logits
from hf_models import DECODER_FAMILIES, causal_lm_loss, save_hf_decoder, write_causal_tokenizer_json
from interrupted import kill_after_a_finished_block, tree_hashes

from qmoe_cli.cli import main
from qmoe_cli.run.stream import ListBuffer, RunConfig, apply_experts, finish_sparse, route

FAMILIES = sorted(DECODER_FAMILIES)
VOCAB = 64


def _sequences(count: int, seed: int, lengths: tuple[int, ...] = (2, 7, 13, 21, 16)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(count)]


def _jsonl(path: Path, sequences: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in sequences))
    return path


def _eval(model: Path, data: Path | str) -> dict:
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


def _word_rows(count: int, seed: int) -> list[str]:
    """WikiText-like rows (headings, blank rows) of random words the word-level tokenizer knows."""
    g = torch.Generator().manual_seed(seed)
    return wikitext_rows([" ".join(f"w{i}" for i in torch.randint(0, VOCAB - 4, (40,), generator=g).tolist())
                          for _ in range(count)])


def test_wikitext2_is_evaluated_in_whole_windows(family, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--data wikitext2` (hub faked): the test split tokenized as one text and cut into
    consecutive 512-token windows (the window without a preset), each one sample, as the
    standard perplexity protocol does; the loss is transformers' over those windows."""
    _, directory, reference = family
    model = tmp_path / "model"
    shutil.copytree(directory, model)
    tok = write_causal_tokenizer_json(model, VOCAB)
    rows = _word_rows(30, seed=4)
    fake_hub_datasets(monkeypatch, {"test": rows})
    ids = tok.encode("\n\n".join(rows)).ids
    windows = [ids[i:i + 512] for i in range(0, len(ids) - 511, 512)]
    assert len(windows) == 2 and len(ids) % 512 > 0  # a partial window at the end, left out
    report = _eval(model, "wikitext2")
    assert report["samples"] == 2 and report["tokens"] == 2 * 511
    assert report["loss"] == pytest.approx(causal_lm_loss(reference, windows), rel=1e-5)


def test_wikitext2_calibrates_on_seeded_random_windows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--calib wikitext2` compresses exactly as the same windows given as a pre-tokenized file:
    random windows of the train split, drawn by --seed."""
    from qmoe_cli.data.hub import random_windows

    model = tmp_path / "model"
    save_hf_decoder(model, "mixtral")
    tok = write_causal_tokenizer_json(model, VOCAB)
    rows = _word_rows(40, seed=5)
    fake_hub_datasets(monkeypatch, {"train": rows})
    ids = tok.encode("\n\n".join(rows)).ids
    windows = [ids[a:b] for a, b in random_windows(len(ids), 512, 3, seed=2)]
    calib = _jsonl(tmp_path / "windows.jsonl", windows)
    outs = []
    for source in ("wikitext2", str(calib)):
        outs.append(tmp_path / Path(source).stem)
        result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", source, "--calib-samples", "3",
                                           "--seed", "2", "--out", str(outs[-1]), "--device", "cpu"])
        assert result.exit_code == 0, result.output
    experts = {d: {k: v for k, v in tree_hashes(d).items() if k.startswith("experts/")} for d in outs}
    assert experts[outs[0]] and experts[outs[0]] == experts[outs[1]]


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
    x [N, d] and index [N] or [N, k] -> every token through each expert `index` names, [N, d] or
    [N, k, d], here expert by expert with a mask. Counts its calls."""

    calls = 0

    def routed(self, device, dtype):
        def run(x, index):
            self.calls += 1
            flat = index.reshape(-1)
            xs = x.repeat_interleave(flat.numel() // x.shape[0], dim=0)  # one row per assignment
            y = torch.zeros_like(xs)
            for j, expert in enumerate(self.experts):
                y[flat == j] = expert(xs[flat == j])
            return y.view(*index.shape, x.shape[1])
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
    """Experts loaded group by group, or the grouped path (one call per token chunk, all k slots)."""
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
    assert not grouped or block.experts.calls == -(-tokens // chunk)
    torch.testing.assert_close(buffer.data, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_top_1_adds_what_one_call_per_slot_added(dtype: torch.dtype) -> None:
    """For k = 1 the grouped path gives the bytes it gave before top-k ran in one call:
    out += routed(x, index) * weight, with a one-dimensional index."""
    block = _Block(6, 4, 1, seed=3)
    block.experts, block.router = _GroupedBank(block.experts.experts), block.router.to(dtype)
    for expert in block.experts.experts:
        expert.to(dtype)
    buffer = ListBuffer([50], 6, dtype, pin=False)
    buffer.data.copy_(torch.randn(50, 6))
    run = RunConfig(torch.device("cpu"), dtype, token_chunk=16, progress=False)
    routing = route(block, buffer, run)
    out = torch.zeros_like(buffer.data)
    apply_experts(block, block.experts, buffer, routing, run, out)
    routed, before = block.experts.routed(run.device, dtype), torch.zeros_like(buffer.data)
    for part in buffer.chunks(run.token_chunk):
        x = block.ffn_norm(buffer.data[part])
        before[part] += routed(x, routing.index[part]) * routing.prob[part].to(dtype)[:, None]
    assert torch.equal(out, before)


@pytest.fixture(scope="module", params=FAMILIES)
def compressed(request, tmp_path_factory) -> dict:
    """One family compressed at ternary and 2 bits with GPTQ (then packed) and RTN, evaluated."""
    root = tmp_path_factory.mktemp(f"compress-{request.param}")
    calib = _jsonl(root / "calib.jsonl", _sequences(32, seed=2, lengths=(24, 17, 30)))
    validation = _sequences(16, seed=3, lengths=(24, 17, 30))
    data = _jsonl(root / "val.jsonl", validation)
    model = root / "model"
    save_hf_decoder(model, request.param)
    reference = streamed_logits(model, validation)
    results: dict = {}
    for bits in ("ternary", "2"):
        for method in ("gptq", "rtn"):
            out = root / f"{method}-{bits}"
            pack = ["--pack"] if method == "gptq" else []  # rtn's packing adds nothing to test
            result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib),
                                               "--out", str(out), "--bits", bits, "--method", method,
                                               "--device", "cpu", "--json", *pack])
            assert result.exit_code == 0, result.output
            error = (streamed_logits(out, validation) - reference).pow(2).mean().item()
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


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(family, tmp_path: Path) -> None:
    """`qmoe compress` killed (SIGKILL, a real process) after its first sparse block, then
    `--resume`: the checkpoint is byte-identical to an uninterrupted run's. The finished blocks
    are replayed from their codes (top-k experts, shared experts, DeepSeek's dense first block
    run as stored) to rebuild the hidden states the later blocks calibrate on."""
    name, directory, _ = family
    calib = _jsonl(tmp_path / "calib.jsonl", _sequences(16, seed=2, lengths=(24, 17, 30)))
    command = [sys.executable, "-m", "qmoe_cli", "compress", "--model", str(directory), "--calib", str(calib),
               "--device", "cpu", "--bits", "ternary", "--group-size", "2", "--threads", "1"]
    straight = CliRunner().invoke(main, [*command[3:], "--out", str(tmp_path / "straight")])  # in-process: no start-up
    assert straight.exit_code == 0, straight.output
    blocks = len(json.loads((tmp_path / "straight" / "manifest.json").read_text())["finished"])
    out = tmp_path / "resumed"
    finished = kill_after_a_finished_block([*command, "--out", str(out)], tmp_path / ".resumed.partial")
    assert 1 <= finished < blocks and not out.exists()
    resumed = CliRunner().invoke(main, [*command[3:], "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming: {finished} sparse blocks already done" in resumed.stderr
    assert tree_hashes(out) == tree_hashes(tmp_path / "straight")
