"""Shared experts (Qwen2-MoE's gated one, DeepSeek-V3's ungated `n_shared_experts`) quantized like
routed experts: stored as codes and grids in their own file, used by eval, GPTQ on every
calibration token, packed with the same dictionary, and `--shared-experts keep` as before. A
packed one runs on the grouped GPU path (`DeviceSharedExpert`) as the CPU decodes it: emulated
here, with the real kernels and `qmoe eval --device cuda` on a GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import causal_lm_loss, save_hf_decoder
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qmoe_cli.cli import main
from qmoe_cli.execute.grouped import DeviceExperts, DeviceSharedExpert
from qmoe_cli.execute.linear import GridLinear, PackedLinear
from qmoe_cli.formats.open import open_model
from qmoe_cli.formats.quantized import SHARED, QuantizedWeights
from qmoe_cli.formats.quantized_manifest import write_manifest
from qmoe_cli.run.resident import ResidentBank
from qmoe_cli.run.stream import RunConfig, default_sparse, load_block, streamed_states

FAMILIES = ("qwen2_moe", "deepseek_v3")  # gated shared expert; ungated, after a dense first block
SHARED_MODULE = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts"}
CPU = RunConfig(torch.device("cpu"), torch.float32, progress=False)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sequences(count: int, seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(count)]


def _jsonl(path: Path, sequences: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in sequences))
    return path


def _compress(model: Path, calib: Path, out: Path, *flags: str) -> dict:
    result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--out", str(out),
                                       "--device", "cpu", "--json", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _loss(model: Path, data: Path) -> float:
    result = CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(data), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["loss"]


@pytest.fixture(scope="module", params=FAMILIES)
def runs(request, tmp_path_factory) -> dict:
    """One family compressed with GPTQ (then packed) and with RTN, ternary."""
    family = request.param
    root = tmp_path_factory.mktemp(f"shared-{family}")
    model = root / "model"
    reference = save_hf_decoder(model, family)
    calib_sequences = _sequences(24, seed=2, lengths=(24, 17, 30))
    calib = _jsonl(root / "calib.jsonl", calib_sequences)
    summaries = {"gptq": _compress(model, calib, root / "gptq", "--pack"),
                 "rtn": _compress(model, calib, root / "rtn", "--method", "rtn")}
    return dict(family=family, root=root, model=model, reference=reference, calib=calib,
                calib_sequences=calib_sequences, summaries=summaries)


def _shared_files(directory: Path) -> list[Path]:
    return sorted((directory / "experts").glob("*/shared.safetensors"))


def test_shared_expert_is_stored_quantized_in_its_own_file(runs: dict) -> None:
    out, module = runs["root"] / "gptq", SHARED_MODULE[runs["family"]]
    weights = QuantizedWeights.open(out)
    arch = weights.arch
    assert weights.shared and arch.shared_expert is not None
    assert runs["summaries"]["gptq"]["settings"]["shared_experts"] == "quantize"
    files = _shared_files(out)
    assert len(files) == len(arch.sparse_blocks())
    for (stack, i), path in zip(arch.sparse_blocks(), files):
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert sorted(tensors) == sorted(f"shared.{m}.{t}" for m in arch.shared_expert.matrices
                                         for t in ("codes", "lo", "hi"))
        for m, (rows, cols) in arch.shared_expert.shapes.items():
            codes = tensors[f"shared.{m}.codes"]
            assert codes.dtype == torch.uint8 and codes.shape == (rows, cols) and int(codes.max()) <= 2
            assert set(codes.unique().tolist()) == {0, 1, 2}  # ternary, and not all one value
            assert tensors[f"shared.{m}.lo"].shape == (rows, 1) and bool((tensors[f"shared.{m}.lo"] <= 0).all())
        with safe_open(str(out / f"blocks/{stack}-{i:03d}.safetensors"), "pt") as f:
            block_tensors = list(f.keys())
        assert not [k for k in block_tensors if f".{module}." in k]  # no `.weight` of it stays as stored
        if runs["family"] == "qwen2_moe":  # its sigmoid gate is a 1 x d vector: kept as stored
            assert f"model.layers.{i}.mlp.shared_expert_gate.weight" in block_tensors


def test_bits_per_weight_count_the_shared_expert(runs: dict) -> None:
    arch = QuantizedWeights.open(runs["root"] / "gptq").arch
    routed = sum(r * c for r, c in arch.expert.shapes.values()) * arch.num_experts
    shared = sum(r * c for r, c in arch.shared_expert.shapes.values())
    weights = len(arch.sparse_blocks()) * (routed + shared)
    packed = runs["summaries"]["gptq"]["packed"]
    assert packed["weights"] == weights and sum(layer["weights"] for layer in packed["layers"]) == weights
    result = CliRunner().invoke(main, ["info", str(runs["root"] / "gptq"), "--json", "--verify"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"] == weights


def _first_sparse_inputs(model: Path, sequences: list[list[int]]) -> tuple[str, int, torch.Tensor]:
    """(stack, index, normalised inputs [N, d] fp32) of the model's first sparse block, where the
    compressor saw exactly these (nothing before it is quantized)."""
    weights = open_model(str(model)).weights
    seen = []

    def capture(stack, index, block, buffer, run):
        if not seen:
            seen.append((stack, index, block.ffn_norm(buffer.data).clone()))
        default_sparse(stack, index, block, buffer, run)

    streamed_states(weights, weights.arch.stack_tokens(sequences, sequences), CPU, sparse_hook=capture)
    return seen[0]


def _shared_output(directory: Path, stack: str, index: int, x: torch.Tensor) -> torch.Tensor:
    weights = open_model(str(directory)).weights
    return load_block(weights, stack, index, CPU).shared_output(x)


def test_gptq_beats_rtn_on_the_shared_expert_output_on_calibration_tokens(runs: dict) -> None:
    stack, index, x = _first_sparse_inputs(runs["model"], runs["calib_sequences"])
    original = _shared_output(runs["model"], stack, index, x)
    error = {method: (_shared_output(runs["root"] / method, stack, index, x) - original).pow(2).sum().item()
             for method in ("gptq", "rtn")}
    assert 0 < error["gptq"] < error["rtn"], error
    assert runs["summaries"]["gptq"]["fallbacks"] == 0


def _by_hand(path: Path, matrix: str) -> torch.Tensor:
    """A ternary matrix of a shared expert file, dequantized here: code 0 -> lo, 1 -> 0, 2 -> hi."""
    tensors = load_file(str(path))
    codes, lo, hi = (tensors[f"shared.{matrix}.{t}"] for t in ("codes", "lo", "hi"))
    return torch.where(codes == 0, lo, torch.where(codes == 2, hi, torch.zeros(())))


def test_quantized_eval_equals_transformers_on_the_hand_dequantized_model(runs: dict, tmp_path: Path) -> None:
    """The checkpoint `transformers` computes when every routed expert is replaced by its
    dequantized codes and the shared expert by its codes dequantized by hand: qmoe eval of the
    quantized checkpoint gives its loss."""
    import transformers

    out = runs["root"] / "gptq"
    weights = QuantizedWeights.open(out)
    arch = weights.arch
    reference_dir = tmp_path / "reference"
    shutil.copytree(runs["model"], reference_dir)
    original = load_file(str(reference_dir / "model.safetensors"))
    tensors = dict(original)
    for (stack, i), path in zip(arch.sparse_blocks(), _shared_files(out)):
        bank = weights.experts(stack, i)
        for j in range(arch.num_experts):
            for m in arch.expert.matrices:
                tensors[arch.expert_tensor(stack, i, j, m)] = bank.matrix(j, m)
        bank.close()
        for m in arch.shared_expert.matrices:
            tensors[arch.shared_tensor(stack, i, m)] = _by_hand(path, m)
    sequences = _sequences(12, seed=3, lengths=(24, 17, 30))
    loss = _loss(out, _jsonl(tmp_path / "val.jsonl", sequences))

    def reference(shared_by_hand: bool) -> float:
        names = [arch.shared_tensor(s, i, m) for s, i in arch.sparse_blocks() for m in arch.shared_expert.matrices]
        state = {**tensors, **({} if shared_by_hand else {n: original[n] for n in names})}
        save_file(state, str(reference_dir / "model.safetensors"), metadata={"format": "pt"})
        return causal_lm_loss(transformers.AutoModelForCausalLM.from_pretrained(reference_dir).eval(), sequences)

    assert loss == pytest.approx(reference(shared_by_hand=True), rel=1e-5)
    # and not the loss of the same routed experts beside the shared expert as stored
    assert abs(reference(shared_by_hand=False) - loss) > 1e-3


def test_packing_is_lossless_for_the_shared_expert(runs: dict, tmp_path: Path) -> None:
    quantized, packed = (open_model(str(runs["root"] / name)).weights for name in ("gptq", "gptq-packed"))
    arch = quantized.arch
    x = torch.randn(97, arch.d_model, generator=torch.Generator().manual_seed(0))
    for stack, i in arch.sparse_blocks():
        q_bank, p_bank = quantized.experts(stack, i), packed.experts(stack, i)
        assert q_bank.stores_shared and p_bank.stores_shared
        q_parts, p_parts = q_bank.shared(CPU.device, CPU.dtype), p_bank.shared(CPU.device, CPU.dtype)
        for m in arch.shared_expert.matrices:
            assert isinstance(q_parts[m], GridLinear) and isinstance(p_parts[m], PackedLinear)
            rows = arch.shared_expert.shapes[m][0]
            assert torch.equal(p_parts[m].matrix.dense(0, rows), q_bank.matrix(SHARED, m))
            hidden = x if m != arch.shared_expert.output else torch.randn(97, arch.shared_expert.shapes[m][1])
            for n in (97, 5):  # the same function; the lookup layout sums in fp32 in another order
                assert torch.allclose(p_parts[m](hidden[:n]), q_parts[m](hidden[:n]), rtol=1e-5, atol=1e-6)
        q_bank.close()
    data = _jsonl(tmp_path / "val.jsonl", _sequences(12, seed=3, lengths=(24, 17, 30)))
    # Few tokens per call take the sparse product straight from the codewords: summation order only.
    assert _loss(runs["root"] / "gptq-packed", data) == pytest.approx(_loss(runs["root"] / "gptq", data), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_shared_expert_on_the_device_equals_its_cpu_form(kernel_device, runs: dict,
                                                                dtype: torch.dtype) -> None:
    """Every sparse block's shared output (Qwen's sigmoid gate included) with the shared expert
    uploaded compressed and run as a one-expert `DeviceExperts` (the tiles up to 32 tokens, the
    dense path beyond) against the same block on the CPU (`GatedMLP` over `PackedLinear`s)."""
    weights = open_model(str(runs["root"] / "gptq-packed")).weights
    arch, module = weights.arch, SHARED_MODULE[runs["family"]]
    assert arch.shared_expert.chain_activation == "silu_gated"
    for stack, i in arch.sparse_blocks():
        cpu_block = load_block(weights, stack, i, RunConfig(torch.device("cpu"), dtype, progress=False))
        assert isinstance(getattr(cpu_block.moe, module).gate_proj, PackedLinear)
        block = load_block(weights, stack, i, RunConfig(kernel_device, dtype, progress=False))
        if kernel_device.type == "cuda":  # load_block took the bank's GPU path itself
            assert isinstance(getattr(block.moe, module), DeviceSharedExpert)
        else:  # no GPU path on the CPU; the emulated one is built as the bank builds it on a GPU
            bank = weights.experts(stack, i)
            assert bank.shared_on_device(kernel_device, dtype) is None
            assert bank._device_unsupported(arch.shared_expert) is None
            block.use_shared(DeviceSharedExpert(DeviceExperts.upload(
                arch.shared_expert, weights.spec, [(SHARED, bank.shared_matrices())],
                weights.device_masks(kernel_device), kernel_device)))
        for n in (1, 5, 32, 45):
            x = torch.randn(n, arch.d_model, generator=torch.Generator().manual_seed(n)).to(dtype)
            with torch.no_grad():
                expected = cpu_block.shared_output(x)
                y = block.shared_output(x.to(kernel_device)).cpu()
            assert y.shape == expected.shape and y.dtype == dtype and float(expected.float().norm()) > 0
            rel = float((y.double() - expected.double()).norm() / expected.double().norm())
            assert rel <= (1e-6 if dtype == torch.float32 else 1e-2), f"{stack}.{i}, {n} tokens: {rel:.2e}"
            if dtype != torch.float32:  # the same contract: only the fp32 sums' order differs
                assert float((y == expected).float().mean()) >= 0.9, f"{stack}.{i}, {n} tokens"


def _eval(model: Path, data: Path, device: str, dtype: str) -> float:
    result = CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(data), "--device", device,
                                       "--dtype", dtype, "--json"])
    assert result.exit_code == 0, result.output
    assert "decode on the CPU" not in result.stderr, result.stderr  # the grouped kernels ran
    return json.loads(result.stdout)["loss"]


@needs_gpu
def test_packed_shared_expert_eval_on_the_gpu(runs: dict, tmp_path: Path) -> None:
    """`qmoe eval --device cuda`: the packed checkpoint's shared experts, resident and compressed
    on the GPU, compute what the quantized checkpoint's do (bf16) and what the CPU computes
    (fp32); uploaded once per bank and device; a host-streamed block keeps the CPU path."""
    quantized, packed = runs["root"] / "gptq", runs["root"] / "gptq-packed"
    weights = open_model(str(packed)).weights
    cuda = torch.device("cuda", torch.cuda.current_device())
    bank = weights.experts(*weights.arch.sparse_blocks()[0])
    on_device = bank.shared_on_device(cuda, torch.bfloat16)
    assert isinstance(on_device, DeviceSharedExpert) and bank.shared_on_device(cuda, torch.bfloat16) is on_device
    assert ResidentBank(bank, cuda, torch.bfloat16, 16).shared_on_device(cuda, torch.bfloat16) is on_device
    assert ResidentBank(bank, cuda, torch.bfloat16, 16, grouped=False).shared_on_device(cuda, torch.bfloat16) is None
    data = _jsonl(tmp_path / "val.jsonl", _sequences(12, seed=3, lengths=(24, 17, 30)))
    q, p = (_eval(m, data, "cuda", "bfloat16") for m in (quantized, packed))
    assert abs(p - q) <= 1e-3 * q, (p, q)
    gpu, cpu = (_eval(packed, data, device, "float32") for device in ("cuda", "cpu"))
    assert abs(gpu - cpu) <= 1e-5 * cpu, (gpu, cpu)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("shared-keep")
    model = root / "model"
    save_hf_decoder(model, "qwen2_moe")
    calib = _jsonl(root / "calib.jsonl", _sequences(16, seed=2, lengths=(24, 17, 30)))
    return dict(root=root, model=model, calib=calib)


def test_keep_leaves_shared_experts_as_stored(qwen: dict, tmp_path: Path) -> None:
    out = tmp_path / "keep"
    summary = _compress(qwen["model"], qwen["calib"], out, "--shared-experts", "keep")
    assert summary["settings"]["shared_experts"] == "keep" and not _shared_files(out)
    original = load_file(str(qwen["model"] / "model.safetensors"))
    block = load_file(str(out / "blocks/decoder-000.safetensors"))
    for m in ("gate_proj", "up_proj", "down_proj"):
        name = f"model.layers.0.mlp.shared_expert.{m}.weight"
        assert torch.equal(block[name], original[name])
    stack, index, x = _first_sparse_inputs(qwen["model"], [[1, 2, 3, 4, 5, 6]])
    assert torch.equal(_shared_output(out, stack, index, x), _shared_output(qwen["model"], stack, index, x))
    # A checkpoint written before the setting existed (no `shared_experts`) reads as kept...
    data = _jsonl(tmp_path / "val.jsonl", _sequences(6, seed=3, lengths=(24, 17)))
    loss = _loss(out, data)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["settings"]["shared_experts"]
    write_manifest(out, manifest)
    assert _loss(out, data) == loss
    # ... and a value this qmoe does not know is a one-line error.
    manifest["settings"]["shared_experts"] = "maybe"
    write_manifest(out, manifest)
    result = CliRunner().invoke(main, ["eval", "--model", str(out), "--data", str(data), "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output and result.stderr.count("\n") == 1
    assert "settings.shared_experts must be one of quantize, keep, got 'maybe'" in result.stderr


def test_resume_refuses_another_shared_experts_setting(qwen: dict, tmp_path: Path) -> None:
    out = tmp_path / "q"
    _compress(qwen["model"], qwen["calib"], out)
    partial = tmp_path / ".r.partial"
    shutil.copytree(out, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest.update(complete=False)
    write_manifest(partial, manifest)
    result = CliRunner().invoke(main, ["compress", "--model", str(qwen["model"]), "--calib", str(qwen["calib"]),
                                       "--out", str(tmp_path / "r"), "--device", "cpu", "--resume",
                                       "--shared-experts", "keep"])
    assert result.exit_code == 1 and "was made with other settings" in result.stderr


@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_a_damaged_shared_expert_file_is_a_one_line_error(qwen: dict, tmp_path: Path, damage: str) -> None:
    out = tmp_path / "q"
    _compress(qwen["model"], qwen["calib"], out, "--method", "rtn")
    path = out / "experts/decoder-002/shared.safetensors"
    if damage == "missing":
        path.unlink()
    else:
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x40
        path.write_bytes(raw)
    data = _jsonl(tmp_path / "val.jsonl", [[1, 2, 3]])
    result = CliRunner().invoke(main, ["eval", "--model", str(out), "--data", str(data), "--device", "cpu",
                                       "--samples", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {path}: ")
