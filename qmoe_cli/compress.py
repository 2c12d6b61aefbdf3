"""`qmoe compress`: streamed, batched GPTQ over expert groups, written as a quantized checkpoint.

The model runs block by block over the calibration list buffer (`runtime.py`); this module
plugs into every sparse block: route all tokens once, then for each group of `group_size`
experts gather each expert's calibration tokens (at most `token_cap` x the mean per expert,
sentinel positions excluded as in the paper), build Hessians, quantize `wi` and then `wo` (its
Hessian from the *quantized* `wi`'s activations) in one batched call each, and run all the
expert's tokens through the quantized expert so the next block is calibrated on what the
compressed model computes.

Memory: as the runtime (one block + one expert group + the buffers), plus the Hessians of one
group: group_size x (d_model^2 + d_ff^2) fp32.

Crash safety and --resume: the run writes into `.{out}.partial`; non-expert weights are copied
first, then each sparse block's codes land in their own file and the manifest lists the block
as finished. A resumed run recomputes hidden states through finished blocks from their saved
codes (bit-identical to what the first run propagated) and continues; the finished directory is
renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import SwitchConfig
from .data import LoadedData
from .errors import QmoeError
from .fsutil import temporary_name
from .models import OpenModel
from .quant.gptq import GPTQConfig, GPTQResult, accumulate_hessian, gptq_quantize, rtn_quantize
from .quant.grids import QuantSpec
from .quantized import (FORMAT_VERSION, HEAD_FILE, KIND, QuantizedExperts, QuantizedWeights, block_file,
                        expert_file, read_manifest, save_tensors_atomic, write_json_atomic)
from .runtime import ListBuffer, Routing, RunConfig, apply_experts, route, streamed_losses
from .switch import Block
from .checkpoint import TOKENIZER_FILES

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class CompressConfig:
    """Settings of one compression run; all of them enter the resume fingerprint."""

    bits: str  # "ternary" | "2" | "3" | "4" | "8"
    method: str = "gptq"  # "rtn": round-to-nearest on the same grids, the baseline
    group_size: int = 16  # experts quantized in one batched call (bounds GPU memory)
    damp: float = 0.1  # fraction of the mean Hessian diagonal added to it (QMoE's value)
    block_size: int = 128  # GPTQ lazy-batch width
    act_order: bool = False
    grid_group: int | None = None  # columns per grid; None: one grid per row (QMoE)
    token_cap: float = 4.0  # an expert's Hessian uses at most token_cap x mean tokens/expert

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"--group-size must be an integer >= 1, got {self.group_size!r}")
        if not self.token_cap > 0:
            raise ValueError(f"--token-cap must be > 0, got {self.token_cap!r}")
        self.gptq  # validates bits, damp, block_size, grid_group

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.grid_group)

    @property
    def gptq(self) -> GPTQConfig:
        return GPTQConfig(spec=self.spec, damp=self.damp, block_size=self.block_size, act_order=self.act_order)


@dataclass(frozen=True)
class BlockStats:
    """What one sparse block's compression did; stored in the manifest (deterministic fields)."""

    block: str  # "encoder.3"
    tokens_min: int
    tokens_median: int
    tokens_max: int
    error: float  # sum over experts and matrices of the GPTQ objective 1/2 tr(dW H dW^T)
    fallbacks: int  # expert matrices rounded to nearest (no tokens or Hessian not PD)
    zero_fraction: float  # share of expert weights quantized to exactly 0


def fingerprint(model: OpenModel, calib: LoadedData, cfg: CompressConfig) -> str:
    """Hash of everything that determines the output: settings, model config, calibration."""
    h = hashlib.sha256()
    h.update(json.dumps({"settings": asdict(cfg), "config": model.weights.config.to_dict(),
                         "source": model.label}, sort_keys=True).encode())
    for sample in calib.samples:
        h.update(json.dumps([sample.input_ids, sample.labels]).encode())
    return h.hexdigest()


