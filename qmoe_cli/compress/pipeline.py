"""`qmoe compress`: streamed, batched GPTQ over expert groups, written as a quantized checkpoint.

The model runs block by block over the calibration list buffer (`runtime.py`); `compress_block`
plugs into every sparse block: route all tokens once, then for each group of `group_size`
experts gather each expert's calibration tokens (at most `token_cap` x the mean per expert,
sentinel positions excluded as in the paper), build Hessians, quantize `wi` and then `wo` (its
Hessian from the *quantized* `wi`'s activations) in one batched call each, and run all the
expert's tokens through the quantized expert so the next block is calibrated on what the
compressed model computes. A block's shared expert (families with one) is quantized the same way
from every token, unless `shared_experts` is "keep".

Distributed (`torchrun`): every rank loads the same calibration data and keeps a contiguous
shard of the samples; dense parts run locally on each shard, sparse blocks cooperate through
`compress_block`, and rank 0 alone reads and writes the output directory, telling the others
what it found. One process is the world-size-1 case of the same code.

Memory: as the runtime (one block + one expert group + the buffers), plus the Hessians of one
group: group_size x (d_model^2 + d_ff^2) fp32, and one matrix's fp64 sums while they are built.

Crash safety and --resume: the run writes into `.{out}.partial`; non-expert weights are copied
first, then each sparse block's codes land in their own files and the manifest lists the block
as finished, with the size and sha256 of every file written so far (and its own checksum). A
resumed run (with any number of ranks) recomputes hidden states through finished blocks from
their saved codes (bit-identical to what the first run propagated) and continues;
the finished directory is renamed into place only when complete. Rank 0 holds an exclusive lock
on `out` (`locks.output_lock`) from before it looks at the partial run until the rename, so two
runs never write one directory; a failed write (a full disk) keeps the partial run resumable.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError

from ..arch import Architecture
from ..data.datasets import LoadedData, Sample
from ..errors import QmoeError, os_error_message, os_error_remedy
from ..files import save_tensors_atomic, temporary_name
from ..formats.card import manifest_facts, write_card
from ..formats.hf import COMPANION_FILES
from ..formats.integrity import file_record
from ..formats.open import OpenModel
from ..formats.quantized import HEAD_FILE, block_file
from ..formats.quantized_manifest import check_manifest, new_manifest, read_manifest, write_manifest
from ..locks import output_lock
from ..run.stream import RunConfig, streamed_losses
from .block import ExpertCompressor
from .config import CompressConfig
from .distributed import Comm, shard_bounds


def fingerprint(model: OpenModel, calib: LoadedData, cfg: CompressConfig) -> str:
    """Hash of everything that determines the output: settings, model config, calibration."""
    h, arch = hashlib.sha256(), model.weights.arch
    h.update(json.dumps({"settings": cfg.settings_of(arch), "config": arch.config.to_dict(),
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
    with ExitStack() as held:  # rank 0 holds the lock on `out` until the run is renamed into place
        try:
            manifest = comm.on_root(lambda: _open_partial(model, cfg, out, resume, digest, log, held),
                                    "starting the run")
            arch = model.weights.arch
            hook = ExpertCompressor(cfg, arch, model.weights.tensor, temporary_name(out),
                                    _sentinel_masks(samples, arch, sentinel_ids), manifest, log, comm)
            loss_sum, tokens = streamed_losses(model.weights, [s.input_ids for s in samples],
                                               [s.labels for s in samples], run, sparse_hook=hook)
            hook.close()
            # Per-sample losses in global sample order, so the sum is the one a single process takes.
            loss_sum = comm.gather_rows(loss_sum.to(comm.device), counts, "calibration losses").cpu()  # [samples] fp64
            tokens = comm.gather_rows(tokens.to(comm.device), counts, "calibration losses").cpu()  # [samples] int64
            manifest["calibration_loss"] = float(loss_sum.sum() / tokens.sum())
            return comm.on_root(lambda: _finish(manifest, out), "finishing the run")
        except (OSError, SafetensorError) as exc:
            partial = temporary_name(out)
            if comm.rank != 0 or not (partial / "manifest.json").is_file():
                raise
            # Disk full (or any failed write): what is finished stays, and --resume continues from it.
            raise QmoeError(f"{partial}: {os_error_message(exc)}; the run so far is kept there: "
                            f"{os_error_remedy(exc)}, then continue it with "
                            f"`qmoe compress ... --out {out} --resume`") from exc


def _check_same_run(digest: str, comm: Comm) -> None:
    """Every rank must compress the same thing: compare fingerprints with rank 0's."""
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=comm.device)
    everyone = comm.all_gather(mine, "comparing settings").cpu()  # [W, 32]
    for r in range(1, comm.world_size):
        if not torch.equal(everyone[r], everyone[0]):
            raise QmoeError(f"rank {r}: its model, settings or calibration data differ from rank 0's; every rank "
                            "must be given the same --model, --calib, --calib-samples and --seed")


