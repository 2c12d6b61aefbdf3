"""The checkpoint formats qmoe reads, and the one place that tells which one a directory holds.

Three formats, each owned by its modules: original (a Hugging Face checkpoint: `original`
describes it, `hf` reads it), quantized (`quantized`, `quantized_manifest`) and packed (`packed`,
`packed_manifest`). A directory with our `manifest.json` is the format its `kind` names; a
directory with a `config.json`, a preset or a hub id names an original checkpoint. Each `Format`
says how it opens, where an opened model's defaults come from and what `qmoe info` reports of it,
so `formats.open`, `formats.info` and the CLI ask `detect` and the format it returns instead of
branching on the kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..arch import ModelWeights
from ..arch.presets import Preset, load_preset
from ..errors import QmoeError, UsageError
from . import original, packed, quantized
from .hf import CheckpointWeights, resolve_model
from .quantized_manifest import read_manifest
from .safetensors_io import SafetensorsFile
from .stats import LayerSize

MANIFEST = "manifest.json"  # what makes a directory a compressed (quantized or packed) checkpoint


@dataclass(frozen=True)
class Origin:
    """Where an opened checkpoint's defaults come from (`formats.open` turns them into a window
    and default data)."""

    preset: Preset | None  # the model's preset (a compressed checkpoint's source's)
    data_dir: Path | None  # a model directory whose own data files are the defaults when there is no preset
    window: int | None  # the longest sequence the checkpoint records; None: the preset's or the default
    tokenizer_dir: Path
    stored_dtype: torch.dtype  # the dtype of its unquantized tensors


@dataclass(frozen=True)
class Format:
    """One checkpoint format: how `--model` opens it and how `qmoe info` describes it."""

    kind: str  # "original" | "quantized" | "packed", as `qmoe info` and `qmoe eval` report it
    open: Callable[[str], Any]  # `--model` (a directory, or a preset or hub id) -> its `ModelWeights`, checked
    origin: Callable[[Any], Origin]  # the opened weights' defaults
    describe: Callable[[Any], tuple[dict[str, Any], dict[str, Any]]]  # `qmoe info`: (source and settings, sizes)
    verify: Callable[[Any], None]  # `qmoe info --verify`: check every byte; QmoeError otherwise
    headline: Callable[[dict[str, Any]], str]  # `qmoe info`'s first line, from its object, after the path


def detect(name: str) -> Format:
    """The format of the checkpoint `--model` names: a directory's `manifest.json` names its kind
    (a kind qmoe does not know goes to the quantized reader, whose check names the kind and
    version it reads); a directory with only a `config.json`, or a name that is no directory (a
    preset, a hub id: `hf.resolve_model` checks it), is original."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return ORIGINAL
    if (path / MANIFEST).is_file():
        return FORMATS.get(read_manifest(path)["kind"], QUANTIZED)
    if (path / original.CONFIG_FILE).is_file():
        return ORIGINAL
    raise QmoeError(f"{path}: not a checkpoint directory (no {MANIFEST} of a quantized or packed checkpoint, "
                    f"no {original.CONFIG_FILE} of an original one)")


# ---------------------------------------------------------------- compressed: quantized and packed

def _compressed_origin(weights: quantized.QuantizedWeights | packed.PackedWeights) -> Origin:
    """A compressed checkpoint keeps its source's window and default data (via its manifest)."""
    window, source = weights.manifest.window, weights.manifest.source
    if not isinstance(window, int) or window < 2 or not isinstance(source, str):
        raise QmoeError(f"{weights.directory / MANIFEST}: malformed manifest (needs a 'source' name and a "
                        "'window' >= 2)")
    embedding = weights.arch.embedding_tensor(weights.arch.stacks[0])
    stored = weights.tensor(embedding, None, torch.device("cpu")).dtype
    source_dir = Path(source).expanduser()
    return Origin(load_preset(source), source_dir if source_dir.is_dir() else None, window, weights.directory, stored)


def _compressed_headline(info: dict[str, Any]) -> str:
    settings = info["settings"]
    symmetric = " symmetric" if settings.get("symmetric") else ""
    return f"{info['kind']} checkpoint of {info['source']}, {settings['method']} {settings['bits']}{symmetric}"


