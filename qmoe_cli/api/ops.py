"""`compress`, `pack` and `evaluate`: the library calls behind `qmoe compress`, `qmoe pack` and
`qmoe eval`, with the settings of their flags (the config dataclasses `CompressConfig`,
`PackConfig`, `RunConfig`). They print nothing: notes go to `log` (default: dropped)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..compress.config import CompressConfig
from ..compress.pack import PackConfig, PackResult
from ..data.datasets import DataSpec, LoadedData, load_samples
from ..data.tokenizer import has_tokenizer, load_causal_tokenizer, load_tokenizer
from ..errors import QmoeError, UsageError, did_you_mean
from ..execute.device import resolve_device, resolve_dtype
from ..files import check_output_dir
from ..formats.open import OpenModel, open_model
from ..run.evaluate import EvalReport
from ..run.stream import RunConfig

Log = Callable[[str], None]


def silent(message: str) -> None:
    """The default log: the library prints nothing."""


def open_with_data(model_name: str, sources: Sequence[str], samples: int, seed: int, split: str, calib: bool,
                   log: Log = silent) -> tuple[OpenModel, Any, list[LoadedData]]:
    """Open the model, its tokenizer (None when it has none) and the datasets to run (default:
    the model's own); `calib` picks the calibration defaults and names `--calib` in errors."""
    flag = "--calib" if calib else "--data"
    for source in sources:  # before the model is opened: a typo must not cost a download
        check_data_source(source, flag)
    model = open_model(model_name)
    objective = model.weights.arch.objective
    load = load_causal_tokenizer if objective == "causal_lm" else load_tokenizer
    tokenizer = load(model.tokenizer_dir) if has_tokenizer(model.tokenizer_dir) else None
    sources = tuple(sources) or ((model.default_calib if calib else model.default_data),)
    if len(set(sources)) != len(sources):
        raise ValueError(f"{flag}: each dataset may be given once, got {', '.join(sources)}")
    datasets = []
    for source in sources:
        spec = DataSpec(source=source, split=split, num_samples=samples, seed=seed, window=model.window,
                        objective=objective)
        data = load_samples(spec, tokenizer, model.weights.arch.config.vocab_size)
        if data.short:
            log(f"note: {data.name} has only {len(data.samples)} usable samples (asked for {samples}); using them all")
        if data.skipped_too_long:
            log(f"note: {data.name}: skipped {data.skipped_too_long} texts longer than the window of {model.window}")
        datasets.append(data)
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"{flag}: datasets need distinct file names, got {', '.join(names)}")
    return model, tokenizer, datasets


def check_data_source(source: str, flag: str) -> None:
    """UsageError unless `source` is a named dataset or an existing path (what it holds is
    checked when it is read)."""
    from ..data.hub import NAMED

    if source not in NAMED and not Path(source).expanduser().exists():
        raise UsageError(f"{flag} {source}: no such file, and not a named dataset ({', '.join(NAMED)})"
                         f"{did_you_mean(source, NAMED)}")


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` measured, and on what."""

    kind: str  # the checkpoint's: "original" | "quantized" | "packed"
    device: torch.device
    dtype: torch.dtype
    report: EvalReport


def evaluate(model: str | Path, data: Sequence[str] = (), *, samples: int = 128, seed: int = 0,
             device: str = "auto", dtype: str = "auto", progress: bool = False, log: Log = silent) -> Evaluation:
    """Loss and perplexity of a model (any checkpoint kind) on each dataset (c4, wikitext2 or a
    file; default: the model's), streamed block by block: `qmoe eval`."""
    run_device = resolve_device(device)
    opened, _, datasets = open_with_data(str(model), data, samples, seed, "validation", calib=False, log=log)
    from ..run.evaluate import evaluate as run_evaluate

    run = RunConfig(device=run_device, dtype=resolve_dtype(dtype, opened.stored_dtype, run_device), progress=progress)
    return Evaluation(opened.kind, run.device, run.dtype, run_evaluate(opened.weights, datasets, run))


def pack(quantized: str | Path, out: str | Path | None = None, config: PackConfig | None = None,
         log: Log = silent) -> tuple[Path, PackResult]:
    """Entropy-code a quantized checkpoint into `out` (default: QUANTIZED-packed): `qmoe pack`.
    Returns the packed directory and the run's figures."""
    from ..compress.pack import pack as run_pack

    source = Path(quantized)
    source = source.resolve() if source.name in ("", "..") else source  # `qmoe pack .`: a name for -packed
    target = Path(out) if out is not None else source.with_name(source.name + "-packed")
    check_output_dir(target, "--out")
    return target, run_pack(source, target, config or PackConfig(), log)


@dataclass(frozen=True)
class Compression:
    """What `compress` wrote (on rank 0; other ranks of a torchrun job get `manifest` None)."""

    out: Path
    manifest: dict | None
    rank: int
    world_size: int
    communicated_bytes: int
    packed: Path | None = None


def compress(model: str | Path, config: CompressConfig | None = None, *, calib: str | None = None,
             calib_samples: int = 128, seed: int = 0, out: str | Path | None = None, resume: bool = False,
             then_pack: bool = False, device: str = "auto", distributed: bool = False, dist_timeout: float = 600.0,
             progress: bool = False, log: Log = silent) -> Compression:
    """Quantize every expert (batched GPTQ or RTN, `config`), streaming the model block by block
    into `out` (default: ./NAME-METHOD-BITS, or NAME-METHOD-BITS-sym for symmetric grids), then,
    with `then_pack`, pack it into OUT-packed: `qmoe compress`. Under torchrun each process is one
    rank (see `compress.distributed`)."""
    from ..compress.distributed import DistConfig, process_group
    from ..compress.pipeline import compress as run_compress

    config = config or CompressConfig()
    default = f"{Path(str(model)).name}-{config.method}-{config.bits}" + ("-sym" if config.symmetric else "")
    target = Path(out) if out is not None else Path(default)
    packed_out = target.with_name(target.name + "-packed")
    check_output_dir(target, "--out")  # before the model is read: a run must not fail at its end
    with process_group(DistConfig(timeout_s=dist_timeout), resolve_device(device), distributed) as comm:
        opened, tokenizer, datasets = open_with_data(str(model), (calib,) if calib else (), calib_samples, seed,
                                                     "train", calib=True, log=log)
        if then_pack and packed_out.exists():  # fail before hours of compression, not after
            raise QmoeError(f"--pack: {packed_out} already exists; choose another --out or remove it")
        run = RunConfig(device=comm.device, dtype=resolve_dtype("auto", opened.stored_dtype, comm.device),
                        group_size=config.group_size, progress=progress and comm.rank == 0)
        sentinels = tokenizer.sentinel_ids if tokenizer else ()
        manifest = run_compress(opened, datasets[0], config, target, run, resume, sentinels,
                                log if comm.rank == 0 else silent, comm)
        rank, world, traffic = comm.rank, comm.world_size, comm.traffic
    if rank != 0:
        return Compression(target, None, rank, world, traffic)
    if then_pack:
        try:
            pack(target, packed_out, PackConfig(progress=progress), log)
        except KeyboardInterrupt:
            log(f"note: {target} is complete; pack it with `qmoe pack {target} --out {packed_out}`")
            raise
    return Compression(target, manifest, rank, world, traffic, packed_out if then_pack else None)
