"""Block-scaled fp8 checkpoints (DeepSeek-V3's hub format) are read by dequantizing each weight
on read: equal to a block-by-block reference, evaluated as the same checkpoint stored
dequantized in fp32, compressed without fp8 or scale tensors in the output."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import causal_lm_loss, save_hf_decoder, write_causal_tokenizer_json
from safetensors.torch import load_file, save_file

from qmoe_cli.cli import main
from qmoe_cli.errors import QmoeError
from qmoe_cli.formats.fp8 import BlockFp8, block_fp8_scheme, dequantize
from qmoe_cli.formats.hf import CheckpointWeights, resolve_model
from qmoe_cli.formats.integrity import file_record, manifest_digest
from qmoe_cli.formats.quantized import HEAD_FILE

BLOCK = (8, 16)  # [rows, cols]: the tiny shapes (12, 24, 32, 48 rows; 8, 24, 32 columns) end in partial blocks
VOCAB = 64


def reference_dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[rows, cols] fp8 -> fp32, one block at a time: block (i, j) times scale[i, j]."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    br, bc = block
    for i in range(math.ceil(weight.shape[0] / br)):
        for j in range(math.ceil(weight.shape[1] / bc)):
            out[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = \
                weight[i * br:(i + 1) * br, j * bc:(j + 1) * bc].to(torch.float32) * scale[i, j]
    return out


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] float -> ([rows, cols] float8_e4m3fn, [ceil(rows/br), ceil(cols/bc)] fp32
    scales), each block scaled so its largest magnitude maps to fp8's largest finite value."""
    br, bc = block
    scale = torch.empty(math.ceil(weight.shape[0] / br), math.ceil(weight.shape[1] / bc))
    q = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = weight[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
            scale[i, j] = part.abs().max().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (part / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def _is_fp8_linear(name: str, tensor: torch.Tensor) -> bool:
    """What DeepSeek-V3 ships in fp8: the 2-D linear weights of its blocks, not the router."""
    return name.startswith("model.layers.") and tensor.dim() == 2 and not name.endswith("mlp.gate.weight")


def _save_sharded(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Two shards and an index, split so some scales lie in another shard than their weight."""
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n].contiguous() for n in part}, directory / file, metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}))


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _write_config(directory: Path, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config))


def write_checkpoints(root: Path, block: tuple[int, int]) -> dict:
    """A tiny DeepSeek-V3 in the hub's layout (fp8 linears with `block` scales, everything else
    bf16) under root/fp8, and the same model with those weights dequantized by the reference, all
    in fp32, under root/fp32; with pre-tokenized data."""
    save_hf_decoder(root / "source", "deepseek_v3")
    source = load_file(root / "source" / "model.safetensors")
    fp8, dequantized, scales = {}, {}, {}
    for name, tensor in source.items():
        if _is_fp8_linear(name, tensor):
            q, scale = quantize_fp8(tensor, block)
            fp8[name], fp8[name + "_scale_inv"], scales[name] = q, scale, scale
            dequantized[name] = reference_dequantize(q, scale, block)
        else:
            fp8[name] = tensor.to(torch.bfloat16)
            dequantized[name] = fp8[name].float()
    config = _config(root / "source")
    for name in ("fp8", "fp32"):
        (root / name).mkdir()
    _save_sharded(fp8, root / "fp8")
    _write_config(root / "fp8", {**config, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block), "activation_scheme": "dynamic"}})
    save_file(dequantized, root / "fp32" / "model.safetensors", metadata={"format": "pt"})
    _write_config(root / "fp32", config)
    sequences = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                 for n in (2, 9, 17, 24, 31, 12)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in sequences))
    return dict(root=root, fp8=root / "fp8", fp32=root / "fp32", scales=scales, fp8_tensors=fp8,
                dequantized=dequantized, data=data, sequences=sequences)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    return write_checkpoints(tmp_path_factory.mktemp("fp8"), BLOCK)


@pytest.mark.parametrize("shape,block", [((97, 130), (128, 128)), ((300, 257), (128, 128)), ((1, 1), (128, 128)),
                                         ((256, 384), (128, 128)), ((37, 50), (8, 16)), ((23, 19), (5, 3))])
def test_dequantize_equals_the_block_loop(shape: tuple[int, int], block: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    weight = (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand((math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])), generator=g) * 1e-2
    reference = reference_dequantize(weight, scale, block)
    assert torch.equal(dequantize(weight, scale, BlockFp8(*block), torch.float32), reference)
    assert torch.equal(dequantize(weight, scale, BlockFp8(*block), torch.bfloat16), reference.to(torch.bfloat16))


MEMORY_CHILD = """
import sys, torch
from pathlib import Path
from qmoe_cli.formats.fp8 import BlockFp8
from qmoe_cli.formats.hf import CheckpointReader
reader = CheckpointReader(Path(sys.argv[1]), fp8=BlockFp8(128, 128))
small = reader.get("small.weight", torch.bfloat16)  # warms every code path on a tiny tensor
def peak():  # VmHWM: this address space's peak resident set
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
before = peak()
big = reader.get("big.weight", torch.bfloat16)
print(peak() - before, big.shape[0] * big.shape[1])
"""


def test_reading_an_fp8_tensor_holds_one_fp32_copy(tmp_path: Path) -> None:
    """Peak memory of reading a [4096, 4000] fp8 weight as bf16: its fp8 bytes (16 MB), one fp32
    copy (64 MB) and the result (32 MB); a full-size scale grid or an out-of-place product
    would each add another 64 MB."""
    import subprocess
    import sys
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in (("small", (130, 200)), ("big", (4096, 4000))):
        tensors[name + ".weight"] = torch.randn(shape, generator=g).to(torch.float8_e4m3fn)
        tensors[name + ".weight_scale_inv"] = torch.rand((math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)))
    save_file(tensors, tmp_path / "model.safetensors")
    del tensors
    result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path)], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent.parent)
    growth, numel = map(int, result.stdout.split())
    assert growth <= numel * (1 + 4 + 2) + 8 * 2**20, (growth, numel)


def test_reader_dequantizes_fp8_weights_and_hides_scales(checkpoints: dict) -> None:
    weights = CheckpointWeights(resolve_model(str(checkpoints["fp8"])))
    assert weights.stored_dtype() == torch.bfloat16
    assert checkpoints["scales"] and not any(name.endswith("_scale_inv") for name in weights.reader.weight_map)
    for name, expected in checkpoints["dequantized"].items():
        assert torch.equal(weights.tensor(name, torch.float32, torch.device("cpu")), expected), name
        # dtype None: what a compressed checkpoint stores, fp8 weights in the unquantized tensors' dtype
        assert torch.equal(weights.tensor(name, None, torch.device("cpu")), expected.to(torch.bfloat16)), name
    weights.close()


def _eval(model: Path, data: Path) -> dict:
    result = CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(data), "--device", "cpu",
                                       "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_equals_the_dequantized_checkpoint(checkpoints: dict) -> None:
    fp8, fp32 = _eval(checkpoints["fp8"], checkpoints["data"]), _eval(checkpoints["fp32"], checkpoints["data"])
    assert fp8["tokens"] == sum(len(s) - 1 for s in checkpoints["sequences"])
    assert fp8["loss"] == fp32["loss"]  # the same fp32 weights, the same arithmetic
    # transformers' reading of the fp8 checkpoint cannot be the reference: it derives the block
    # from the scale grid, which is wrong where edge blocks are partial (see the test below); it
    # evaluates the dequantized checkpoint, which ties the fp8 reading to it
    import transformers
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(checkpoints["fp32"]).eval()
    assert fp8["loss"] == pytest.approx(causal_lm_loss(reference, checkpoints["sequences"]), rel=1e-5)
    assert abs(fp8["loss"] - math.log(VOCAB)) > 0.3


def test_eval_equals_transformers_reading_fp8_where_blocks_divide_the_shapes(tmp_path: Path) -> None:
    """transformers dequantizes fp8 on CPU (it needs `accelerate` for that) with the block size
    taken as shape / scale grid: right only where every block is whole, as at 4x4 here."""
    pytest.importorskip("accelerate", reason="transformers loads fp8 checkpoints only with accelerate")
    import transformers
    checkpoints = write_checkpoints(tmp_path, (4, 4))
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(checkpoints["fp8"], dtype=torch.float32).eval()
    expected = causal_lm_loss(reference, checkpoints["sequences"])
    assert _eval(checkpoints["fp8"], checkpoints["data"])["loss"] == pytest.approx(expected, rel=1e-5)


def test_generate_equals_the_dequantized_checkpoint(checkpoints: dict) -> None:
    outputs = []
    for model in (checkpoints["fp8"], checkpoints["fp32"]):
        write_causal_tokenizer_json(model, VOCAB)
        result = CliRunner().invoke(main, ["generate", "--model", str(model), "--device", "cpu", "--json",
                                           "--prompt", "w1 w5 w9 w2", "--prompt", "w40 w3", "--max-new-tokens", "6"])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.stdout)["outputs"])
    assert outputs[0] == outputs[1] and all(out["tokens"] for out in outputs[0])


def _compress(model: Path, out: Path, calib: Path) -> dict:
    result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--out", str(out),
                                       "--bits", "ternary", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def compressed(checkpoints: dict) -> tuple[Path, Path]:
    """(the fp8 checkpoint compressed to ternary with GPTQ, the fp32 copy compressed alike)."""
    root = checkpoints["root"]
    out, reference = root / "fp8-ternary", root / "fp32-ternary"
    _compress(checkpoints["fp8"], out, checkpoints["data"])
    _compress(checkpoints["fp32"], reference, checkpoints["data"])
    return out, reference


def test_compress_stores_dense_tensors_dequantized(checkpoints: dict, compressed: tuple[Path, Path]) -> None:
    out, reference = compressed
    manifest = json.loads((out / "manifest.json").read_text())
    assert "quantization_config" not in manifest["config"] and not (out / "config.json").exists()
    dense = [Path(HEAD_FILE)] + sorted(p.relative_to(out) for p in (out / "blocks").glob("*.safetensors"))
    assert len(dense) == 4  # the head and 3 blocks
    for file in dense:
        stored = load_file(out / file)
        assert stored and not any(n.endswith("_scale_inv") for n in stored), file
        for name, tensor in stored.items():
            assert tensor.dtype == torch.bfloat16, (file, name, tensor.dtype)
            assert torch.equal(tensor, checkpoints["dequantized"][name].to(torch.bfloat16)), (file, name)
    # Calibration ran on the same fp32 weights, so the experts' codes are the same bytes.
    experts = sorted(p.relative_to(out) for p in (out / "experts").rglob("*.safetensors"))
    assert experts and all(_sha(out / p) == _sha(reference / p) for p in experts)
    assert _eval(out, checkpoints["data"])["tokens"] == sum(len(s) - 1 for s in checkpoints["sequences"])
    info = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["kind"] == manifest["kind"]


def test_a_compressed_checkpoint_with_an_fp8_dense_tensor_is_refused(checkpoints: dict, compressed: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    """Its scales are not kept, so an fp8 dense tensor there could only be misread."""
    directory = tmp_path / "q"
    shutil.copytree(compressed[0], directory)
    block = directory / "blocks" / "decoder-001.safetensors"
    tensors = load_file(block)
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, block)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"] = {name: file_record(directory / name) for name in manifest["files"]}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(directory, checkpoints["data"], "decoder-001.safetensors", "self_attn.o_proj.weight",
                    "float8_e4m3fn", "16- or 32-bit floating dtype")


def _broken(checkpoints: dict, name: str, tensors: dict, config: dict | None = None) -> Path:
    directory = checkpoints["root"] / name
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    _write_config(directory, config if config is not None else _config(checkpoints["fp8"]))
    return directory


def _one_line_error(model: Path, data: Path, *fragments: str) -> None:
    result = CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(data), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], result.stderr


FP8_NAME = "model.layers.1.mlp.experts.3.down_proj.weight"


def test_missing_scale_is_an_error(checkpoints: dict) -> None:
    tensors = {n: t for n, t in checkpoints["fp8_tensors"].items() if n != FP8_NAME + "_scale_inv"}
    _one_line_error(_broken(checkpoints, "no-scale", tensors), checkpoints["data"], FP8_NAME, "_scale_inv")


def test_misshaped_scale_is_an_error(checkpoints: dict) -> None:
    tensors = dict(checkpoints["fp8_tensors"])
    tensors[FP8_NAME + "_scale_inv"] = tensors[FP8_NAME + "_scale_inv"][:, :1].contiguous()
    _one_line_error(_broken(checkpoints, "bad-scale", tensors), checkpoints["data"], FP8_NAME, "[4, 1]", "[4, 2]")


def test_fp8_without_quantization_config_is_an_error(checkpoints: dict) -> None:
    config = {k: v for k, v in _config(checkpoints["fp8"]).items() if k != "quantization_config"}
    _one_line_error(_broken(checkpoints, "no-config", dict(checkpoints["fp8_tensors"]), config),
                    checkpoints["data"], "float8_e4m3fn", "quantization_config")


@pytest.mark.parametrize("change,fragment", [
    ({"quant_method": "awq"}, "'awq'"), ({"fmt": "e5m2"}, "'e5m2'"), ({"weight_block_size": None}, "None"),
    ({"weight_block_size": [128, 0]}, "[128, 0]"), ({"activation_scheme": "static"}, "'static'")])
def test_unsupported_quantization_config_is_an_error(checkpoints: dict, tmp_path: Path, change: dict,
                                                     fragment: str) -> None:
    config = _config(checkpoints["fp8"])
    config["quantization_config"] = {**config["quantization_config"], **change}
    directory = tmp_path / "model"
    directory.mkdir()
    for file in checkpoints["fp8"].iterdir():
        (directory / file.name).symlink_to(file)
    (directory / "config.json").unlink()
    _write_config(directory, config)
    _one_line_error(directory, checkpoints["data"], "config.json", "quantization_config", fragment)
    with pytest.raises(QmoeError, match="config.json"):
        block_fp8_scheme(config, directory / "config.json")
