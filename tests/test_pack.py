"""`qmoe pack` / `qmoe info` / packed `qmoe eval` through the CLI, and the loader's validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_codec_reference import fixed_probs, ternary

from qmoe_cli.cli import main
from qmoe_cli.codec.dictionary import Codebook, build_dictionary
from qmoe_cli.codec.rows import encode_matrix
from qmoe_cli.execute.linear import PackedLinear
from qmoe_cli.formats.integrity import file_record, manifest_digest
from qmoe_cli.formats.packed import DictionaryMatrix
from qmoe_cli.quant.grids import QuantSpec

CALIB = ["--calib-samples", "32"]
EVAL = ["--samples", "32", "--device", "cpu"]
GROUP = "experts/encoder-001/group-00000.safetensors"


def _cli(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    return result


def _json(*args: str) -> dict:
    return json.loads(_cli(*args, "--json").stdout)


@pytest.fixture(scope="module")
def ternary_dirs(tmp_path_factory) -> tuple[Path, Path, dict]:
    """tiny-switch compressed to ternary with `--pack`: (quantized dir, packed dir, summary)."""
    out = tmp_path_factory.mktemp("pack") / "tern"
    summary = _json("compress", *CALIB, "--out", str(out), "--pack", "--device", "cpu")
    return out, out.with_name("tern-packed"), summary


def test_packed_eval_equals_quantized_eval(ternary_dirs) -> None:
    quantized, packed, _ = ternary_dirs
    q = _json("eval", "--model", str(quantized), *EVAL)
    p = _json("eval", "--model", str(packed), *EVAL)
    assert p["kind"] == "packed" and q["kind"] == "quantized"
    assert abs(p["loss"] - q["loss"]) <= 1e-4 and p["tokens"] == q["tokens"]


def test_packed_eval_equals_quantized_eval_in_bf16(ternary_dirs) -> None:
    """Both checkpoints follow one numerics contract, so in bf16 they agree as closely as in fp32."""
    quantized, packed, _ = ternary_dirs
    q = _json("eval", "--model", str(quantized), *EVAL, "--dtype", "bfloat16")
    p = _json("eval", "--model", str(packed), *EVAL, "--dtype", "bfloat16")
    assert abs(p["loss"] - q["loss"]) <= 1e-4 * q["loss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_eval_on_the_gpu_equals_quantized_and_the_cpu(ternary_dirs) -> None:
    """On CUDA the packed experts run compressed through the grouped kernels (bf16), the quantized
    ones through `GridLinear`: the same function, so the same loss; and close to fp32 on the CPU."""
    quantized, packed, _ = ternary_dirs
    cuda = ["--samples", "32", "--device", "cuda", "--dtype", "bfloat16"]
    q, p = _json("eval", "--model", str(quantized), *cuda), _json("eval", "--model", str(packed), *cuda)
    cpu = _json("eval", "--model", str(packed), *EVAL)
    assert abs(p["loss"] - q["loss"]) <= 1e-4 * q["loss"] and p["tokens"] == q["tokens"] == cpu["tokens"]
    assert abs(p["loss"] - cpu["loss"]) <= 1e-2 * cpu["loss"]


def test_info_reports_bits_entropy_and_layers(ternary_dirs) -> None:
    quantized, packed, summary = ternary_dirs
    info = _json("info", str(packed), "--verify")
    assert info == summary["packed"]
    assert {"bits_per_weight_codes", "bits_per_weight_all_in", "entropy_bits_per_weight", "total_bytes",
            "layers", "ratio_to_entropy"} <= info.keys()
    assert info["kind"] == "packed" and info["source"] == "tiny-switch" and info["codec"]["type"] == "dictionary"
    assert [layer["name"] for layer in info["layers"]] == ["encoder.1", "encoder.3", "decoder.1", "decoder.3"]
    assert info["entropy_bits_per_weight"] < info["bits_per_weight_codes"] < 1.3 < info["bits_per_weight_all_in"]
    assert info["ratio_to_entropy"] == pytest.approx(info["bits_per_weight_codes"] / info["entropy_bits_per_weight"])
    assert info["total_bytes"] == sum(p.stat().st_size for p in packed.rglob("*") if p.is_file())
    words = sum(t.numel() for p in packed.glob("experts/*/*") for k, t in load_file(p).items() if k.endswith("words"))
    assert info["bits_per_weight_codes"] == pytest.approx(16 * words / info["weights"])
    q = _json("info", str(quantized))
    assert q["kind"] == "quantized" and q["bits_per_weight_codes"] == 8 and q["weights"] == info["weights"]
    text = _cli("info", str(packed)).stdout
    assert "packed checkpoint of tiny-switch" in text and "decoder.3" in text and "entropy" in text


@pytest.mark.parametrize("bits,codec", [("2", "bitpack"), ("ternary", "dictionary")])
def test_grid_groups_and_bit_widths_pack_and_run(tmp_path: Path, bits: str, codec: str) -> None:
    """2-bit codes are bit-packed; ternary with grids per 32 columns takes the decode-then-BLAS path."""
    quantized = tmp_path / "q"
    _cli("compress", *CALIB, "--bits", bits, "--method", "rtn", "--grid-group", "32", "--out", str(quantized),
         "--device", "cpu")
    info = _json("pack", str(quantized))
    assert info["codec"]["type"] == codec and info["settings"]["grid_group"] == 32
    if bits == "2":
        assert info["codec"]["bits"] == 2 and info["bits_per_weight_codes"] == 2.0
    q = _json("eval", "--model", str(quantized), *EVAL)
    p = _json("eval", "--model", str(tmp_path / "q-packed"), *EVAL)
    assert abs(p["loss"] - q["loss"]) <= 1e-4


def test_pack_refuses_bad_sources_and_existing_outputs(ternary_dirs, tmp_path: Path) -> None:
    quantized, packed, _ = ternary_dirs
    before = sorted(p.name for p in packed.iterdir())
    assert "already exists" in _cli("pack", str(quantized), "--out", str(packed), code=1).output
    assert sorted(p.name for p in packed.iterdir()) == before
    assert "not a qmoe checkpoint" in _cli("pack", str(tmp_path / "nowhere"), code=1).output
    assert "expected 'quantized'" in _cli("pack", str(packed), "--out", str(tmp_path / "x"), code=1).output
    assert "--dictionary-size" in _cli("pack", str(quantized), "--dictionary-size", "5", code=2).output
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*partial"))
    clash = tmp_path / "c"
    (tmp_path / "c-packed").mkdir()
    assert "--pack" in _cli("compress", "--out", str(clash), "--pack", code=1).output
    assert not clash.exists()


def _tamper(packed: Path, target: Path, name: str, mutate) -> Path:
    """A copy of `packed` whose `name` file had `mutate` applied, with checksums made consistent
    again so only the loader's structural checks can catch it."""
    import shutil

    shutil.copytree(packed, target)
    tensors = load_file(target / name)
    mutate(tensors)
    save_file(tensors, str(target / name))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"][name] = file_record(target / name)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def _set(key: str, value):
    return lambda t: t.__setitem__(key, value(t[key]))


