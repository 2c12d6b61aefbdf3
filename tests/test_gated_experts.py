"""SwiGLU experts (gate, up, down) and top-k routing on the grouped GPU path (`DeviceExperts`).

Always (CPU): stacking two coded matrices by rows (gate over up) decodes to their concatenation,
for dictionary-coded ternary and bit-packed b-bit matrices; the expert structure an architecture
declares; and `DeviceExperts` itself, gated and ReLU, top-1/2/8, with the kernels emulated in
plain torch (`emulated_kernels`): against the fp64 reference on random codes, and uploaded from a
real packed decoder-family checkpoint against that checkpoint's CPU experts. With a GPU the same
tests run the real kernels, and `qmoe eval --device cuda` of packed decoder-family checkpoints is
held to the quantized checkpoint (bf16) and to the CPU (fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hf_models import save_hf_decoder
from packed_experts import bitpacked_matrix, reference_linear, ternary_matrix

from qmoe_cli.arch import ExpertShape
from qmoe_cli.cli import main
from qmoe_cli.codec.rows import decode_dense as codec_decode_dense
from qmoe_cli.execute.grouped import DeviceBitpacked, DeviceExperts, DeviceTernary, stack_bitpacked, stack_ternary
from qmoe_cli.formats.open import open_model
from qmoe_cli.formats.packed import BitpackedMatrix, DictionaryMatrix
from qmoe_cli.kernels import codebook_masks, decode_dense_reference
from qmoe_cli.quant.grids import QuantSpec
from qmoe_cli.run.stream import RunConfig, streamed_losses

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# ------------------------------------------------------------------------------ stacking by rows


@pytest.mark.parametrize("rows,cols", [((5, 7), 29), ((97, 96), 1025), ((1, 1, 4), 3), ((33, 0), 64)])
def test_stacked_ternary_decodes_to_the_concatenation(rows: tuple[int, ...], cols: int) -> None:
    matrices = [ternary_matrix(r, cols, seed=31 * i + r + cols) for i, r in enumerate(rows)]
    words, offsets, lo, hi = stack_ternary(matrices)
    total = sum(rows)
    assert (words.dtype, offsets.dtype, offsets.shape, lo.shape) == (torch.int16, torch.int32, (total + 1,), (total,))
    expected = torch.cat([m.dense(0, m.rows) for m in matrices])  # [total, cols] fp32
    book = matrices[0].book
    assert torch.equal(decode_dense_reference(words, offsets, codebook_masks(book), lo[:, None], hi[:, None], cols),
                       expected)
    assert torch.equal(codec_decode_dense(words, offsets, book, lo[:, None], hi[:, None], cols, cols, (0, total)),
                       expected)
    # The loader's checks hold for the stacked matrix: offsets rise to the words, rows end on codewords.
    DictionaryMatrix({"words": words, "offsets": offsets, "lo": lo[:, None], "hi": hi[:, None]}, book, total, cols,
                     QuantSpec("ternary"), "stacked")


@pytest.mark.parametrize("bits,group", [(2, None), (3, 48), (4, 32), (8, None)])
@pytest.mark.parametrize("rows,cols", [((5, 7), 29), ((33, 33), 257), ((1, 2), 1)])
def test_stacked_bitpacked_decodes_to_the_concatenation(bits: int, group: int | None, rows: tuple[int, ...],
                                                        cols: int) -> None:
    matrices = [bitpacked_matrix(r, cols, bits, group, seed=bits * 7 + i) for i, r in enumerate(rows)]
    packed, scale, zero = stack_bitpacked(matrices)
    stacked = BitpackedMatrix({"packed": packed, "scale": scale, "zero": zero}, sum(rows), cols,
                              QuantSpec(str(bits), group), "stacked")
    assert torch.equal(stacked.dense(0, sum(rows)), torch.cat([m.dense(0, m.rows) for m in matrices]))


def test_stacking_refuses_matrices_of_different_widths() -> None:
    with pytest.raises(ValueError, match=r"one width, got \[5, 6\]"):
        stack_ternary([ternary_matrix(3, 5, seed=1), ternary_matrix(3, 6, seed=2)])
    with pytest.raises(ValueError, match=r"one width, got \[5, 6\]"):
        stack_bitpacked([bitpacked_matrix(3, 5, 2, None, seed=1), bitpacked_matrix(3, 6, 2, None, seed=2)])


# ------------------------------------------------------------------------------- expert structure


def test_expert_shape_checks_the_structure_it_names() -> None:
    hidden = lambda x, w: x  # noqa: E731
    shapes = {"g": (4, 3), "u": (4, 3), "d": (3, 4)}
    gated = ExpertShape(("g", "u", "d"), shapes, hidden, inputs=("g", "u"), chain_activation="silu_gated")
    assert gated.inputs == ("g", "u") and gated.output == "d"
    with pytest.raises(ValueError, match="'silu_gated' with 1 inputs"):
        ExpertShape(("g", "d"), shapes, hidden, chain_activation="silu_gated")
    with pytest.raises(ValueError, match="'relu' with 2 inputs"):
        ExpertShape(("g", "u", "d"), shapes, hidden, inputs=("g", "u"), chain_activation="relu")
    with pytest.raises(ValueError, match="'gelu'"):
        ExpertShape(("g", "d"), shapes, hidden, chain_activation="gelu")


def test_device_experts_refuse_matrices_that_do_not_chain() -> None:
    cpu = torch.device("cpu")
    masks = codebook_masks(ternary_matrix(1, 3, seed=0).book)
    gate_up = DeviceTernary.upload([[ternary_matrix(6, 5, seed=1), ternary_matrix(6, 5, seed=2)]], masks, cpu)
    down = DeviceTernary.upload([[ternary_matrix(5, 6, seed=3)]], masks, cpu)
    assert (gate_up.rows, gate_up.cols, down.rows, down.cols) == (12, 5, 5, 6)
    DeviceExperts(gate_up, down, 1, cpu, activation="silu_gated")
    with pytest.raises(ValueError, match="first must have 6 rows"):
        DeviceExperts(gate_up, down, 1, cpu, activation="relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        DeviceExperts(gate_up, down, 1, cpu, activation="gelu")


# ------------------------------------------------------- DeviceExperts: emulated here, real on a GPU


def _make(spec: QuantSpec, rows: int, cols: int, seed: int):
    if spec.dictionary_coded:
        return ternary_matrix(rows, cols, seed=seed)
    return bitpacked_matrix(rows, cols, int(spec.bits), spec.group_size, seed=seed)


def _routing(n: int, experts: int, k: int, seed: int) -> torch.Tensor:
    """[n, k] distinct experts per token; expert 1 never chosen, expert 0 often (so it can get more
    tokens than the threshold and take the dense path)."""
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(n, experts, generator=g)
    score[:, 1] = 2.0
    score[:, 0] -= 0.6 * (torch.rand(n, generator=g) < 0.5)
    return score.argsort(dim=1)[:, :k].contiguous()


def _reference(x: torch.Tensor, index: torch.Tensor, inputs: list[list[torch.Tensor]], output: list[torch.Tensor],
               activation: str) -> torch.Tensor:
    """Each token through each of its experts alone, under the contract: every linear's sum in
    fp64 rounded once to x's dtype, the activation in x's dtype -> [n, k, d]."""
    out = torch.empty(*index.shape, x.shape[1], dtype=x.dtype)
    for t in range(index.shape[0]):
        for s in range(index.shape[1]):
            e, xt = int(index[t, s]), x[t:t + 1]
            if activation == "relu":
                h = torch.relu(reference_linear(xt, inputs[e][0]))
            else:
                h = F.silu(reference_linear(xt, inputs[e][0])) * reference_linear(xt, inputs[e][1])
            out[t, s] = reference_linear(h, output[e])[0]
    return out


SPECS = [QuantSpec("ternary"), QuantSpec("2"), QuantSpec("4", 32)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}-{s.group_size}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation,k", [("silu_gated", 2), ("silu_gated", 8), ("relu", 1)])
def test_device_experts_equal_the_reference(kernel_device, spec: QuantSpec, dtype: torch.dtype, activation: str,
                                            k: int) -> None:
    """Few tokens (route_plan, no sync) and many (host plan, expert 0 over the threshold on the
    dense path), every assignment in one call, expert 1 without tokens; odd widths."""
    experts, d, d_ff = 10, 97, 75
    n_inputs = 2 if activation == "silu_gated" else 1
    seed = 100 * k + len(str(spec.bits))
    inputs = [[_make(spec, d_ff, d, seed + 7 * e + i) for i in range(n_inputs)] for e in range(experts)]
    output = [[_make(spec, d, d_ff, seed + 7 * e + 5)] for e in range(experts)]
    if spec.dictionary_coded:
        masks = codebook_masks(inputs[0][0].book).to(kernel_device)
        first, second = (DeviceTernary.upload(m, masks, kernel_device) for m in (inputs, output))
    else:
        first, second = (DeviceBitpacked.upload(m, spec, kernel_device) for m in (inputs, output))
    bank = DeviceExperts(first, second, experts, kernel_device, activation=activation)
    w_in = [[m.dense(0, m.rows) for m in ms] for ms in inputs]
    w_out = [ms[0].dense(0, ms[0].rows) for ms in output]
    for n in (1, 7, 32, 33, 200):
        index = _routing(n, experts, k, seed=n)
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(n)).to(dtype)
        y = bank(x.to(kernel_device), index.to(kernel_device) if k > 1 else index[:, 0].to(kernel_device))
        assert y.shape == ((n, k, d) if k > 1 else (n, d)) and y.dtype == dtype
        y = y.cpu().reshape(n, k, d)
        assert not y.isnan().any(), f"{n} tokens: unwritten outputs"
        expected = _reference(x, index, w_in, w_out, activation)
        # Rounding the hidden activation may flip a last bit, which the second matmul carries on.
        rel = float((y.double() - expected.double()).norm() / expected.double().norm())
        assert rel <= (1e-5 if dtype == torch.float32 else 1e-2), f"{n} tokens: relative error {rel:.2e}"
        if dtype != torch.float32:
            exact = float((y == expected).float().mean())
            assert exact >= 0.9, f"{n} tokens: only {exact:.3f} of the outputs exact"


# ------------------------------------------------------------ a packed decoder-family checkpoint


def _jsonl(path: Path, count: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    lines = [json.dumps({"input_ids": torch.randint(0, 64, (int(n),), generator=g).tolist()})
             for n in torch.randint(12, 31, (count,), generator=g)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def decoder_checkpoints(tmp_path_factory) -> dict:
    """A tiny Mixtral (top-2 of 4 SwiGLU experts) compressed with GPTQ at ternary and 2 bits, each
    quantized and packed; and validation data."""
    pytest.importorskip("transformers", reason="transformers writes the tiny checkpoint")
    root = tmp_path_factory.mktemp("gated")
    save_hf_decoder(root / "model", "mixtral")
    calib = _jsonl(root / "calib.jsonl", 16, seed=2)
    dirs = {}
    for bits in ("ternary", "2"):
        out = root / f"q-{bits}"
        result = CliRunner().invoke(main, ["compress", "--model", str(root / "model"), "--calib", str(calib),
                                           "--out", str(out), "--bits", bits, "--device", "cpu", "--pack"])
        assert result.exit_code == 0, result.output
        dirs[bits] = (out, Path(f"{out}-packed"))
    return {"dirs": dirs, "data": _jsonl(root / "val.jsonl", 16, seed=3)}


@pytest.mark.parametrize("bits", ["ternary", "2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_device_experts_of_a_packed_checkpoint_equal_its_cpu_experts(kernel_device, decoder_checkpoints, bits: str,
                                                                     dtype: torch.dtype) -> None:
    """Uploaded from the checkpoint (gate and up by the architecture's names, stacked), top-2 in
    one call, against the checkpoint's own CPU experts (`GatedMLP` over `PackedLinear`s) run token
    by token: a gate/up mix-up or a wrong activation would be far off."""
    weights = open_model(str(decoder_checkpoints["dirs"][bits][1])).weights
    arch = weights.arch
    assert arch.expert.chain_activation == "silu_gated"
    bank = weights.experts(*arch.sparse_blocks()[0])
    assert bank._device_unsupported(arch.expert) is None
    experts = DeviceExperts.upload(arch.expert, weights.spec, bank.matrices(range(arch.num_experts)),
                                   weights.device_masks(kernel_device), kernel_device)
    modules = bank.load(range(arch.num_experts), torch.device("cpu"), dtype)
    for n in (1, 6, 45):
        index = _routing(n, arch.num_experts, 2, seed=n)
        x = torch.randn(n, arch.d_model, generator=torch.Generator().manual_seed(n)).to(dtype)
        y = experts(x.to(kernel_device), index.to(kernel_device)).cpu()  # [n, 2, d]
        expected = torch.stack([torch.cat([modules[int(e)](x[t:t + 1]) for e in index[t]]) for t in range(n)])
        rel = float((y.double() - expected.double()).norm() / expected.double().norm())
        assert rel <= (1e-5 if dtype == torch.float32 else 1e-2), f"{n} tokens: relative error {rel:.2e}"


def _eval(model: Path, data: Path, device: str, dtype: str) -> dict:
    result = CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(data), "--device", device,
                                       "--dtype", dtype, "--json", "--samples", "1000"])
    assert result.exit_code == 0, result.output
    assert "decode on the CPU" not in result.stderr, result.stderr  # the grouped kernels ran
    return json.loads(result.stdout)


@needs_gpu
@pytest.mark.parametrize("bits", ["ternary", "2"])
def test_packed_decoder_eval_on_the_gpu(decoder_checkpoints, bits: str) -> None:
    """`qmoe eval --device cuda`: the packed checkpoint's experts run through the grouped kernels
    and compute what the quantized checkpoint's do (bf16), and what the CPU computes (fp32)."""
    quantized, packed = decoder_checkpoints["dirs"][bits]
    data = decoder_checkpoints["data"]
    weights = open_model(str(packed)).weights
    cuda = torch.device("cuda", torch.cuda.current_device())
    assert isinstance(weights.experts(*weights.arch.sparse_blocks()[0]).routed(cuda, torch.bfloat16), DeviceExperts)
    q, p = (_eval(m, data, "cuda", "bfloat16")["loss"] for m in (quantized, packed))
    assert abs(p - q) <= 1e-3 * q, (p, q)
    gpu, cpu = (_eval(packed, data, device, "float32")["loss"] for device in ("cuda", "cpu"))
    assert abs(gpu - cpu) <= 1e-5 * cpu, (gpu, cpu)
    # Token chunks of 8 (top-2: 16 assignments): the fused tiles without a host sync, not only
    # the many-token plan `qmoe eval` takes for the whole buffer.
    samples = [json.loads(line)["input_ids"] for line in data.read_text().splitlines()]
    run = RunConfig(cuda, torch.float32, token_chunk=8, progress=False)
    loss, tokens = streamed_losses(weights, [s[:-1] for s in samples], [s[1:] for s in samples], run)  # as eval
    assert abs(float(loss.sum() / tokens.sum()) - cpu) <= 1e-5 * cpu


# ------------------------------------------------------------------- scripts/bench_moe_block.py

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_moe_block_parses_its_arguments_and_builds_its_experts(monkeypatch) -> None:
    """What the benchmark does before it needs a GPU: its flags, and random experts whose bf16
    weights (the baseline) are exactly what their dictionary-coded copies (packed) decode to."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_moe_block as bench

    args = bench.parse_args(["--shapes", "qwen3", "--tokens", "1,8,32", "--repeats", "5"])
    assert (args.shapes, args.tokens, args.repeats) == (["qwen3"], [1, 8, 32], 5)
    for bad in (["--shapes", "gpt"], ["--tokens", "1,x"], ["--tokens", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(bad)
        assert exit_info.value.code == 2
    for name in bench.SHAPES:  # the real shapes parse into architectures with gated experts
        assert bench.architecture_from_config(bench.SHAPES[name]).expert.chain_activation == "silu_gated"
    tiny = {**bench.SHAPES["qwen3"], "hidden_size": 40, "moe_intermediate_size": 24, "num_experts": 9,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 10}
    arch = bench.architecture_from_config(tiny)
    experts = bench.make_experts(arch, bench.fitted_book(0.9, 1024), 0.9, seed=1)
    assert len(experts) == 9 and all(set(parts) == set(arch.expert.matrices) for parts in experts)
    for parts in experts:
        for part in parts.values():
            coded = part.coded.dense(0, part.coded.rows)
            assert torch.equal(part.dense(torch.device("cpu"), torch.float32), coded)
            assert torch.equal(part.dense(torch.device("cpu"), torch.bfloat16), coded.bfloat16())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_bench_moe_block_without_a_gpu_is_a_one_line_error() -> None:
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_moe_block.py"), "--tokens", "1"],
                          env={**os.environ, "PYTHONPATH": str(SCRIPTS.parent)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "error: scripts/bench_moe_block.py needs a CUDA GPU (torch.cuda.is_available() is False)\n"