def _open_partial(model: OpenModel, cfg: CompressConfig, out: Path, resume: bool, digest: str,
                  log: Callable[[str], None], held: ExitStack) -> dict:
    """Rank 0: the manifest of the partial run to continue, or of a new one (set up now); `held`
    keeps the lock on `out` that makes this process its only writer."""
    held.enter_context(output_lock(out, "qmoe compress"))
    if out.exists():
        if resume and (out / "manifest.json").is_file() and read_manifest(out).get("fingerprint") == digest:
            raise QmoeError(f"--resume: {out} is already complete, nothing to resume; pack it with "
                            f"`qmoe pack {out}` or evaluate it with `qmoe eval --model {out}`")
        raise QmoeError(f"--out {out}: already exists; choose another directory or remove it")
    partial = temporary_name(out)
    if resume and not (partial / "manifest.json").is_file():  # job scripts may always pass --resume
        log(f"note: --resume: {out} has no interrupted run to continue; starting a new one")
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
    try:
        check_manifest(manifest, partial / "manifest.json")
    except QmoeError as exc:
        raise QmoeError(f"--resume: {exc}; remove {partial} to start over") from None
    for stale in partial.rglob("*.tmp"):  # being written when the run died; never listed in the manifest
        stale.unlink()
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
    card = write_card(partial, manifest_facts(manifest))  # checksummed like every other file
    manifest["files"][card.name] = file_record(card)
    write_manifest(partial, manifest)
    partial.rename(out)
    return manifest


def _start(model: OpenModel, cfg: CompressConfig, digest: str, partial: Path) -> dict:
    """Create the partial directory: manifest, config, tokenizer, non-expert weights."""
    partial.mkdir(parents=True)
    arch = model.weights.arch
    manifest = new_manifest(model.label, model.window, cfg.settings_of(arch), arch.config.to_dict(), digest)
    for name in COMPANION_FILES:
        if (model.tokenizer_dir / name).is_file():
            shutil.copyfile(model.tokenizer_dir / name, partial / name)
    head = sorted({model.weights.stored_name(n) for n in arch.head_tensors()})  # each stored matrix once
    save_tensors_atomic({n: model.weights.tensor(n, None, torch.device("cpu")) for n in head}, partial / HEAD_FILE)
    for stack in arch.stacks:
        for i in range(arch.num_blocks(stack)):
            with torch.device("meta"):  # a quantized shared expert goes to its own file (`ExpertCompressor`)
                names = list(arch.block(stack, i, _NoExperts(cfg.shared_experts == "quantize")).state_dict())
            prefix = arch.block_prefix(stack, i)
            tensors = {prefix + n: model.weights.tensor(prefix + n, None, torch.device("cpu")) for n in names}
            save_tensors_atomic(tensors, partial / block_file(stack, i))
    manifest["files"] = {str(p.relative_to(partial)): file_record(p) for p in sorted(partial.rglob("*")) if p.is_file()}
    write_manifest(partial, manifest)
    return manifest


class _NoExperts:
    """Stands in for a bank when only a block's non-expert parameter names are wanted."""

    num_experts = 0

    def __init__(self, stores_shared: bool):
        self.stores_shared = stores_shared


def _sentinel_masks(samples: Sequence[Sample], arch: Architecture,
                    sentinel_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per stack, [tokens] bool: positions holding a sentinel, left out of Hessians (QMoE)."""
    sentinels = torch.tensor(sorted(sentinel_ids), dtype=torch.long)
    tokens = arch.stack_tokens([s.input_ids for s in samples], [s.labels for s in samples])
    return {stack: torch.isin(torch.tensor([t for seq in tokens[stack] for t in seq], dtype=torch.long), sentinels)
            for stack in arch.stacks}
