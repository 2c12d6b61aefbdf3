"""`qmoe pack`: a quantized checkpoint -> a packed one (format in `formats/packed.py`).

Ternary experts are entropy-coded with a dictionary fitted to this model. The pair-symbol
frequencies the dictionary is fitted to come from a sample of `sample_matrices` expert matrices
spread evenly over the sparse blocks (all of them for small models), so the codes are read
once, plus the sample: one pass encodes each group, decodes it again to check the round trip
is lossless, counts its symbols exactly (for the entropy statistics) and writes one file per
expert group, while a pool of threads hashes finished files (sha256 releases the GIL).
Sampling costs little rate: the symbol frequencies of matrices of one model barely differ
(measured in the README). b-bit experts are bit-packed. A block's quantized shared expert is
coded like its routed experts, with the same dictionary, into its own file (and counted in the
statistics). Non-expert weights and the tokenizer are copied byte for byte.

Memory: one expert group's codes and its encoding at a time (plus the dictionary, ~3 MB, and
one sampled matrix while counting): independent of the number of experts and blocks.
The output is written under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from ..codec.bitpack import pack_bits, unpack_bits
from ..codec.dictionary import NUM_SYMBOLS, Codebook, DictionarySpec, fit_dictionary, pair_symbols, parse_statistics
from ..codec.rows import decode_matrix, encode_matrix
from ..errors import QmoeError, os_error_message, os_error_remedy
from ..files import atomic_directory, save_tensors_atomic
from ..formats.card import manifest_facts, write_card
from ..formats.hf import COMPANION_FILES
from ..formats.integrity import file_record
from ..formats.packed import DICTIONARY_FILE
from ..formats.packed_manifest import PackedManifest
from ..formats.quantized import (
    HEAD_FILE,
    SHARED,
    QuantizedExperts,
    QuantizedWeights,
    block_file,
    expert_file,
    expert_groups,
    member_prefix,
    member_shape,
    shared_file,
)
from ..formats.quantized_manifest import QuantizedManifest
from ..formats.stats import LayerSize
from ..locks import output_lock
from ..quant.grids import QuantSpec


@dataclass(frozen=True)
class PackConfig:
    """Settings of `qmoe pack`; the defaults match the QMoE kernel (16-bit codewords, 28 weights)."""

    dictionary_size: int = 1 << 16
    max_pairs: int = 14  # pairs of weights per codeword
    sample_matrices: int = 64  # expert matrices whose symbols fit the dictionary; 0: every one
    hash_threads: int = min(8, os.cpu_count() or 1)  # files hashed at once while encoding goes on
    progress: bool = False

    def __post_init__(self) -> None:
        if not 9 <= self.dictionary_size <= 1 << 16:
            raise ValueError(f"--dictionary-size must be in [9, 65536] (16-bit codewords), got {self.dictionary_size}")
        if not 1 <= self.max_pairs <= 127:
            raise ValueError(f"--max-pairs must be in [1, 127], got {self.max_pairs}")
        if self.sample_matrices < 0:
            raise ValueError(f"--sample-matrices must be >= 0 (0: every matrix), got {self.sample_matrices}")
        if self.hash_threads < 1:
            raise ValueError(f"PackConfig.hash_threads must be >= 1, got {self.hash_threads}")

    @property
    def dictionary(self) -> DictionarySpec:
        return DictionarySpec(self.dictionary_size, self.max_pairs)


@dataclass(frozen=True)
class PackResult:
    """What `pack` wrote and how fast: `manifest` is the packed checkpoint's; `input_bytes` the
    expert files read (codes and grids, sample included), `seconds` the whole run's wall time."""

    manifest: PackedManifest
    seconds: float
    input_bytes: int

    def throughput(self) -> dict[str, float]:
        """For `qmoe pack --json`: MB of expert files read per second and weights per second."""
        weights = self.manifest.totals["weights"]
        return {"seconds": self.seconds, "input_mb": self.input_bytes / 1e6,
                "mb_per_s": self.input_bytes / 1e6 / self.seconds, "weights_per_s": weights / self.seconds}


