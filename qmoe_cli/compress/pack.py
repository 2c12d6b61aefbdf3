"""`qmoe pack`: a quantized checkpoint -> a packed one (format in `packed.py`).

Ternary experts are entropy-coded with a dictionary fitted to this model: a first pass counts
the pair symbols of every expert matrix, the dictionary is fitted to those frequencies
(`codec/dictionary.py`), and a second pass encodes each matrix, decodes it again to check the
round trip is lossless, and writes one file per expert group. b-bit experts are bit-packed.
Non-expert weights and the tokenizer are copied byte for byte.

Memory: one expert group's codes and its encoding at a time (plus the dictionary, ~3 MB).
The output is written under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from ..codec.bitpack import pack_bits, unpack_bits
from ..codec.dictionary import NUM_SYMBOLS, Codebook, DictionarySpec, fit_dictionary, pair_symbols, parse_statistics
from ..codec.rows import decode_matrix, encode_matrix
from ..errors import QmoeError, os_error_message
from ..files import atomic_directory
from ..formats.hf import TOKENIZER_FILES
from ..formats.packed import DICTIONARY_FILE, FORMAT_VERSION, KIND, file_record, manifest_digest
from ..formats.quantized import (
    HEAD_FILE,
    QuantizedWeights,
    block_file,
    expert_file,
    expert_groups,
    read_manifest,
    save_tensors_atomic,
    write_json_atomic,
)
from ..formats.safetensors_io import SafetensorsFile
from ..formats.stats import LayerSize
from ..locks import output_lock


@dataclass(frozen=True)
class PackConfig:
    """Settings of `qmoe pack`; the defaults match the QMoE kernel (16-bit codewords, 28 weights)."""

    dictionary_size: int = 1 << 16
    max_pairs: int = 14  # pairs of weights per codeword
    progress: bool = False

    def __post_init__(self) -> None:
        if not 9 <= self.dictionary_size <= 1 << 16:
            raise ValueError(f"--dictionary-size must be in [9, 65536] (16-bit codewords), got {self.dictionary_size}")
        if not 1 <= self.max_pairs <= 127:
            raise ValueError(f"--max-pairs must be in [1, 127], got {self.max_pairs}")

    @property
    def dictionary(self) -> DictionarySpec:
        return DictionarySpec(self.dictionary_size, self.max_pairs)


def pack(source: Path, out: Path, cfg: PackConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Pack the quantized checkpoint `source` into `out` (which must not exist); returns the manifest.

    One process at a time writes `out` (a lock beside it); on any failure, a full disk included,
    nothing is left at `out` or under its temporary name.
    """
    if source.exists() and not source.is_dir():
        raise QmoeError(f"{source}: not a directory; `qmoe pack` takes a quantized checkpoint directory "
                        "written by `qmoe compress`")
    weights = QuantizedWeights.open(source)
    quantized = read_manifest(source)
    if not quantized.get("complete"):
        raise QmoeError(f"{source}: the quantized checkpoint is incomplete; finish it with `qmoe compress --resume`")
    with output_lock(out, "qmoe pack"):
        try:
            return _pack(weights, quantized, source, out, cfg, log)
        except (OSError, SafetensorError) as exc:
            raise QmoeError(f"{out}: {os_error_message(exc)}; nothing was written: free space (or fix the cause) "
                            f"and rerun `qmoe pack {source}`") from exc


def _pack(weights: QuantizedWeights, quantized: dict[str, Any], source: Path, out: Path, cfg: PackConfig,
          log: Callable[[str], None]) -> dict[str, Any]:
    if out.exists():
        raise QmoeError(f"--out {out}: already exists; choose another directory or remove it")
    spec = weights.spec
    blocks = weights.arch.sparse_blocks()
    layers = {f"{stack}.{i}": LayerSize() for stack, i in blocks}
    with atomic_directory(out) as tmp:
        codec: dict[str, Any]
        if spec.ternary:
            book, codec = _fit(weights, blocks, layers, cfg, log)
            save_tensors_atomic({"symbols": book.symbols, "lengths": book.lengths}, tmp / DICTIONARY_FILE)
        else:
            book, codec = None, {"type": "bitpack", "bits": int(spec.bits)}
        for stack, i in tqdm(blocks, desc="packing", unit="block", disable=not cfg.progress):
            for group in expert_groups(weights.arch.num_experts, weights.group_size):
                tensors = _pack_group(weights, stack, i, group, book, layers[f"{stack}.{i}"])
                save_tensors_atomic(tensors, tmp / expert_file(stack, i, group))
        _copy_dense(source, tmp, weights)
        manifest = _manifest(quantized, codec, cfg, layers, spec.ternary, tmp)
        write_json_atomic(tmp / "manifest.json", manifest)
    weights.close()
    return manifest


