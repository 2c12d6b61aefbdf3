"""`qmoe export`: a checkpoint of any kind as a Hugging Face checkpoint that transformers loads and
that computes our runtime's logits; compressed-tensors' packed layout decoding to exactly our
expert weights; the model card; one-line usage errors with nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import save_hf_decoder, save_hf_switch, write_causal_tokenizer_json

import qmoe_cli
from qmoe_cli.cli import main
from qmoe_cli.export.compressed_tensors import centred, pack_int32, ternary_as_affine
from qmoe_cli.formats.open import open_model
from qmoe_cli.resources import package_dir
from qmoe_cli.run.stream import RunConfig, streamed_states

CPU = torch.device("cpu")
FP32_EPS = torch.finfo(torch.float32).eps


def _ids(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for _ in range(count)]


def _run(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


def _compress(model: Path, out: Path, bits: str, calib: Path, *flags: str) -> Path:
    result = _run("compress", "--model", str(model), "--calib", str(calib), "--out", str(out), "--bits", bits,
                  "--method", "rtn", "--device", "cpu", "--calib-samples", "8", *flags)
    assert result.exit_code == 0, result.output
    return out


def _export(checkpoint: Path, out: Path, fmt: str) -> Path:
    result = _run("export", str(checkpoint), "--format", fmt, "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == fmt
    return out


def _our_logits(directory: Path, input_ids: list[int], labels: list[int]) -> torch.Tensor:
    """Logits [T, vocab] fp32 of our streamed runner (what `qmoe eval` scores) for one sample."""
    weights = open_model(str(directory)).weights
    states = streamed_states(weights, weights.arch.stack_tokens([input_ids], [labels]),
                             RunConfig(CPU, torch.float32, progress=False))
    return weights.arch.head(weights.tensor, CPU, torch.float32)(states.data)


def _tolerance(reference: torch.Tensor, depth: int, width: int) -> float:
    """Two fp32 computations of the same weights in another operation order: each rounding is at
    most eps relative, a dot product of `width` terms accumulates up to `width` of them and every
    block passes its error on; scaled by the logits' magnitude."""
    return float(reference.abs().max()) * FP32_EPS * width * depth


def _decoder(root: Path, family: str) -> tuple[Path, Path]:
    """A transformers-written tiny decoder of `family` with a tokenizer, and calibration ids for it."""
    model = root / family
    save_hf_decoder(model, family)
    write_causal_tokenizer_json(model)
    calib = root / f"{family}-calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in _ids(8, 20, 64, seed=0)))
    return model, calib


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict:
    """A transformers-written Qwen2-MoE (shared experts) compressed to 4 bits and packed, and to
    ternary, each with min-max and with symmetric grids."""
    root = tmp_path_factory.mktemp("export-qwen")
    model, calib = _decoder(root, "qwen2_moe")
    q4 = _compress(model, root / "q4", "4", calib, "--pack")
    ternary = _compress(model, root / "t", "ternary", calib)
    q4_sym = _compress(model, root / "q4s", "4", calib, "--symmetric", "--pack")
    with pytest.MonkeyPatch.context() as patch:  # through the Python API, to its default output name
        patch.chdir(root)
        ternary_sym = qmoe_cli.compress(model, qmoe_cli.CompressConfig(bits="ternary", method="rtn", symmetric=True),
                                        calib=str(calib), calib_samples=8, device="cpu").out.resolve()
    assert ternary_sym == root / "qwen2_moe-rtn-ternary-sym"
    return dict(root=root, model=model, q4=q4, packed=root / "q4-packed", ternary=ternary, q4_sym=q4_sym,
                packed_sym=root / "q4s-packed", ternary_sym=ternary_sym)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> dict:
    """A transformers-written Mixtral (no shared expert) compressed to 3 bits with symmetric grids
    of 16 columns (compressed-tensors' group strategy; 3 bits: codes straddle int32 words)."""
    root = tmp_path_factory.mktemp("export-mixtral")
    model, calib = _decoder(root, "mixtral")
    return dict(model=model, q3_sym_g16=_compress(model, root / "q3", "3", calib, "--symmetric", "--grid-group", "16"))


