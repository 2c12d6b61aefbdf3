"""`qmoe export`: a checkpoint of any kind written as a Hugging Face checkpoint transformers loads.

Formats:
- "hf": dense weights in the checkpoint's dtype; expert matrices dequantized (fp32 values rounded
  once to that dtype, as our runtime rounds them), under their original names.
- "compressed-tensors": the same, except that expert matrices stay quantized in the
  `pack-quantized` layout (`compressed_tensors.py`); non-expert weights are as stored.

Memory: one shard at a time (`source.plan`: the head, one block's dense tensors, or one group of
a block's experts). The output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..files import atomic_directory, save_tensors_atomic, write_json_atomic
from ..formats.card import write_card
from . import compressed_tensors as ct
from .source import ExportSource, Shard

FORMATS = ("hf", "compressed-tensors")
ASYMMETRIC_NOTE = ("asymmetric (min-max) experts keep their zero points, which transformers 5.25 drops when it "
                   "loads fused MoE experts; compress with --symmetric for an export it loads")


@dataclass(frozen=True)
class ExportConfig:
    """What `qmoe export` writes."""

    format: str  # one of FORMATS
    config: Path | None = None  # the source's Hugging Face config.json (compressed checkpoints whose source is gone)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r} is not an export format; choose one of {', '.join(FORMATS)}")


def shard_name(k: int, total: int) -> str:
    return f"model-{k + 1:05d}-of-{total:05d}.safetensors"


def export(checkpoint: Path, out: Path, cfg: ExportConfig, note: Callable[[str], None]) -> dict[str, Any]:
    """Write `checkpoint` (original, quantized or packed) to `out` as `cfg.format`; returns a summary
    (its `notes`: what the user should know about the output, e.g. `ASYMMETRIC_NOTE`). ValueError (a
    usage error) for a checkpoint the format cannot hold; `note` hears progress."""
    source = ExportSource(checkpoint, cfg.config)
    try:
        if cfg.format == "compressed-tensors" and source.spec is None:
            raise ValueError(f"{checkpoint}: an original checkpoint has no quantized experts for --format "
                             "compressed-tensors; compress it first (qmoe compress --bits 4 --symmetric) "
                             "or use --format hf")
        plan = source.plan()
        with atomic_directory(out) as tmp:
            weight_map: dict[str, str] = {}
            total_bytes = 0
            for k, shard in enumerate(plan):
                tensors = _shard_tensors(source, shard, cfg.format)
                name = shard_name(k, len(plan))
                save_tensors_atomic(tensors, tmp / name)
                weight_map.update({t: name for t in tensors})
                total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
                note(f"export: shard {k + 1}/{len(plan)}")
            write_json_atomic(tmp / "model.safetensors.index.json",
                              {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
            write_json_atomic(tmp / "config.json", _config(source, cfg.format))
            for path in source.companion_files():
                shutil.copyfile(path, tmp / path.name)
            write_card(tmp, _card_facts(source, cfg.format))
        notes = [ASYMMETRIC_NOTE] if cfg.format == "compressed-tensors" and not source.spec.symmetric else []
        return {"path": str(out), "format": cfg.format, "kind": source.kind, "shards": len(plan),
                "tensor_bytes": total_bytes, "notes": notes}
    finally:
        source.close()


def _shard_tensors(source: ExportSource, shard: Shard, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors of one output shard, by Hugging Face name."""
    if shard.block is None:
        return {n: source.dense(n) for n in shard.dense}
    tensors = {}
    for matrix in source.experts(shard):
        if fmt == "hf":
            tensors[matrix.name] = matrix.values.to(source.dtype)
        else:
            tensors.update(ct.matrix_tensors(matrix, source.spec, f"{source.directory} {matrix.name}"))
    return tensors


def _config(source: ExportSource, fmt: str) -> dict[str, Any]:
    """The source's `config.json`; a compressed-tensors export declares its quantization, a dense
    one none (a block-fp8 source's `quantization_config` no longer describes the weights)."""
    config = {k: v for k, v in source.hf_config.items() if k != "quantization_config"}
    config["dtype"] = str(source.dtype).removeprefix("torch.")
    if fmt == "compressed-tensors":
        config["quantization_config"] = ct.quantization_config(source.spec, _targets(source))
    return config


def _targets(source: ExportSource) -> list[str]:
    """compressed-tensors `targets`: one regex over module names matching every quantized matrix
    (any block, any expert: `...experts.[0-9]+.w1$`)."""
    arch, names = source.arch, set()
    for stack in arch.stacks:  # the first sparse block of each stack (Switch's differ in layout)
        i = next(i for s, i in arch.sparse_blocks() if s == stack)
        local = [arch.expert_tensor(stack, i, 0, m) for m in arch.expert.matrices]
        if source.stores_shared:
            local += [arch.shared_tensor(stack, i, m) for m in arch.shared_expert.matrices]
        names |= {n.removeprefix(arch.block_prefix(stack, i)).removesuffix(".weight") for n in local}
    modules = sorted(re.escape(n).replace(r"experts\.0\.", r"experts\.[0-9]+\.").replace("expert_0", "expert_[0-9]+")
                     for n in names)
    return [f"re:.*\\.({'|'.join(modules)})$"]


def _card_facts(source: ExportSource, fmt: str) -> dict[str, Any]:
    manifest = source.manifest or {}
    facts: dict[str, Any] = {"format": fmt, "kind": source.kind, "family": source.arch.family,
                             "base_model": manifest.get("source") or str(source.directory),
                             "dtype": str(source.dtype).removeprefix("torch.")}
    if source.spec is not None:
        facts["bits"] = source.spec.bits
        facts["grid_group"] = source.spec.group_size
        facts["symmetric"] = source.spec.symmetric or None  # recorded only when set, as in the manifest
        facts["method"] = manifest.get("settings", {}).get("method")
        facts["calibration_loss"] = manifest.get("calibration_loss")
        facts["bits_per_weight"] = (manifest.get("totals") or {}).get("bits_per_weight_codes")
    return facts
