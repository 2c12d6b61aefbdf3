"""`qmoe compress`: streamed, batched GPTQ over expert groups, written as a quantized checkpoint.

The model runs block by block over the calibration list buffer (`runtime.py`); `compress_block`
plugs into every sparse block: route all tokens once, then for each group of `group_size`
experts gather each expert's calibration tokens (at most `token_cap` x the mean per expert,
sentinel positions excluded as in the paper), build Hessians, quantize `wi` and then `wo` (its
Hessian from the *quantized* `wi`'s activations) in one batched call each, and run all the
expert's tokens through the quantized expert so the next block is calibrated on what the
compressed model computes.

Distributed (`torchrun`): every rank loads the same calibration data and keeps a contiguous
shard of the samples; dense parts run locally on each shard, sparse blocks cooperate through
`compress_block`, and rank 0 alone reads and writes the output directory, telling the others
what it found. One process is the world-size-1 case of the same code.

Memory: as the runtime (one block + one expert group + the buffers), plus the Hessians of one
group: group_size x (d_model^2 + d_ff^2) fp32, and one matrix's fp64 sums while they are built.

Crash safety and --resume: the run writes into `.{out}.partial`; non-expert weights are copied
first, then each sparse block's codes land in their own files and the manifest lists the block
as finished. A resumed run (with any number of ranks) recomputes hidden states through finished
blocks from their saved codes (bit-identical to what the first run propagated) and continues;
the finished directory is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoint import TOKENIZER_FILES
from .compress_block import ExpertCompressor
from .config import SwitchConfig
from .data import LoadedData, Sample
from .distributed import Comm, shard_bounds
from .errors import QmoeError
from .fsutil import temporary_name
from .models import OpenModel
from .quant.gptq import GPTQConfig
from .quant.grids import QuantSpec
from .quantized import FORMAT_VERSION, HEAD_FILE, KIND, block_file, read_manifest, save_tensors_atomic, write_json_atomic
from .runtime import RunConfig, streamed_losses
from .switch import Block

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


def fingerprint(model: OpenModel, calib: LoadedData, cfg: CompressConfig) -> str:
    """Hash of everything that determines the output: settings, model config, calibration."""
    h = hashlib.sha256()
    h.update(json.dumps({"settings": asdict(cfg), "config": model.weights.config.to_dict(),
                         "source": model.label}, sort_keys=True).encode())
    for sample in calib.samples:
        h.update(json.dumps([sample.input_ids, sample.labels]).encode())
    return h.hexdigest()


def compress(model: OpenModel, calib: LoadedData, cfg: CompressConfig, out: Path, run: RunConfig,
             resume: bool, sentinel_ids: tuple[int, ...], log: Callable[[str], None],
             comm: Comm | None = None) -> dict:
    """Compress `model`'s experts into the quantized checkpoint `out`; returns the manifest.

    Refuses an existing `out`, and a partial run of other settings; continues a partial run of
    the same settings only with `resume`. Runs as one rank of `comm` (default: a group of one,
    on `run.device`); every rank must pass the same model, calibration data and settings, and
    every rank returns the manifest rank 0 wrote.
    """
    comm = comm or Comm(device=run.device)
    digest = fingerprint(model, calib, cfg)
    _check_same_run(digest, comm)
    samples, counts = _shard(calib.samples, comm)
    manifest = comm.on_root(lambda: _open_partial(model, cfg, out, resume, digest, log), "starting the run")
    config = model.weights.config
    hook = ExpertCompressor(cfg, config, temporary_name(out), _sentinel_masks(samples, config, sentinel_ids),
                            manifest, log, comm)
    loss_sum, tokens = streamed_losses(model.weights, [s.input_ids for s in samples], [s.labels for s in samples],
                                       run, sparse_hook=hook)
    hook.close()
    # Per-sample losses in global sample order, so the sum is the one a single process takes.
    loss_sum = comm.gather_rows(loss_sum.to(comm.device), counts, "calibration losses").cpu()  # [samples] fp64
    tokens = comm.gather_rows(tokens.to(comm.device), counts, "calibration losses").cpu()  # [samples] int64
    manifest["calibration_loss"] = float(loss_sum.sum() / tokens.sum())
    return comm.on_root(lambda: _finish(manifest, out), "finishing the run")


def _check_same_run(digest: str, comm: Comm) -> None:
    """Every rank must compress the same thing: compare fingerprints with rank 0's."""
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=comm.device)
    everyone = comm.all_gather(mine, "comparing settings").cpu()  # [W, 32]
    for r in range(1, comm.world_size):
        if not torch.equal(everyone[r], everyone[0]):
            raise QmoeError(f"rank {r}: its model, settings or calibration data differ from rank 0's; every rank "
                            "must be given the same --model, --calib, --calib-samples and --seed")


def _open_partial(model: OpenModel, cfg: CompressConfig, out: Path, resume: bool, digest: str,
                  log: Callable[[str], None]) -> dict:
    """Rank 0: the manifest of the partial run to continue, or of a new one (set up now)."""
    if out.exists():
        raise QmoeError(f"--out {out}: already exists; choose another directory or remove it")
    partial = temporary_name(out)
    if partial.exists() and resume and not (partial / "manifest.json").is_file():
        shutil.rmtree(partial)  # killed while setting up: nothing finished, start over
    if not partial.exists():
        return _start(model, cfg, digest, partial)
    manifest = read_manifest(partial) if (partial / "manifest.json").is_file() else {}
    if not resume:
        raise QmoeError(f"--out {out}: an interrupted run is in {partial}; pass --resume to continue it "
                        "or remove it to start over")
    if manifest.get("fingerprint") != digest:
        raise QmoeError(f"--resume: {partial} was made with other settings, model or calibration data; "
                        "rerun with the same flags or remove it")
    log(f"resuming: {len(manifest['finished'])} sparse blocks already done")
    return manifest


def _shard(samples: Sequence[Sample], comm: Comm) -> tuple[Sequence[Sample], list[int]]:
    """This rank's contiguous shard of the samples (about equal tokens per rank), and every
    rank's sample count."""
    if len(samples) < comm.world_size:
        raise QmoeError(f"--calib-samples: {len(samples)} calibration samples cannot be shared by "
                        f"{comm.world_size} ranks; use at least one per rank")
    bounds = shard_bounds([len(s.input_ids) + len(s.labels) for s in samples], comm.world_size)
    counts = [bounds[r + 1] - bounds[r] for r in range(comm.world_size)]
    return samples[bounds[comm.rank]:bounds[comm.rank + 1]], counts


def _finish(manifest: dict, out: Path) -> dict:
    """Rank 0: mark the run complete and move it into place."""
    partial = temporary_name(out)
    manifest["complete"] = True
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


def _sentinel_masks(samples: Sequence[Sample], config: SwitchConfig,
                    sentinel_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per stack, [tokens] bool: positions holding a sentinel, left out of Hessians (QMoE)."""
    sentinels = torch.tensor(sorted(sentinel_ids), dtype=torch.long)
    masks = {}
    for stack in ("encoder", "decoder"):
        ids = []
        for s in samples:
            seq = list(s.input_ids) if stack == "encoder" else [config.decoder_start_token_id, *s.labels[:-1]]
            ids.extend(seq)
        masks[stack] = torch.isin(torch.tensor(ids, dtype=torch.long), sentinels)
    return masks