def _with_ratio(sizes: dict[str, Any]) -> dict[str, Any]:
    """`sizes` without its row name, plus codes bits over the entropy bound (None if unknown)."""
    sizes.pop("name")
    entropy = sizes.get("entropy_bits_per_weight")
    return {**sizes, "ratio_to_entropy": sizes["bits_per_weight_codes"] / entropy if entropy else None}


def _quantized_describe(weights: quantized.QuantizedWeights) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bytes of the stored uint8 codes and grids per sparse block (its shared expert's
    included), from the file headers."""
    layers, total = [], LayerSize()
    for stack, i in weights.arch.sparse_blocks():
        layer = LayerSize()
        names = [quantized.expert_file(stack, i, group)
                 for group in quantized.expert_groups(weights.arch.num_experts, weights.group_size)]
        for name in names + ([quantized.shared_file(stack, i)] if weights.shared else []):
            path = weights.directory / name
            if not path.is_file():
                raise QmoeError(f"{path}: missing; the quantized checkpoint is incomplete")
            file = SafetensorsFile(path)
            for key, entry in file.entries.items():
                layer.all_in_bytes += entry.end - entry.begin
                if key.endswith(".codes"):
                    layer.weights += math.prod(entry.shape)
                    layer.code_bytes += entry.end - entry.begin
            file.close()
        layers.append(layer.summary(f"{stack}.{i}"))
        total.weights += layer.weights
        total.code_bytes += layer.code_bytes
        total.all_in_bytes += layer.all_in_bytes
    head = {"source": weights.manifest.source, "settings": weights.manifest.settings}
    return head, _with_ratio({**total.summary("all"), "layers": layers})


def _packed_describe(weights: packed.PackedWeights) -> tuple[dict[str, Any], dict[str, Any]]:
    """The statistics `qmoe pack` recorded in the manifest."""
    manifest = weights.manifest
    head = {"source": manifest.source, "settings": manifest.settings}
    return head, _with_ratio({**manifest.totals, "codec": manifest.codec, "layers": manifest.layers})


# ---------------------------------------------------------------- original (Hugging Face)

def _original_origin(weights: CheckpointWeights) -> Origin:
    source = weights.source
    return Origin(source.preset, source.directory, None, source.directory, weights.stored_dtype())


def _original_describe(weights: CheckpointWeights) -> tuple[dict[str, Any], dict[str, Any]]:
    """Family, stored dtype and weight files, from config.json and the shard headers."""
    manifest, arch = weights.manifest, weights.arch
    return {"source": weights.source.label}, {
        "family": manifest.family, "model_type": manifest.config.get("model_type"),
        "dtype": str(weights.stored_dtype()).removeprefix("torch."), "quantization": manifest.quantization,
        "layout": manifest.weights.layout, "files": list(manifest.weights.shards),
        "experts": arch.num_experts, "sparse_blocks": len(arch.sparse_blocks())}


def _original_verify(weights: CheckpointWeights) -> None:
    raise UsageError(f"--verify: {weights.source.directory} is an original checkpoint, which records no checksums "
                     "to verify against; `qmoe info --verify` checks quantized and packed checkpoints")


def _original_headline(info: dict[str, Any]) -> str:
    shards = len(info["files"])
    stored = info["dtype"] if info["quantization"] is None else f"{info['quantization']} ({info['dtype']} dense)"
    plural = "s" if shards > 1 else ""
    return f"original checkpoint ({info['family']}, {stored}), {shards} {info['layout']} shard{plural}"


def _opener(reader: Callable[[Path], ModelWeights]) -> Callable[[str], ModelWeights]:
    return lambda name: reader(Path(name).expanduser())


ORIGINAL = Format(original.KIND, lambda name: CheckpointWeights(resolve_model(name)), _original_origin,
                  _original_describe, _original_verify, _original_headline)
QUANTIZED = Format(quantized.KIND, _opener(quantized.QuantizedWeights.open), _compressed_origin, _quantized_describe,
                   quantized.QuantizedWeights.verify, _compressed_headline)
PACKED = Format(packed.KIND, _opener(packed.PackedWeights.open), _compressed_origin, _packed_describe,
                packed.PackedWeights.verify, _compressed_headline)
FORMATS: dict[str, Format] = {f.kind: f for f in (ORIGINAL, QUANTIZED, PACKED)}