@pytest.mark.parametrize("which", ["q4", "packed", "ternary"])
def test_hf_export_of_a_compressed_decoder_computes_our_logits(qwen: dict, which: str, tmp_path: Path) -> None:
    import transformers

    out = _export(qwen[which], tmp_path / "hf", "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for seq in _ids(3, 17, 64, seed=4):
        ours = _our_logits(qwen[which], seq, seq)
        with torch.no_grad():
            theirs = model(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(theirs, ours, rtol=0, atol=_tolerance(ours, depth=3, width=48))
    # the experts are the quantized ones, not the original's
    original = transformers.AutoModelForCausalLM.from_pretrained(qwen["model"]).eval()
    with torch.no_grad():
        assert (original(torch.tensor([seq])).logits[0] - ours).abs().max() > 1e-3


def test_hf_export_of_shipped_tiny_mixtral_is_the_original(tmp_path: Path) -> None:
    """An original checkpoint exports to itself: same tensors, same logits."""
    import transformers
    from safetensors.torch import load_file

    source = package_dir() / "assets" / "tiny-mixtral"
    out = _export(source, tmp_path / "hf", "hf")
    exported = {k: v for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    original = load_file(source / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    seq = _ids(1, 21, 955, seed=2)[0]
    with torch.no_grad():
        theirs = model(torch.tensor([seq])).logits[0]
    ours = _our_logits(source, seq, seq)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=_tolerance(ours, depth=4, width=128))


def test_hf_export_of_a_ternary_switch_loads_in_transformers(tmp_path: Path) -> None:
    import transformers

    model = save_hf_switch(tmp_path / "switch")
    (model / "tokenizer.json").write_bytes((package_dir() / "assets/tiny-switch/tokenizer.json").read_bytes())
    calib = tmp_path / "calib.jsonl"
    samples = [{"input_ids": a, "labels": b} for a, b in zip(_ids(8, 12, 96, 0), _ids(8, 6, 96, 1))]
    calib.write_text("".join(json.dumps(s) + "\n" for s in samples))
    quantized = _compress(model, tmp_path / "t", "ternary", calib)
    out = _export(quantized, tmp_path / "hf", "hf")
    exported = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out).eval()
    inputs, labels = _ids(1, 13, 96, seed=5)[0], _ids(1, 7, 96, seed=6)[0]
    ours = _our_logits(quantized, inputs, labels)
    with torch.no_grad():
        theirs = exported(input_ids=torch.tensor([inputs]),
                          decoder_input_ids=torch.tensor([[0] + labels[:-1]])).logits[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=_tolerance(ours, depth=4, width=32))


def test_card_names_the_quantization(qwen: dict, tmp_path: Path) -> None:
    out = _export(qwen["q4"], tmp_path / "hf", "hf")
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model:" in front and "library_name: \"transformers\"" in front and "\"4-bit\"" in front
    assert "| expert bits | 4 |" in card


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(5, 37), (3, 64), (1, 1), (7, 97)])
def test_pack_int32_is_compressed_tensors_layout(bits: int, shape: tuple[int, int]) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(bits * 100 + shape[1]))
    ours = pack_int32(codes.to(torch.uint8), bits)
    signed = (codes - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(ours, pack_to_int32(signed, bits))
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape)), signed)