def _fit(weights: QuantizedWeights, blocks: list[tuple[str, int]], layers: dict[str, LayerSize], cfg: PackConfig,
         log: Callable[[str], None]) -> tuple[Codebook, dict[str, Any]]:
    """First pass: count pair symbols per layer; fit the dictionary to the whole model's counts."""
    total = torch.zeros(NUM_SYMBOLS, dtype=torch.int64)
    for stack, i in tqdm(blocks, desc="counting symbols", unit="block", disable=not cfg.progress):
        counts = torch.zeros(NUM_SYMBOLS, dtype=torch.int64)
        for group in expert_groups(weights.arch.num_experts, weights.group_size):
            for _, _, tensors in _matrices(weights, stack, i, group):
                counts += torch.bincount(pair_symbols(tensors["codes"]).flatten(), minlength=NUM_SYMBOLS)
        layers[f"{stack}.{i}"].histogram = counts
        total += counts
    probs = (total.double() / total.sum()).tolist()
    book = Codebook.from_sequences(fit_dictionary(probs, cfg.dictionary), cfg.max_pairs)
    _, pairs_per_word = parse_statistics(book, probs)
    log(f"dictionary: {book.size} codewords of up to {book.max_len} pairs, fitted to "
        f"{int(total.sum())} pairs ({probs[4]:.1%} zero pairs); expected {8 / pairs_per_word:.4f} bits/weight")
    return book, {"type": "dictionary", "size": book.size, "max_pairs": book.max_len, "symbol_probs": probs,
                  "expected_bits_per_weight": 8 / pairs_per_word}


def _matrices(weights: QuantizedWeights, stack: str, i: int,
              group: int) -> Iterator[tuple[int, str, dict[str, torch.Tensor]]]:
    """(expert, matrix name, its tensors: codes and grid) over the expert matrices of one group file."""
    fields = ("codes", "lo", "hi") if weights.spec.ternary else ("codes", "scale", "zero")
    path = weights.directory / expert_file(stack, i, group)
    if not path.is_file():
        raise QmoeError(f"{path}: missing; the quantized checkpoint is incomplete")
    file = SafetensorsFile(path)
    try:
        first = group * weights.group_size
        for j in range(first, min(first + weights.group_size, weights.arch.num_experts)):
            for name in weights.arch.expert.matrices:
                keys = [f"expert_{j}.{name}.{f}" for f in fields]
                missing = [k for k in keys if k not in file.entries]
                if missing:
                    raise QmoeError(f"{path}: tensor '{missing[0]}' is missing; the checkpoint is corrupt")
                yield j, name, {f: file.read(k) for f, k in zip(fields, keys)}
    finally:
        file.close()


def _pack_group(weights: QuantizedWeights, stack: str, i: int, group: int, book: Codebook | None,
                layer: LayerSize) -> dict[str, torch.Tensor]:
    """Encode one expert group, checking each matrix decodes back to its codes."""
    out: dict[str, torch.Tensor] = {}
    for j, name, tensors in _matrices(weights, stack, i, group):
        codes, prefix = tensors.pop("codes"), f"expert_{j}.{name}."
        if book is not None:
            words, offsets = encode_matrix(codes, book)
            if not torch.equal(decode_matrix(words, offsets, book, codes.shape[1]), codes):
                raise QmoeError(f"{stack}.{i} expert {j} {name}: the codec's round trip is not lossless (a bug)")
            encoded = {"words": words, "offsets": offsets}
            code_bytes = 2 * words.numel()
        else:
            bits = int(weights.spec.bits)
            packed = pack_bits(codes, bits)
            if not torch.equal(unpack_bits(packed, bits, codes.shape[1]), codes):
                raise QmoeError(f"{stack}.{i} expert {j} {name}: bit-packing is not lossless (a bug)")
            encoded = {"packed": packed}
            code_bytes = packed.numel()
            counts = torch.bincount(codes.flatten().long(), minlength=1 << bits)
            layer.histogram = counts if layer.histogram is None else layer.histogram + counts
        out.update({prefix + k: v for k, v in {**encoded, **tensors}.items()})
        layer.weights += codes.numel()
        layer.code_bytes += code_bytes
        layer.all_in_bytes += sum(t.numel() * t.element_size() for t in {**encoded, **tensors}.values())
    return out


def _copy_dense(source: Path, tmp: Path, weights: QuantizedWeights) -> None:
    """Head, per-block dense files and tokenizer files, byte for byte."""
    names = [HEAD_FILE] + [block_file(stack, i) for stack in weights.arch.stacks
                           for i in range(weights.arch.num_blocks(stack))]
    names += [n for n in TOKENIZER_FILES if (source / n).is_file()]
    for name in names:
        if not (source / name).is_file():
            raise QmoeError(f"{source / name}: missing; the quantized checkpoint is incomplete")
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, tmp / name)


def _manifest(quantized: dict[str, Any], codec: dict[str, Any], cfg: PackConfig, layers: dict[str, LayerSize],
              ternary: bool, tmp: Path) -> dict[str, Any]:
    per_symbol = 2 if ternary else 1  # weights per counted symbol: pairs, or single b-bit codes
    rows = [layer.summary(name, per_symbol) for name, layer in layers.items()]
    total = LayerSize(weights=sum(r["weights"] for r in rows), code_bytes=sum(r["code_bytes"] for r in rows),
                   all_in_bytes=sum(r["all_in_bytes"] for r in rows),
                   histogram=torch.stack([layer.histogram for layer in layers.values()]).sum(0))
    files = {str(p.relative_to(tmp)): file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"kind": KIND, "format_version": FORMAT_VERSION, "source": quantized["source"],
                "window": quantized["window"], "config": quantized["config"], "settings": quantized["settings"],
                "quantized_fingerprint": quantized["fingerprint"], "codec": codec,
                "pack_settings": {k: v for k, v in asdict(cfg).items() if k != "progress"},
                "totals": total.summary("all", per_symbol), "layers": rows, "files": files,
                "total_bytes": sum(f["bytes"] for f in files.values())}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return manifest
