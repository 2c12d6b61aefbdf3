"""MXFP4 GPT-OSS checkpoints (`formats/mxfp4.py`): the dequantization against transformers' own
(`convert_moe_packed_tensors`), and a checkpoint storing its experts as `*_blocks`/`*_scales`
evaluated, compressed and refused when incomplete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import causal_lm_loss, save_hf_decoder
from safetensors.torch import load_file, save_file

from qmoe_cli.cli import main
from qmoe_cli.formats.mxfp4 import dequantize_mxfp4


def _random_mxfp4(shape: tuple[int, ...], g: torch.Generator, low: int = 120, high: int = 126):
    """blocks [*shape, G, 16] uint8 (every nibble) and scales [*shape, G] uint8 in [low, high)."""
    *rows, cols = shape
    blocks = torch.randint(0, 256, (*rows, cols // 32, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(low, high, (*rows, cols // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("shape", [(3, 5, 64), (1, 7, 32), (2, 1, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dequantize_equals_transformers(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(sum(shape))
    # The whole exponent range that stays finite and normal in bf16 and fp32, and every nibble.
    blocks, scales = _random_mxfp4(shape, g, low=1, high=254)
    ours = dequantize_mxfp4(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.shape == (shape[0], shape[2], shape[1]) and ours.dtype == dtype
    assert torch.equal(ours, theirs)


def test_dequantize_refuses_mismatched_scales() -> None:
    blocks, scales = _random_mxfp4((2, 3, 64), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="must match"):
        dequantize_mxfp4(blocks, scales[..., :1], torch.float32)


def _mxfp4_checkpoint(directory: Path, seed: int = 0):
    """A tiny GPT-OSS whose experts are random MXFP4 (hidden and expert width 64, two scales per
    row), written as the hub does; returns transformers' model holding the dequantized weights."""
    model = save_hf_decoder(directory, "gpt_oss", seed=seed,
                            config_override=dict(hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                                 head_dim=16))
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(seed)
    tensors = load_file(directory / "model.safetensors")
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(experts, name)  # [E, in, out]
                blocks, scales = _random_mxfp4((param.shape[0], param.shape[2], param.shape[1]), g)
                param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                key = f"model.layers.{i}.mlp.experts.{name}"
                del tensors[key]
                tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}
    (directory / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory) -> tuple[Path, object]:
    directory = tmp_path_factory.mktemp("mxfp4") / "model"
    return directory, _mxfp4_checkpoint(directory)


def _data(path: Path, count: int = 8, seed: int = 1) -> tuple[Path, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (7, 13, 21, 16, 9, 3, 18, 11)[:count]]
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in sequences))
    return path, sequences


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_mxfp4_checkpoint_eval_equals_transformers(mxfp4_model, tmp_path: Path) -> None:
    directory, reference = mxfp4_model
    data, sequences = _data(tmp_path / "data.jsonl")
    result = _run("eval", "--model", str(directory), "--data", str(data), "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loss"] == pytest.approx(causal_lm_loss(reference, sequences), rel=1e-5)


def test_mxfp4_checkpoint_compresses_from_the_dequantized_values(mxfp4_model, tmp_path: Path) -> None:
    """RTN of an MXFP4 checkpoint is RTN of the same weights stored unquantized: byte-identical codes."""
    directory, reference = mxfp4_model
    plain = tmp_path / "plain"
    reference.save_pretrained(plain)
    data, _ = _data(tmp_path / "calib.jsonl")
    codes = []
    for source in (directory, plain):
        out = tmp_path / f"out-{source.name}"
        result = _run("compress", "--model", str(source), "--calib", str(data), "--method", "rtn", "--bits", "4",
                      "--out", str(out), "--device", "cpu")
        assert result.exit_code == 0, result.output
        codes.append({p.relative_to(out): p.read_bytes() for p in sorted(out.glob("experts/**/*.safetensors"))})
    assert codes[0] and codes[0] == codes[1]


@pytest.mark.parametrize("drop", ["_scales", "_blocks"])
def test_an_mxfp4_half_missing_is_a_one_line_error(mxfp4_model, tmp_path: Path, drop: str) -> None:
    directory, _ = mxfp4_model
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj" + drop]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    data, _ = _data(tmp_path / "data.jsonl")
    result = _run("eval", "--model", str(broken), "--data", str(data), "--device", "cpu")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "model.layers.1.mlp.experts.down_proj" in result.stderr and len(result.stderr.strip().splitlines()) == 1