def _decompressed(out: Path, name: str) -> torch.Tensor:
    """Weight `name` of a compressed-tensors export as compressed-tensors itself decodes it (fp32)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(config["config_groups"]["group_0"])
    module = name.removesuffix(".weight")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = load_file(out / index[f"{module}.weight_packed"])
    state = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".weight_")}
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


@pytest.mark.parametrize("which, bits, symmetric", [("q4", 4, False), ("packed", 4, False), ("q4_sym", 4, True),
                                                   ("packed_sym", 4, True), ("ternary_sym", 2, True)])
def test_compressed_tensors_export_decodes_to_our_expert_weights(qwen: dict, which: str, bits: int, symmetric: bool,
                                                                 tmp_path: Path) -> None:
    """compressed-tensors' own decoder gives exactly (bit for bit) the fp32 weights our runtime
    dequantizes, routed and shared experts alike; symmetric grids are stored without zero points."""
    out = _export(qwen[which], tmp_path / "ct", "compressed-tensors")
    weights = open_model(str(qwen[which])).weights
    arch, packed = weights.arch, which.startswith("packed")
    for stack, i in arch.sparse_blocks():
        bank = weights.experts(stack, i)
        for j in range(arch.num_experts):
            for m in arch.expert.matrices:
                ours = dict(bank.matrices([j]))[j][m].dense(0, 10**9) if packed else bank.matrix(j, m)
                assert torch.equal(_decompressed(out, arch.expert_tensor(stack, i, j, m)), ours)
        for m in arch.shared_expert.matrices:
            ours = bank.shared_matrices()[m].dense(0, 10**9) if packed else bank.matrix("shared", m)
            assert torch.equal(_decompressed(out, arch.shared_tensor(stack, i, m)), ours)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights_config = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "pack-quantized" and weights_config["num_bits"] == bits
    assert weights_config["symmetric"] is symmetric
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(name.endswith(".weight_zero_point") for name in index) is not symmetric


def _assert_transformers_computes_our_logits(checkpoint: Path, out: Path, width: int) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for seq in _ids(2, 17, 64, seed=4):
        ours = _our_logits(checkpoint, seq, seq)
        with torch.no_grad():
            theirs = model(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(theirs, ours, rtol=0, atol=_tolerance(ours, depth=3, width=width))


@pytest.mark.parametrize("which", ["q4_sym", "packed_sym", "ternary_sym"])
def test_transformers_loads_a_symmetric_compressed_tensors_export(qwen: dict, which: str, tmp_path: Path) -> None:
    """transformers (with compressed-tensors) loads a symmetric export into its fused Qwen2-MoE
    experts, shared expert included, and computes our logits to fp32 rounding."""
    out = _export(qwen[which], tmp_path / "ct", "compressed-tensors")
    _assert_transformers_computes_our_logits(qwen[which], out, width=48)


def test_transformers_loads_a_symmetric_grouped_mixtral_export(mixtral: dict, tmp_path: Path) -> None:
    out = _export(mixtral["q3_sym_g16"], tmp_path / "ct", "compressed-tensors")
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["strategy"], weights["group_size"], weights["num_bits"]) == ("group", 16, 3)
    _assert_transformers_computes_our_logits(mixtral["q3_sym_g16"], out, width=48)


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="transformers 5.25 decompresses fused MoE experts without their zero points "
                          "(CompressedTensorsDequantize's DummyModule), so asymmetric pack-quantized experts fail")
def test_transformers_loads_an_asymmetric_compressed_tensors_export(qwen: dict, tmp_path: Path) -> None:
    out = _export(qwen["q4"], tmp_path / "ct", "compressed-tensors")
    _assert_transformers_computes_our_logits(qwen["q4"], out, width=48)


def test_asymmetric_export_says_what_transformers_cannot_load(qwen: dict, tmp_path: Path) -> None:
    result = _run("export", str(qwen["q4"]), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"))
    assert result.exit_code == 0, result.output
    assert "zero points" in result.stderr and "--symmetric" in result.stderr
    card = (tmp_path / "ct" / "README.md").read_text()
    assert "asymmetric integer grids" in card
    result = _run("export", str(qwen["q4_sym"]), "--format", "compressed-tensors", "--out", str(tmp_path / "cs"))
    assert result.exit_code == 0 and "--symmetric" not in result.stderr
    card = (tmp_path / "cs" / "README.md").read_text()
    assert "(symmetric integer grids)" in card and "| symmetric grids (zero point 2^(b-1)) | True |" in card


def test_ternary_grids_map_to_affine_two_bit_exactly() -> None:
    lo = torch.tensor([[-1.0], [-2.0], [-0.5], [0.0], [-3.0], [0.0]])
    hi = torch.tensor([[1.0], [1.0], [1.0], [2.0], [0.0], [0.0]])
    codes = torch.tensor([[0, 1, 2, 2, 0]] * 6, dtype=torch.uint8)
    q, scale, zero = ternary_as_affine(codes, lo, hi, None, "m")
    values = torch.where(codes == 0, lo, torch.where(codes == 2, hi, 0.0))
    assert torch.equal(scale * (q.float() - zero), values)
    assert int(q.max()) <= 3
    with pytest.raises(ValueError, match="row 0's ternary grid .* not an affine 2-bit grid"):
        ternary_as_affine(codes[:1], torch.tensor([[-1.0]]), torch.tensor([[1.5]]), None, "m")


def test_symmetric_checkpoints_record_run_and_pack_like_any_other(qwen: dict) -> None:
    """The manifest records the setting, every stored grid is symmetric, `qmoe info` shows it, and
    the packed checkpoint computes the quantized one's logits (packing is lossless)."""
    weights = open_model(str(qwen["q4_sym"])).weights
    arch, bank = weights.arch, weights.experts(*weights.arch.sparse_blocks()[0])
    for j in range(arch.num_experts):
        assert torch.all(bank.stored(j, arch.expert.matrices[0])["zero"] == 8)
    for which in ("q4_sym", "packed_sym", "ternary_sym"):
        info = _run("info", str(qwen[which]), "--json")
        assert info.exit_code == 0, info.output
        assert json.loads(info.stdout)["settings"]["symmetric"] is True
    assert "symmetric" not in json.loads(_run("info", str(qwen["q4"]), "--json").stdout)["settings"]
    assert "rtn 4 symmetric," in _run("info", str(qwen["packed_sym"])).stdout
    for seq in _ids(2, 17, 64, seed=7):
        ours = _our_logits(qwen["q4_sym"], seq, seq)
        torch.testing.assert_close(_our_logits(qwen["packed_sym"], seq, seq), ours, rtol=0,
                                   atol=_tolerance(ours, depth=3, width=48))


