"""The CUDA kernels against the CPU reference, and the pieces testable without a GPU.

Always: the kernels' dictionary form (`codebook_masks`) against `Codebook.table`, its plain-torch
decode against the codec, the device bit-packed layout (the kernel's extraction replayed in
torch) against `unpack_bits`, the host tile plan, and the ops' fake implementations. With nvcc and
a CUDA torch: the build. With a GPU: every op against the CPU decoders and the fp64 reference of
the numerics contract (`packed_experts.assert_contract`) on fresh random inputs, odd shapes,
1..64 tokens, experts without tokens, all b-bit widths; the packed checkpoint against the
quantized one on the GPU; opcheck.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from packed_experts import assert_contract, bitpacked_matrix, book, reference_experts, ternary_matrix
from torch._subclasses.fake_tensor import FakeTensorMode

from qmoe_cli.codec.bitpack import pack_bits
from qmoe_cli.codec.rows import decode_dense as codec_decode_dense
from qmoe_cli.execute.grouped import DeviceBitpacked, DeviceExperts, DeviceTernary
from qmoe_cli.kernels import ops
from qmoe_cli.kernels.ops import codebook_masks, decode_dense_reference
from qmoe_cli.quant.grids import QuantSpec

HAS_TOOLCHAIN = bool(shutil.which("nvcc") or os.environ.get("CUDA_HOME")) and bool(torch.version.cuda)
needs_toolchain = pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs nvcc and a CUDA build of torch")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPES = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (2080, 6144), (6144, 2080), (97, 1025), (5, 29)]
FLOATS = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("size,max_len", [(1 << 16, 14), (300, 3), (9, 1)])
def test_masks_hold_the_table_and_lengths(size: int, max_len: int) -> None:
    b = book(0.9, size, max_len)
    masks = codebook_masks(b).long() & 0xFFFFFFFF  # [size, 2], as the GPU reads them (unsigned)
    assert masks.shape == (b.size, 2)
    assert torch.equal(masks[:, 0] >> 28, b.lengths.long())
    positions = torch.arange(28)
    lo_bits, hi_bits = (masks[:, :1] >> positions) & 1, (masks[:, 1:] >> positions) & 1
    inside = positions < 2 * b.lengths.long()[:, None]
    codes = torch.ones(b.size, 28, dtype=torch.long)
    codes[:, :b.table.shape[1]] = b.table.long()
    assert torch.equal(lo_bits.bool(), (codes == 0) & inside)
    assert torch.equal(hi_bits.bool(), (codes == 2) & inside)


def test_masks_reject_codewords_longer_than_28_weights() -> None:
    with pytest.raises(ValueError, match="14 pairs"):
        codebook_masks(book(0.95, 4096, 20))


@pytest.mark.parametrize("rows,cols", [(5, 29), (97, 1025), (33, 64), (1, 1), (3, 2)])
def test_reference_decode_of_masks_equals_the_codec(rows: int, cols: int) -> None:
    m = ternary_matrix(rows, cols, seed=rows + cols)
    expected = codec_decode_dense(m.words, m.offsets, m.book, m.lo, m.hi, cols, cols, (0, rows))
    got = decode_dense_reference(m.words, m.offsets, codebook_masks(m.book), m.lo, m.hi, cols)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("cols", [1, 31, 32, 33, 257])
def test_device_bitpacked_layout_replays_to_the_codes(bits: int, cols: int) -> None:
    """The kernels' extraction (byte-swapped 32-bit words, a code may straddle two) in torch."""
    codes = torch.randint(0, 1 << bits, (7, cols), generator=torch.Generator().manual_seed(bits * cols),
                          dtype=torch.uint8)
    words = ops.device_bitpacked(pack_bits(codes, bits), bits, cols)  # [7, ceil(cols / 32) * bits] int32
    assert words.shape == (7, -(-cols // 32) * bits) and words.dtype == torch.int32
    stream = words.long() & 0xFFFFFFFF
    stream = ((stream & 0xFF) << 24) | ((stream & 0xFF00) << 8) | ((stream >> 8) & 0xFF00) | (stream >> 24)
    col = torch.arange(cols)
    bit, word = col * bits, (col * bits) // 32
    shift = bit % 32
    second = stream[:, torch.clamp(word + 1, max=stream.shape[1] - 1)]
    both = (stream[:, word] << 32) | torch.where(shift + bits > 32, second, 0)
    assert torch.equal((both >> (64 - shift - bits)) & ((1 << bits) - 1), codes.long())


def test_host_plan_tiles_light_experts_and_lists_heavy_ones() -> None:
    tiles, heavy = ops.host_plan([3, 0, 70, 40, 1], threshold=64)
    assert tiles.tolist() == [[0, 0, 3], [3, 73, 32], [3, 105, 8], [4, 113, 1]]
    assert heavy == [(2, 3, 70)]
    tiles, heavy = ops.host_plan([0, 0], threshold=4)
    assert tiles.shape == (0, 3) and heavy == []


def test_fake_implementations_give_shapes_without_the_library() -> None:
    ops.define_ops()
    with FakeTensorMode():
        words, bases = torch.empty(50, dtype=torch.int16), torch.empty(3, dtype=torch.long)
        offsets, masks = torch.empty(3, 8, dtype=torch.int32), torch.empty(4096, 2, dtype=torch.int32)
        lo = torch.empty(3, 7)
        xt = torch.empty(100, 4, dtype=torch.bfloat16)
        tiles, order = torch.empty(4, 3, dtype=torch.int32), torch.empty(4, dtype=torch.int32)
        h = torch.ops.qmoe.ternary_tiles(words, bases, offsets, masks, lo, lo, xt, True, tiles, None, True, True)
        y = torch.ops.qmoe.ternary_tiles(words, bases, offsets, masks, lo, lo, xt, True, tiles, order, False, False)
        packed, scale = torch.empty(3, 7, 12, dtype=torch.int32), torch.empty(3, 7, 1)
        b = torch.ops.qmoe.bitpacked_tiles(packed, scale, scale, 3, 100, xt, True, tiles, order, False, False)
        w = torch.ops.qmoe.ternary_dense(words, bases, offsets, masks, lo, lo, 1, 100, torch.float16)
        v = torch.ops.qmoe.bitpacked_dense(packed, scale, scale, 3, 100, 100, 2, torch.float32)
        plan = torch.ops.qmoe.route_plan(torch.empty(9, dtype=torch.long), 5)
        t = torch.ops.qmoe.gather_transpose(torch.empty(9, 100, dtype=torch.float16), plan[0])
    assert (h.shape, h.dtype) == ((7, 4), torch.bfloat16)
    assert (y.shape, b.shape) == ((4, 7), (4, 7))
    assert (w.shape, w.dtype, v.shape, v.dtype) == ((7, 100), torch.float16, (7, 100), torch.float32)
    assert [p.shape for p in plan] == [(9,), (9, 3)] and all(p.dtype == torch.int32 for p in plan)
    assert (t.shape, t.dtype) == ((100, 9), torch.float16)


def test_grouped_grids_are_rejected_with_the_shape() -> None:
    with pytest.raises(ValueError, match=r"one grid per row.*\[3, 2\]"):
        ops.decode_matmul(torch.empty(0, dtype=torch.int16), torch.zeros(4, dtype=torch.int32),
                          torch.zeros(9, 2, dtype=torch.int32), torch.zeros(3, 2), torch.zeros(3, 2),
                          torch.zeros(1, 8, dtype=torch.bfloat16))


@needs_toolchain
def test_kernels_compile() -> None:
    build = ops.build_kernels()
    assert build.archs == ("80", "90") and build.nvcc and build.library.endswith(".so")


# ----------------------------------------------------------------------------------- GPU tests


def _poison(numel: int, dtype: torch.dtype) -> None:
    """Leave a NaN block the size of the next output in the caching allocator, which hands it out
    again to the op's at::empty: outputs the kernel does not write stay NaN and fail the check."""
    torch.full((numel,), float("nan"), dtype=dtype, device="cuda")


def _x(n: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(n, cols, generator=torch.Generator().manual_seed(seed)).to(dtype).cuda()


def _on_gpu(m):
    masks = codebook_masks(m.book).cuda()
    return m.words.cuda(), m.offsets.cuda(), masks, m.lo.cuda(), m.hi.cuda()


@pytest.fixture(scope="module")
def gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert ops.kernel_library() is not None, "the kernels must build on a GPU machine"


@needs_gpu
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_decode_matmul_follows_the_contract(gpu, rows: int, cols: int) -> None:
    m = ternary_matrix(rows, cols, seed=rows * 7 + cols, size=1 << 16)
    weights = m.dense(0, rows)  # [rows, cols] fp32, the CPU decoder
    args = _on_gpu(m)
    for n in (1, 2, 3, 8, 16, 31, 32, 33, 64):  # 33, 64: decode to scratch + tensor cores
        x = _x(n, cols, torch.bfloat16, seed=n)
        _poison(n * rows, torch.bfloat16)
        y = ops.decode_matmul(*args, x)
        assert y.shape == (n, rows) and y.dtype == torch.bfloat16
        assert not y.isnan().any(), f"{rows}x{cols}, {n} tokens: unwritten outputs"
        assert_contract(y, x, weights)


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_decode_matmul_in_every_dtype(gpu, dtype: torch.dtype) -> None:
    m = ternary_matrix(97, 1025, seed=3)
    for n in (1, 5, 32):
        x = _x(n, 1025, dtype, seed=n)
        assert_contract(ops.decode_matmul(*_on_gpu(m), x), x, m.dense(0, 97))


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rows,cols", [(97, 1025), (5, 29), (768, 3072)])
def test_decode_dense_is_exact(gpu, rows: int, cols: int, dtype: torch.dtype) -> None:
    m = ternary_matrix(rows, cols, seed=rows + cols, p_zero=0.75)
    _poison(rows * cols, dtype)
    got = ops.decode_dense(*_on_gpu(m), cols, dtype)
    assert torch.equal(got.cpu(), m.dense(0, rows).to(dtype))  # each weight is lo, 0 or hi rounded once


@needs_gpu
@pytest.mark.parametrize("bits,group", [(2, None), (2, 32), (3, None), (3, 48), (4, None), (4, 100), (8, None)])
def test_bitpacked_dense_is_exact(gpu, bits: int, group: int | None) -> None:
    m = bitpacked_matrix(61, 257, bits, group, seed=bits)
    w = DeviceBitpacked.upload([[m], [m]], QuantSpec(str(bits), group), torch.device("cuda"))  # two experts
    for dtype in FLOATS:
        assert torch.equal(w.dense(1, dtype).cpu(), m.dense(0, 61).to(dtype))


@needs_gpu
@pytest.mark.parametrize("n,experts", [(1, 8), (5, 3), (32, 128), (64, 2), (1000, 7), (1024, 2048)])
def test_route_plan_sorts_stably_into_tiles(gpu, n: int, experts: int) -> None:
    index = torch.randint(0, experts, (n,), generator=torch.Generator().manual_seed(n))
    order, tiles = ops.route_plan(index.cuda(), experts)
    assert torch.equal(order.cpu().long(), torch.argsort(index, stable=True))
    counts = torch.bincount(index, minlength=experts).tolist()
    expected, _ = ops.host_plan(counts, threshold=n)
    used = tiles.cpu()[:expected.shape[0]]
    assert torch.equal(used, expected)
    assert not tiles.cpu()[expected.shape[0]:].any(), "unused tile slots must be zero"


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_transpose(gpu, dtype: torch.dtype) -> None:
    x = _x(45, 1025, dtype, seed=1)
    order = torch.randperm(45, generator=torch.Generator().manual_seed(2)).to(torch.int32).cuda()
    assert torch.equal(ops.gather_transpose(x, order), x[order.long()].T)
    # Top-k gathers a token once per routing slot: more positions than rows, rows repeated.
    repeated = torch.randint(0, 45, (100,), generator=torch.Generator().manual_seed(3)).to(torch.int32).cuda()
    assert torch.equal(ops.gather_transpose(x, repeated), x[repeated.long()].T)


def _bank(spec: QuantSpec, experts: int, d: int, d_ff: int, seed: int):
    """(first, second) per expert as packed matrices, and their CPU-decoded fp32 weights."""
    if spec.dictionary_coded:
        make = lambda rows, cols, s: ternary_matrix(rows, cols, seed=s)  # noqa: E731
    else:
        make = lambda rows, cols, s: bitpacked_matrix(rows, cols, int(spec.bits), spec.group_size, seed=s)  # noqa: E731
    first = [make(d_ff, d, seed + 2 * e) for e in range(experts)]
    second = [make(d, d_ff, seed + 2 * e + 1) for e in range(experts)]
    return first, second, [m.dense(0, m.rows) for m in first], [m.dense(0, m.rows) for m in second]


def _device(spec: QuantSpec, first, second, threshold: int = ops.DENSE_TOKENS_THRESHOLD) -> DeviceExperts:
    cuda = torch.device("cuda", torch.cuda.current_device())
    if spec.dictionary_coded:
        masks = codebook_masks(first[0].book).to(cuda)
        up = lambda ms: DeviceTernary.upload([[m] for m in ms], masks, cuda)  # noqa: E731
    else:
        up = lambda ms: DeviceBitpacked.upload([[m] for m in ms], spec, cuda)  # noqa: E731
    return DeviceExperts(up(first), up(second), len(first), cuda, threshold)


def _routing(n: int, experts: int, seed: int) -> torch.Tensor:
    """Random routing that leaves expert 1 without tokens and piles a third onto expert 0."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, experts, (n,), generator=g)
    index[index == 1] = 0
    index[torch.rand(n, generator=g) < 0.3] = 0
    return index


SPECS = [QuantSpec("ternary"), QuantSpec("2"), QuantSpec("3", 48), QuantSpec("4"), QuantSpec("4", 32),
         QuantSpec("8")]


@needs_gpu
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}-{s.group_size}")
def test_tiles_follow_the_contract_per_matrix(gpu, spec: QuantSpec) -> None:
    """Both tile launches of a block against the fp64 reference: wi (relu, kept sorted and
    transposed) and wo (scattered back to token order), over 1..64 tokens and 6 experts."""
    first, second, w1, w2 = _bank(spec, 6, 97, 301, seed=11)
    bank = _device(spec, first, second)
    for n in (1, 2, 7, 17, 32, 64):
        index = _routing(n, 6, seed=n).cuda()
        x = _x(n, 97, torch.bfloat16, seed=n)
        order, tiles = ops.route_plan(index, 6)
        xt = ops.gather_transpose(x, order)
        _poison(301 * n, torch.bfloat16)
        hidden = bank.first.tiles(xt, tiles, None, relu=True, out_transposed=True)  # [301, n] sorted
        assert not hidden.isnan().any(), f"{n} tokens: unwritten hidden activations"
        y = bank.second.tiles(hidden, tiles, order, relu=False, out_transposed=False)  # [n, 97] token order
        assert not y.isnan().any(), f"{n} tokens: unwritten outputs"
        sorted_e = index[order.long()].cpu()
        for e in sorted_e.unique().tolist():
            at = torch.nonzero(sorted_e == e)[:, 0].cuda()  # this expert's sorted positions
            assert_contract(hidden[:, at].T, x[order.long()[at]], w1[e], relu=True)
            assert_contract(y[order.long()[at]], hidden[:, at].T, w2[e])


@needs_gpu
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}-{s.group_size}")
@pytest.mark.parametrize("dtype", FLOATS)
def test_device_experts_equal_the_cpu_reference(gpu, spec: QuantSpec, dtype: torch.dtype) -> None:
    """The whole grouped block, few-token (route_plan, no sync) and many-token (host plan with
    heavy experts on the tensor-core path) modes, experts without tokens included."""
    first, second, w1, w2 = _bank(spec, 9, 129, 257, seed=5)
    bank = _device(spec, first, second, threshold=16)
    for n in (1, 3, 8, 16, 17, 40, 64, 200):
        index = _routing(n, 9, seed=100 + n)
        x = _x(n, 129, dtype, seed=n)
        _poison(n * 129, dtype)
        y = bank(x, index.cuda())
        assert y.shape == x.shape and y.dtype == dtype and not y.isnan().any()
        expected = reference_experts(x.cpu(), index, w1, w2)
        # Rounding the hidden activation may flip a last bit, which the second matmul carries on.
        rel = float((y.cpu().double() - expected.double()).norm() / expected.double().norm())
        assert rel <= (1e-5 if dtype == torch.float32 else 1e-2), f"{n} tokens: relative error {rel:.2e}"
        if dtype != torch.float32:
            exact = float((y.cpu() == expected).float().mean())
            assert exact >= 0.9, f"{n} tokens: only {exact:.3f} of the outputs exact"


@needs_gpu
def test_switch_shaped_block_at_1_to_64_tokens(gpu) -> None:
    spec = QuantSpec("ternary")
    first, second, w1, w2 = _bank(spec, 4, 768, 3072, seed=21)
    bank = _device(spec, first, second)
    for n in range(1, 65, 7):
        index = _routing(n, 4, seed=n)
        x = _x(n, 768, torch.bfloat16, seed=n)
        expected = reference_experts(x.cpu(), index, w1, w2)
        y = bank(x, index.cuda()).cpu()
        assert float((y.double() - expected.double()).norm() / expected.double().norm()) <= 1e-2


@needs_gpu
def test_binding_names_the_bad_argument(gpu) -> None:
    m = ternary_matrix(5, 29, seed=1)
    words, offsets, masks, lo, hi = _on_gpu(m)
    x = torch.randn(29, 2, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="x must be Float, BFloat16 or Half, got Double"):
        torch.ops.qmoe.ternary_tiles(words, None, offsets[None], masks, lo.T.contiguous(), hi.T.contiguous(), x,
                                     True, None, None, False, False)
    with pytest.raises(RuntimeError, match="offsets must be on cuda"):
        torch.ops.qmoe.ternary_tiles(words, None, offsets[None].cpu(), masks, lo.T.contiguous(), hi.T.contiguous(),
                                     x.float(), True, None, None, False, False)
    with pytest.raises(RuntimeError, match="tiles are required for 2 experts"):
        torch.ops.qmoe.ternary_tiles(words, torch.zeros(2, dtype=torch.long, device="cuda"),
                                     offsets[None].expand(2, -1).contiguous(), masks,
                                     lo.T.expand(2, -1).contiguous(), hi.T.expand(2, -1).contiguous(), x.float(),
                                     True, None, None, False, False)
    with pytest.raises(RuntimeError, match="route_plan takes 1..1024 tokens"):
        ops.route_plan(torch.zeros(1025, dtype=torch.long, device="cuda"), 4)


@needs_gpu
def test_opcheck(gpu) -> None:
    spec = QuantSpec("3", 48)
    first, second, _, _ = _bank(spec, 3, 97, 61, seed=2)
    tern = _device(QuantSpec("ternary"), *_bank(QuantSpec("ternary"), 3, 97, 61, seed=2)[:2])
    bits = _device(spec, first, second)
    index = torch.tensor([2, 0, 2, 2, 0], device="cuda")
    order, tiles = ops.route_plan(index, 3)
    xt = ops.gather_transpose(_x(5, 97, torch.bfloat16, seed=0), order)
    t = tern.first
    torch.library.opcheck(torch.ops.qmoe.ternary_tiles.default,
                          (t.words, t.bases, t.offsets, t.masks, t.lo, t.hi, xt, True, tiles, order, True, False))
    b = bits.first
    torch.library.opcheck(torch.ops.qmoe.bitpacked_tiles.default,
                          (b.packed, b.scale, b.zero, 3, 48, xt, True, tiles, None, False, True))
    torch.library.opcheck(torch.ops.qmoe.ternary_dense.default,
                          (t.words, t.bases, t.offsets, t.masks, t.lo, t.hi, 2, 97, torch.bfloat16))
    torch.library.opcheck(torch.ops.qmoe.bitpacked_dense.default,
                          (b.packed, b.scale, b.zero, 3, 48, 97, 1, torch.float16))
    torch.library.opcheck(torch.ops.qmoe.route_plan.default, (index, 3))
    torch.library.opcheck(torch.ops.qmoe.gather_transpose.default, (_x(5, 97, torch.float32, seed=1), order))
