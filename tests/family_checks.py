"""Checks shared by the per-family test files (GLM-4.5, DeepSeek-V2): published sizes from a real
config, `qmoe eval` against transformers, a config change transformers' own result is sensitive
to, greedy tokens against transformers' `generate`, an unsupported config refused in one line,
4-bit GPTQ against RTN, a packed checkpoint on a GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import causal_lm_loss

from qmoe_cli.arch import architecture_from_config
from qmoe_cli.cli import main
from qmoe_cli.formats.open import open_model
from qmoe_cli.run.generate import GenerateConfig, generate_ids
from qmoe_cli.run.resident import load_resident
from qmoe_cli.run.stream import RunConfig, streamed_states

VOCAB = 64
CPU = torch.device("cpu")


def parameter_count(raw: dict) -> int:
    """Parameters of the model a real `config.json` describes, from its blocks built on the meta
    device (no memory) plus its routed experts and head tensors."""
    arch = architecture_from_config(raw)
    c = arch.config
    total = sum(torch.Size(shape).numel() for shape in arch.head_tensors().values())
    expert = sum(torch.Size(shape).numel() for shape in arch.expert.shapes.values())
    with torch.device("meta"):
        for i in range(c.num_layers):
            total += sum(p.numel() for p in arch.block("decoder", i, None).parameters())
            total += c.num_experts * expert if c.is_sparse(i) else 0
    return total


def random_sequences(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def write_jsonl(path: Path, sequences: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in sequences))
    return path


def eval_loss(model: Path, data: Path, device: str = "cpu", dtype: str = "float32") -> float:
    code, out, err = cli("eval", "--model", str(model), "--data", str(data), "--device", device, "--dtype", dtype,
                         "--json", "--samples", "1000")
    assert code == 0, err
    return json.loads(out)["loss"]


def with_config(model, **changes):
    """transformers' model of the same weights under a config with `changes` (what qmoe must not
    ignore: the test that it is honoured can fail only if transformers' loss moves with it)."""
    other = type(model)(type(model.config).from_dict({**model.config.to_dict(), **changes})).eval()
    other.load_state_dict(model.state_dict())
    return other


def assert_eval_equals_transformers(directory: Path, reference, tmp_path: Path, *, insensitive=None) -> None:
    """`qmoe eval` of the checkpoint equals transformers' loss within 1e-5 (random weights, far
    from uniform logits); `insensitive`, a transformers model with one feature changed, must move
    by more than 1e-4 relative, ten times that tolerance, so that ignoring the feature could not
    pass."""
    sequences = random_sequences((2, 7, 13, 21, 16, 30, 25), seed=1)
    expected = causal_lm_loss(reference, sequences)
    ours = eval_loss(directory, write_jsonl(tmp_path / "data.jsonl", sequences))
    assert abs(ours - expected) <= 1e-5 * expected, (ours, expected)
    if insensitive is not None:
        other = causal_lm_loss(insensitive, sequences)
        assert abs(other - expected) > 1e-4 * expected, (other, expected)


def assert_greedy_equals_transformers(directory: Path, reference, lengths=(3, 12, 7), seed=14, new=6) -> None:
    """Our greedy tokens (prompts batched, left-padded, with the cache) are transformers' for each
    prompt alone, where transformers' top-2 logit gap exceeds 1e-3 at every step (no near-tie
    that summation order could decide)."""
    weights = open_model(str(directory)).weights
    model = load_resident(weights, None, [CPU], torch.float32)
    spec = weights.arch.generation()
    prompts = random_sequences(lengths, seed)
    ours = generate_ids(model, prompts, [set(spec.eos_tokens)] * len(prompts), GenerateConfig(max_new_tokens=new))
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=new, do_sample=False, num_beams=1, pad_token_id=spec.pad_token,
                                     output_scores=True, return_dict_in_generate=True)
        gap = min(float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores)
        assert gap > 1e-3, f"near-tie ({gap}): choose another seed"
        theirs = out.sequences[0, len(prompt):].tolist()
        end = next((i + 1 for i, t in enumerate(theirs) if t in spec.eos_tokens), len(theirs))
        assert tokens == theirs[:end]