def test_centred_codes_keep_their_values_and_refuse_an_asymmetric_grid() -> None:
    codes = torch.randint(0, 16, (5, 12), generator=torch.Generator().manual_seed(3)).to(torch.uint8)
    scale = torch.rand(5, 3) + 0.5  # [rows, G], groups of 4 columns
    group_of = torch.arange(12) // 4
    stored = centred(codes, torch.full((5, 3), 8.0), 4, 4, "m")
    assert torch.equal(stored, codes)  # the fixed zero point 2^(b-1): our codes as they are
    zero = torch.tensor([[1.0, 1.0, 0.0]] * 5)  # ternary {-a, 0, a} as 2-bit: zero 1 (0: an all-zero row)
    ternary = torch.randint(0, 3, (5, 12), generator=torch.Generator().manual_seed(4)).to(torch.uint8)
    ternary[:, 8:] = 0
    stored = centred(ternary, zero, 2, 4, "m")
    values = scale[:, group_of] * (ternary.float() - zero[:, group_of])
    assert torch.equal(scale[:, group_of] * (stored.float() - 2), values)
    with pytest.raises(ValueError, match="m: row 0's grid is not symmetric"):
        centred(codes, torch.full((5, 3), 3.0), 4, 4, "m")


def test_min_max_ternary_refused_for_compressed_tensors(qwen: dict, tmp_path: Path) -> None:
    out = tmp_path / "ct"
    result = _run("export", str(qwen["ternary"]), "--format", "compressed-tensors", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "not an affine 2-bit grid" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".ct*"))


def test_usage_errors_are_one_line_and_write_nothing(qwen: dict, tmp_path: Path) -> None:
    out = tmp_path / "x"
    result = _run("export", str(qwen["q4"]), "--format", "gguf", "--out", str(out))
    assert result.exit_code == 2 and "gguf" in result.output
    result = _run("export", str(qwen["model"]), "--format", "compressed-tensors", "--out", str(out))
    assert result.exit_code == 2 and "original checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = _run("export", str(tmp_path / "missing"), "--format", "hf", "--out", str(out))
    assert result.exit_code in (1, 2) and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".x*"))