def pack(source: Path, out: Path, cfg: PackConfig, log: Callable[[str], None]) -> PackResult:
    """Pack the quantized checkpoint `source` into `out` (which must not exist).

    One process at a time writes `out` (a lock beside it); on any failure, a full disk included,
    nothing is left at `out` or under its temporary name.
    """
    if source.exists() and not source.is_dir():
        raise QmoeError(f"{source}: not a directory; `qmoe pack` takes a quantized checkpoint directory "
                        "written by `qmoe compress`")
    weights = QuantizedWeights.open(source)  # refuses a corrupt, edited or incomplete checkpoint
    with output_lock(out, "qmoe pack"):
        try:
            return _pack(weights, source, out, cfg, log)
        except (OSError, SafetensorError) as exc:
            raise QmoeError(f"{out}: {os_error_message(exc)}; nothing was written: {os_error_remedy(exc)}, "
                            f"then rerun `qmoe pack {source}`") from exc


def _pack(weights: QuantizedWeights, source: Path, out: Path, cfg: PackConfig,
          log: Callable[[str], None]) -> PackResult:
    start = time.perf_counter()
    quantized = weights.manifest
    assert quantized is not None, "QuantizedWeights.open keeps the checked manifest"
    if out.exists():
        raise QmoeError(f"--out {out}: already exists; choose another directory or remove it")
    spec = weights.spec
    blocks = weights.arch.sparse_blocks()
    layers = {f"{stack}.{i}": LayerSize() for stack, i in blocks}
    reader = _Reader(weights)
    wide_grids = 0
    with atomic_directory(out) as tmp, ThreadPoolExecutor(cfg.hash_threads) as hasher:
        records: dict[str, Future[dict[str, Any]]] = {}

        def written(name: str) -> None:
            records[name] = hasher.submit(file_record, tmp / name)

        codec: dict[str, Any]
        if spec.dictionary_coded:
            book, codec = _fit(reader, blocks, cfg, log)
            save_tensors_atomic({"symbols": book.symbols, "lengths": book.lengths}, tmp / DICTIONARY_FILE)
            written(DICTIONARY_FILE)
        else:
            book, codec = None, {"type": "bitpack", "bits": int(spec.bits)}
        for stack, i in tqdm(blocks, desc="packing", unit="block", disable=not cfg.progress):
            files = [(expert_file(stack, i, group), reader.group(stack, i, group))
                     for group in expert_groups(weights.arch.num_experts, weights.group_size)]
            if weights.shared:
                files.append((shared_file(stack, i), reader.shared(stack, i)))
            for name, matrices in files:
                tensors, wide = _pack_matrices(matrices, f"{stack}.{i}", spec, book, layers[f"{stack}.{i}"])
                save_tensors_atomic(tensors, tmp / name)
                written(name)
                wide_grids += wide
        for name in _copy_dense(tmp, weights):
            written(name)
        if wide_grids:
            log(f"{wide_grids} matrices keep fp32 grids (quantized by a qmoe before bf16 grids; "
                f"compressing again saves 32 bits a row)")
        files = {name: records[name].result() for name in sorted(records)}
        manifest = _manifest(quantized, codec, cfg, layers, spec.symbol_weights, files)
        card = write_card(tmp, manifest_facts(manifest.to_json()))  # checksummed like every other file
        record = file_record(card)
        manifest = replace(manifest, files={**manifest.files, card.name: record},
                           total_bytes=manifest.total_bytes + record["bytes"])
        manifest.write(tmp)
    reader.close()
    weights.close()
    return PackResult(manifest, time.perf_counter() - start, reader.bytes_read)