def compress(model: Path, out: Path, calib: Path, bits: str, method: str = "gptq", pack: bool = True) -> dict:
    args = ["compress", "--model", str(model), "--calib", str(calib), "--out", str(out), "--bits", bits,
            "--method", method, "--device", "cpu", "--json"]
    code, stdout, err = cli(*args, *(["--pack"] if pack else []))
    assert code == 0, err
    return json.loads(stdout)


def streamed_logits(model: Path, sequences: list[list[int]]) -> torch.Tensor:
    """Next-token logits [tokens, vocab] of every position, streamed as `qmoe eval` runs them."""
    weights = open_model(str(model)).weights
    run = RunConfig(CPU, torch.float32, progress=False)
    states = streamed_states(weights, weights.arch.stack_tokens(sequences, sequences), run)
    return weights.arch.head(weights.tensor, run.device, run.dtype)(states.data)


def assert_config_change_is_one_line_error(model: Path, tmp_path: Path, change: dict, message: str) -> None:
    """`qmoe eval` of a copy of `model` with `change` merged into its config.json: exit 1 and one
    line `error: ...` holding `message`."""
    changed = tmp_path / "model"
    shutil.copytree(model, changed)
    raw = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**raw, **change}))
    data = write_jsonl(tmp_path / "data.jsonl", random_sequences((5, 9), seed=0))
    code, _, err = cli("eval", "--model", str(changed), "--data", str(data), "--device", "cpu")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def four_bit_runs(model: Path, root: Path) -> dict:
    """`model` compressed to 4 bits with GPTQ (then packed) and with RTN under `root`, with
    validation sequences and their JSONL."""
    calib = write_jsonl(root / "calib.jsonl", random_sequences((24, 17, 30) * 8, seed=2))
    validation = random_sequences((24, 17, 30) * 4, seed=3)
    summaries = {method: compress(model, root / method, calib, "4", method, pack=method == "gptq")
                 for method in ("gptq", "rtn")}
    return dict(root=root, validation=validation, data=write_jsonl(root / "val.jsonl", validation),
                summaries=summaries)


def assert_four_bit_gptq_packs_losslessly_and_beats_rtn(model: Path, runs: dict) -> None:
    """4-bit GPTQ (`four_bit_runs`): packed eval equals quantized eval, no fallbacks, and its logits
    are nearer the original's than round-to-nearest's on the same grid (random weights: the
    original's loss is no optimum, so GPTQ's gain is measured where it aims)."""
    root, data, validation = runs["root"], runs["data"], runs["validation"]
    assert eval_loss(root / "gptq-packed", data) == pytest.approx(eval_loss(root / "gptq", data), rel=1e-6)
    assert runs["summaries"]["gptq"]["fallbacks"] == 0
    reference = streamed_logits(model, validation)
    gptq, rtn = ((streamed_logits(root / m, validation) - reference).pow(2).mean().item() for m in ("gptq", "rtn"))
    assert gptq < rtn, (gptq, rtn)


def assert_packed_eval_on_the_gpu(quantized: Path, packed: Path, data: Path) -> None:
    """`qmoe eval --device cuda` of a packed checkpoint: the grouped kernels compute what the
    quantized checkpoint's experts do (bf16, 1e-3), and what the CPU computes (fp32, 1e-5)."""
    q, p = (eval_loss(m, data, "cuda", "bfloat16") for m in (quantized, packed))
    assert abs(p - q) <= 1e-3 * q, (p, q)
    gpu, cpu = (eval_loss(packed, data, device, "float32") for device in ("cuda", "cpu"))
    assert abs(gpu - cpu) <= 1e-5 * cpu, (gpu, cpu)