class ExpertCompressor:
    """The runtime's sparse-block hook: quantize a block's experts and propagate through them."""

    def __init__(self, cfg: CompressConfig, config: SwitchConfig, partial: Path, skip: dict[str, torch.Tensor],
                 manifest: dict, log: Callable[[str], None]):
        self.cfg, self.partial, self.skip, self.manifest, self.log = cfg, partial, skip, manifest, log
        self.saved = QuantizedWeights(partial, config, cfg.spec, cfg.group_size)  # reads back finished blocks

    def __call__(self, stack: str, index: int, block: Block, buffer: ListBuffer, run: RunConfig) -> None:
        name = f"{stack}.{index}"
        routing = route(block.ffn, buffer, run)
        if name in self.manifest["finished"]:  # resumed: replay the saved codes
            bank = self.saved.experts(stack, index)
        else:
            started = time.perf_counter()
            bank, stats = self._quantize(stack, index, block, buffer, routing, run)
            self.manifest["blocks"][name] = asdict(stats)
            self.manifest["finished"].append(name)
            write_json_atomic(self.partial / "manifest.json", self.manifest)
            self.log(f"{name}: tokens/expert {stats.tokens_min}/{stats.tokens_median}/{stats.tokens_max} "
                     f"(min/median/max), error {stats.error:.4g}, fallbacks {stats.fallbacks}, "
                     f"zeros {stats.zero_fraction:.1%}, {time.perf_counter() - started:.1f}s")
        apply_experts(block.ffn, bank, buffer, routing, run)

    def _quantize(self, stack: str, index: int, block: Block, buffer: ListBuffer, routing: Routing,
                  run: RunConfig) -> tuple[QuantizedExperts, BlockStats]:
        """Quantize every expert of the block, group by group, each group to its own file."""
        source = block.ffn.mlp.experts
        num = source.num_experts
        cap = max(1, math.ceil(self.cfg.token_cap * buffer.data.shape[0] / num))
        errors, fallbacks, zeros, total = 0.0, 0, 0, 0
        groups = tqdm(range(0, num, self.cfg.group_size), desc=f"{stack}.{index} expert groups", unit="group",
                      disable=not run.progress, leave=False)
        for first in groups:
            tensors: dict[str, torch.Tensor] = {}
            ids = list(range(first, min(num, first + self.cfg.group_size)))
            weights = source.load(ids, run.device, torch.float32)
            inputs = [self._calibration_inputs(block, buffer, routing.tokens(j), stack, cap, run) for j in ids]
            wi = self._solve(torch.stack([e.wi.weight for e in weights]), inputs)
            hidden = [F.relu(x @ wi.q[e].T) for e, x in enumerate(inputs)]
            wo = self._solve(torch.stack([e.wo.weight for e in weights]), hidden)
            for e, j in enumerate(ids):
                for name, result in (("wi", wi), ("wo", wo)):
                    prefix = f"expert_{j}.{name}."
                    tensors[prefix + "codes"] = result.codes[e]
                    for field, value in result.grid.tensors().items():
                        tensors[prefix + field] = value[e]
            for result in (wi, wo):
                errors += float(result.error.double().sum())
                fallbacks += int(result.fallback.sum())
                zeros += int((result.q == 0).sum())
                total += result.q.numel()
            save_tensors_atomic(tensors, self.partial / expert_file(stack, index, first // self.cfg.group_size))
        counts = sorted(routing.count(j) for j in range(num))
        stats = BlockStats(f"{stack}.{index}", counts[0], counts[len(counts) // 2], counts[-1],
                           errors, fallbacks, zeros / total)
        return self.saved.experts(stack, index), stats

    def _calibration_inputs(self, block: Block, buffer: ListBuffer, tokens: torch.Tensor, stack: str,
                            cap: int, run: RunConfig) -> torch.Tensor:
        """Normalised inputs [n, d] fp32 of an expert's calibration tokens (no sentinels, capped)."""
        tokens = tokens[~self.skip[stack][tokens]][:cap]
        x = buffer.data.index_select(0, tokens).to(run.device)
        return block.ffn.layer_norm(x).float()

    def _solve(self, w: torch.Tensor, inputs: list[torch.Tensor]) -> GPTQResult:
        """Quantize a stack w [E, rows, cols] fp32 given each expert's inputs [n_e, cols]."""
        if self.cfg.method == "rtn":
            return rtn_quantize(w, self.cfg.spec)
        h = torch.stack([accumulate_hessian(None, 0, x)[0] for x in inputs])  # [E, cols, cols]
        return gptq_quantize(w, h, self.cfg.gptq)


def compress(model: OpenModel, calib: LoadedData, cfg: CompressConfig, out: Path, run: RunConfig,
             resume: bool, sentinel_ids: tuple[int, ...], log: Callable[[str], None]) -> dict:
    """Compress `model`'s experts into the quantized checkpoint `out`; returns the manifest.

    Refuses an existing `out`, and a partial run of other settings; continues a partial run of
    the same settings only with `resume`.
    """
    if out.exists():
        raise QmoeError(f"--out {out}: already exists; choose another directory or remove it")
    partial = temporary_name(out)
    digest = fingerprint(model, calib, cfg)
    if partial.exists() and resume and not (partial / "manifest.json").is_file():
        shutil.rmtree(partial)  # killed while setting up: nothing finished, start over
    if partial.exists():
        manifest = read_manifest(partial) if (partial / "manifest.json").is_file() else {}
        if not resume:
            raise QmoeError(f"--out {out}: an interrupted run is in {partial}; pass --resume to continue it "
                            "or remove it to start over")
        if manifest.get("fingerprint") != digest:
            raise QmoeError(f"--resume: {partial} was made with other settings, model or calibration data; "
                            "rerun with the same flags or remove it")
        log(f"resuming: {len(manifest['finished'])} sparse blocks already done")
    else:
        manifest = _start(model, cfg, digest, partial)
    config = model.weights.config
    skip = _sentinel_masks(calib, config, sentinel_ids)
    hook = ExpertCompressor(cfg, config, partial, skip, manifest, log)
    samples = calib.samples
    loss_sum, tokens = streamed_losses(model.weights, [s.input_ids for s in samples],
                                       [s.labels for s in samples], run, sparse_hook=hook)
    hook.saved.close()
    manifest["complete"] = True
    manifest["calibration_loss"] = float(loss_sum.sum() / tokens.sum())
    write_json_atomic(partial / "manifest.json", manifest)
    partial.rename(out)
    return manifest


def _start(model: OpenModel, cfg: CompressConfig, digest: str, partial: Path) -> dict:
    """Create the partial directory: manifest, config, tokenizer, non-expert weights."""
    partial.mkdir(parents=True)
    config = model.weights.config
    manifest = {"kind": KIND, "format_version": FORMAT_VERSION, "source": model.label, "window": model.window,
                "settings": {**asdict(cfg)}, "config": config.to_dict(), "fingerprint": digest,
                "finished": [], "blocks": {}, "complete": False}
    for name in TOKENIZER_FILES:
        if (model.tokenizer_dir / name).is_file():
            shutil.copy(model.tokenizer_dir / name, partial / name)
    head = ["shared.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"]
    if not config.tie_word_embeddings:
        head.append("lm_head.weight")
    save_tensors_atomic({n: model.weights.tensor(n, None, torch.device("cpu")) for n in head}, partial / HEAD_FILE)
    for stack in ("encoder", "decoder"):
        for i in range(config.num_blocks(stack)):
            with torch.device("meta"):
                names = list(Block(config, stack, i, experts=_NoExperts()).state_dict())
            prefix = f"{stack}.block.{i}."
            tensors = {prefix + n: model.weights.tensor(prefix + n, None, torch.device("cpu")) for n in names}
            save_tensors_atomic(tensors, partial / block_file(stack, i))
    write_json_atomic(partial / "manifest.json", manifest)
    return manifest


class _NoExperts:
    """Stands in for a bank when only a block's non-expert parameter names are wanted."""

    num_experts = 0


def _sentinel_masks(calib: LoadedData, config: SwitchConfig, sentinel_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per stack, [tokens] bool: positions holding a sentinel, left out of Hessians (QMoE)."""
    sentinels = torch.tensor(sorted(sentinel_ids), dtype=torch.long)
    masks = {}
    for stack in ("encoder", "decoder"):
        ids = []
        for s in calib.samples:
            seq = list(s.input_ids) if stack == "encoder" else [config.decoder_start_token_id, *s.labels[:-1]]
            ids.extend(seq)
        masks[stack] = torch.isin(torch.tensor(ids, dtype=torch.long), sentinels)
    return masks