def sample_matrices(blocks: list[tuple[str, int]], num_experts: int, names: tuple[str, ...],
                    count: int) -> list[tuple[str, int, int, str]]:
    """`count` expert matrices (stack, block, expert, name) spread evenly over the blocks and
    experts, taking the matrix names in turn; every matrix when count is 0 or covers them all.
    In file order (block, expert, name), so reading them walks the checkpoint forwards."""
    pairs = len(blocks) * num_experts  # (block, expert)
    if count == 0 or count >= pairs * len(names):
        picks = {(p, m) for p in range(pairs) for m in range(len(names))}
    else:  # pair indices rise by at most 1 per pick here, so the turn-taking names keep picks distinct
        picks = {((k * pairs) // count, k % len(names)) for k in range(count)}
    return [(*blocks[p // num_experts], p % num_experts, names[m]) for p, m in sorted(picks)]


def _fit(reader: "_Reader", blocks: list[tuple[str, int]], cfg: PackConfig,
         log: Callable[[str], None]) -> tuple[Codebook, dict[str, Any]]:
    """Count the pair symbols of the sampled matrices; fit the dictionary to them.

    A quantized shared expert is sampled as one more expert of its block (member `num_experts`,
    its matrices in turn by position): its share of the sample is near its share of the weights
    when it is as much wider than a routed expert as it has more weights (Qwen2-MoE: 4x)."""
    arch = reader.weights.arch
    members = arch.num_experts + (1 if reader.weights.shared else 0)
    sample = sample_matrices(blocks, members, arch.expert.matrices, cfg.sample_matrices)
    total = torch.zeros(NUM_SYMBOLS, dtype=torch.int64)
    for stack, i, j, name in tqdm(sample, desc="counting symbols", unit="matrix", disable=not cfg.progress):
        if j == arch.num_experts:
            shared = member_shape(arch, SHARED).matrices
            j, name = SHARED, shared[arch.expert.matrices.index(name) % len(shared)]
        codes = reader.matrix(stack, i, j, name)["codes"]
        total += torch.bincount(pair_symbols(codes).flatten(), minlength=NUM_SYMBOLS)
    probs = (total.double() / total.sum()).tolist()
    book = Codebook.from_sequences(fit_dictionary(probs, cfg.dictionary), cfg.max_pairs)
    _, pairs_per_word = parse_statistics(book, probs)
    of = len(blocks) * (arch.num_experts * len(arch.expert.matrices)
                        + (len(member_shape(arch, SHARED).matrices) if reader.weights.shared else 0))
    log(f"dictionary: {book.size} codewords of up to {book.max_len} pairs, fitted to {int(total.sum())} pairs of "
        f"{len(sample)} of {of} expert matrices ({probs[4]:.1%} zero pairs); expected {8 / pairs_per_word:.4f} "
        f"bits/weight")
    return book, {"type": "dictionary", "size": book.size, "max_pairs": book.max_len, "symbol_probs": probs,
                  "fitted_on_matrices": len(sample), "expected_bits_per_weight": 8 / pairs_per_word}


class _Reader:
    """Expert matrices of a quantized checkpoint through its verifying banks (each file's checksum
    once, then every matrix's code range and grid); one block's bank open at a time; counts bytes."""

    def __init__(self, weights: QuantizedWeights):
        self.weights, self.bytes_read = weights, 0
        self._bank: QuantizedExperts | None = None
        self._block: tuple[str, int] | None = None

    def _read(self, stack: str, i: int, j: int | str, name: str) -> dict[str, torch.Tensor]:
        if self._block != (stack, i):
            self.close()
            self._bank, self._block = self.weights.experts(stack, i), (stack, i)
        tensors = self._bank.stored(j, name)
        self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
        return tensors

    def matrix(self, stack: str, i: int, j: int | str, name: str) -> dict[str, torch.Tensor]:
        """One matrix's codes and grid (sampling); j: an expert, or `SHARED`."""
        return self._read(stack, i, j, name)

    def group(self, stack: str, i: int, group: int) -> Iterator[tuple[int, str, dict[str, torch.Tensor]]]:
        """(expert, matrix name, its codes and grid) over the matrices of one group file."""
        first = group * self.weights.group_size
        for j in range(first, min(first + self.weights.group_size, self.weights.arch.num_experts)):
            for name in self.weights.arch.expert.matrices:
                yield j, name, self._read(stack, i, j, name)

    def shared(self, stack: str, i: int) -> Iterator[tuple[str, str, dict[str, torch.Tensor]]]:
        """(`SHARED`, matrix name, its codes and grid) over a block's shared expert file."""
        for name in member_shape(self.weights.arch, SHARED).matrices:
            yield SHARED, name, self._read(stack, i, SHARED, name)

    def close(self) -> None:
        if self._bank is not None:
            self._bank.close()
        self._bank = self._block = None


def _pack_matrices(matrices: Iterator[tuple[int | str, str, dict[str, torch.Tensor]]], block: str, spec: QuantSpec,
                   book: Codebook | None, layer: LayerSize) -> tuple[dict[str, torch.Tensor], int]:
    """Encode one file's matrices ((expert or `SHARED`, name, codes and grid), from `_Reader`),
    checking each decodes back to its codes; counts their symbols into `layer`. Returns the
    file's tensors and how many matrices keep fp32 grids."""
    out: dict[str, torch.Tensor] = {}
    wide = 0
    for j, name, tensors in matrices:
        codes, prefix = tensors.pop("codes"), f"{member_prefix(j)}{name}."
        if book is not None:
            words, offsets = encode_matrix(codes, book)
            if not torch.equal(decode_matrix(words, offsets, book, codes.shape[1]), codes):
                raise QmoeError(f"{block} {prefix[:-1]}: the codec's round trip is not lossless (a bug)")
            encoded = {"words": words}  # offsets are implied by the codeword lengths
            code_bytes = 2 * words.numel()
            counts = torch.bincount(pair_symbols(codes).flatten(), minlength=NUM_SYMBOLS)
            narrow = {k: v.bfloat16() for k, v in tensors.items()}
            if all(torch.equal(narrow[k].float(), v) for k, v in tensors.items()):
                tensors = narrow
            else:
                wide += 1
        else:
            bits = int(spec.bits)
            packed = pack_bits(codes, bits)
            if not torch.equal(unpack_bits(packed, bits, codes.shape[1]), codes):
                raise QmoeError(f"{block} {prefix[:-1]}: bit-packing is not lossless (a bug)")
            encoded = {"packed": packed}
            code_bytes = packed.numel()
            counts = torch.bincount(codes.flatten().long(), minlength=1 << bits)
        layer.histogram = counts if layer.histogram is None else layer.histogram + counts
        out.update({prefix + k: v for k, v in {**encoded, **tensors}.items()})
        layer.weights += codes.numel()
        layer.code_bytes += code_bytes
        layer.all_in_bytes += sum(t.numel() * t.element_size() for t in {**encoded, **tensors}.values())
    return out, wide


def _copy_dense(tmp: Path, weights: QuantizedWeights) -> list[str]:
    """Head, per-block dense files and tokenizer files, byte for byte (each verified first);
    returns their names."""
    names = [HEAD_FILE] + [block_file(stack, i) for stack in weights.arch.stacks
                           for i in range(weights.arch.num_blocks(stack))]
    names += [n for n in COMPANION_FILES if n in weights.files]
    for name in names:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights.verify_file(name), tmp / name)
    return names


def _manifest(quantized: QuantizedManifest, codec: dict[str, Any], cfg: PackConfig, layers: dict[str, LayerSize],
              per_symbol: int, files: dict[str, dict[str, Any]]) -> PackedManifest:
    rows = [layer.summary(name, per_symbol) for name, layer in layers.items()]
    total = LayerSize(weights=sum(r["weights"] for r in rows), code_bytes=sum(r["code_bytes"] for r in rows),
                   all_in_bytes=sum(r["all_in_bytes"] for r in rows),
                   histogram=torch.stack([layer.histogram for layer in layers.values()]).sum(0))
    return PackedManifest(
        source=quantized.source, window=quantized.window, config=quantized.config,
        settings=quantized.settings, quantized_fingerprint=quantized.fingerprint, codec=codec,
        pack_settings={k: v for k, v in asdict(cfg).items() if k not in ("progress", "hash_threads")},
        totals=total.summary("all", per_symbol), layers=rows, files=files,
        total_bytes=sum(f["bytes"] for f in files.values()))