@pytest.mark.parametrize("mutate,message", [
    (_set("expert_0.wi.words", lambda w: w.roll(1)), "crosses into row"),
    (_set("expert_0.wi.words", lambda w: w.int()), "expected torch.int16"),
    (_set("expert_1.wo.words", lambda w: w[:-1]), "decode to"),
    (_set("expert_1.wo.words", lambda w: torch.zeros_like(w)), "decode"),
    (_set("expert_2.wi.lo", lambda lo: torch.full_like(lo, float("nan"))), "non-finite"),
    (_set("expert_2.wi.lo", lambda lo: lo.half()), "expected torch.bfloat16"),
    (_set("expert_2.wi.hi", lambda hi: hi[:-1]), "'hi' is"),
    (lambda t: t.pop("expert_3.wo.words"), "missing words"),
])
def test_structurally_bad_matrices_are_clean_errors(ternary_dirs, tmp_path: Path, mutate, message: str) -> None:
    bad = _tamper(ternary_dirs[1], tmp_path / "bad", GROUP, mutate)
    output = _cli("info", str(bad), "--verify", code=1).output
    assert message in output and GROUP in output and "Traceback" not in output
    assert message in _cli("eval", "--model", str(bad), *EVAL, code=1).output


@pytest.mark.parametrize("edit", [{"num_heads": 1}, {"vocab_size": 10}, {"d_kv": 3}])
def test_a_resealed_config_edit_is_refused_by_the_dense_files_shapes(ternary_dirs, tmp_path: Path, edit) -> None:
    """A config edited to other shapes, its checksum recomputed: the head and block files' headers
    no longer match it, so opening the packed checkpoint is a one-line error (not a failure deep
    in a block's load)."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ternary_dirs[1], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["config"].update(edit)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    output = _cli("eval", "--model", str(bad), *EVAL, code=1).output
    assert output.startswith("error: ") and output.strip().count("\n") == 0, output
    assert "but the manifest's config needs" in output and "Traceback" not in output


def test_old_format_versions_are_refused_with_the_fix(ternary_dirs, tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(ternary_dirs[1], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (old / "manifest.json").write_text(json.dumps(manifest))
    output = _cli("eval", "--model", str(old), *EVAL, code=1).output
    assert "packed format version 1 is no longer read" in output and "qmoe pack" in output


def test_packed_grids_are_bf16_and_rows_carry_no_offsets(ternary_dirs) -> None:
    quantized, packed, _ = ternary_dirs
    stored, original = load_file(packed / GROUP), load_file(quantized / GROUP)
    assert not [k for k in stored if k.endswith("offsets")]
    for key in ("expert_0.wi.lo", "expert_3.wo.hi"):
        assert stored[key].dtype == torch.bfloat16 and torch.equal(stored[key].float(), original[key])


def test_a_bad_dictionary_is_a_clean_error(ternary_dirs, tmp_path: Path) -> None:
    bad = _tamper(ternary_dirs[1], tmp_path / "bad", "dictionary.safetensors",
                  _set("lengths", lambda n: torch.zeros_like(n)))
    assert "invalid dictionary" in _cli("info", str(bad), "--verify", code=1).output


def test_packed_linear_decodes_in_row_blocks_and_matches_the_dense_product() -> None:
    book = Codebook.from_sequences(build_dictionary(fixed_probs(0.9)), 14)
    rows, cols = 3072, 768
    codes = ternary(rows, cols, 0.9, seed=11)
    words, offsets = encode_matrix(codes, book)
    lo, hi = -torch.rand(rows, 1), torch.rand(rows, 1)
    matrix = DictionaryMatrix({"words": words, "offsets": offsets, "lo": lo, "hi": hi}, book, rows, cols,
                              QuantSpec("ternary"), "test")
    linear = PackedLinear(matrix)
    assert linear.block_rows < rows  # never the whole matrix at once
    dense = torch.where(codes == 0, lo, torch.where(codes == 2, hi, 0.0))
    for tokens in (1, 5, 33):  # the lookup layout's product (any token count), and decoded rows with BLAS
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
        for y in (linear(x), linear.decoded(x)):
            assert torch.allclose(y, x @ dense.T, rtol=1e-4, atol=1e-4)
    assert math.isclose(16 * words.numel() / codes.numel(), 0.70, abs_tol=0.05)


def test_the_lookup_layout_is_built_on_the_first_product_and_replaces_the_codewords(monkeypatch: pytest.MonkeyPatch) -> None:
    from qmoe_cli.codec import cpu_matmul
    from qmoe_cli.formats import packed

    if cpu_matmul.cpu_matmul_extension() is None:
        pytest.skip("the CPU decode-matmul could not be built")
    book = Codebook.from_sequences(build_dictionary(fixed_probs(0.9)), 14)
    rows, cols = 40, 90
    words, offsets = encode_matrix(ternary(rows, cols, 0.9, seed=3), book)
    matrix = DictionaryMatrix({"words": words, "offsets": offsets, "lo": -torch.rand(rows, 1),
                               "hi": torch.rand(rows, 1)}, book, rows, cols, QuantSpec("ternary"), "test")
    builds = []

    def counted(*args):
        builds.append(args)
        return cpu_matmul.ternary_layout(*args)

    monkeypatch.setattr(packed, "ternary_layout", counted)
    linear, weights = PackedLinear(matrix), matrix.dense(0, rows)
    assert not builds  # loading builds nothing
    for n, dtype in ((1, torch.float32), (8, torch.bfloat16), (40, torch.float32), (1, torch.float32)):
        x = torch.randn(n, cols, generator=torch.Generator().manual_seed(n)).to(dtype)
        assert torch.allclose(linear(x).float(), linear.decoded(x).float(), rtol=1e-2, atol=1e-2)
    assert len(builds) == 1  # every dtype and token count shares it
    assert matrix.words is None and matrix.offsets is None  # held as the layout alone
    assert torch.equal(matrix.dense(0, rows), weights) and torch.equal(matrix.dense(7, 9), weights[7:9])


def test_the_dictionary_sample_spreads_over_blocks_experts_and_matrices() -> None:
    from qmoe_cli.compress.pack import sample_matrices

    blocks = [("encoder", 1), ("encoder", 3), ("decoder", 1)]
    everything = [(s, i, j, m) for s, i in blocks for j in range(2) for m in ("wi", "wo")]
    assert sample_matrices(blocks, 2, ("wi", "wo"), 0) == everything
    assert sample_matrices(blocks, 2, ("wi", "wo"), 12) == everything
    for experts, count in ((2048, 64), (5, 7), (5, 29), (1, 5)):
        picks = sample_matrices(blocks, experts, ("wi", "wo"), count)
        assert len(set(picks)) == len(picks) == count
        assert {p[:2] for p in picks} == set(blocks) and {p[3] for p in picks} == {"wi", "wo"}
        order = [(blocks.index(p[:2]), p[2], p[3]) for p in picks]
        assert order == sorted(order)
    wide = sample_matrices(blocks, 2048, ("wi", "wo"), 64)
    assert max(p[2] for p in wide) - min(p[2] for p in wide) > 1500  # spread over the experts, not the first few
