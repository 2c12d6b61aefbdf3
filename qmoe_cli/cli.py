"""The `qmoe` command line: parse flags into config dataclasses, call one library function.

Contract (scripts depend on it): results on stdout (`--json`: exactly one JSON object),
progress and notes on stderr; exit 0 on success, 2 for usage errors (bad flag values), 1 for
anything else, with a one-line `error: ...` message and no traceback unless `--debug`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .cli_contract import (
    MODEL_HELP,
    Choice,
    Finite,
    Main,
    handle_errors,
    model_option,
    note,
    output_dir,
    threads_option,
)
from .errors import QmoeError
from .files import check_output_dir

DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _use_threads(threads: int | None) -> int:
    """Set torch's CPU threads (`--threads`, or the default of `qmoe_cli.threads`); returns the number."""
    import torch

    from .threads import default_threads

    chosen = threads or default_threads()
    torch.set_num_threads(chosen)
    return chosen


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qmoe")
def main() -> None:
    """Compress Mixture-of-Experts models below one bit per expert weight, and run them."""


@main.command("eval")
@model_option()
@click.option("--data", "data_sources", multiple=True, metavar="c4|wikitext2|FILE",
              help="Dataset to evaluate on (wikitext2: its test split); repeat for several. "
                   "Default: the model's (c4 for hub models).")
@click.option("--samples", type=click.IntRange(min=1), default=128, show_default=True,
              help="Samples per dataset (fewer if a file has fewer).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the span corruption applied to text data.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--dtype", type=Choice(DTYPES), default="auto", show_default=True,
              help="Compute dtype; auto: float32 on CPU, the stored dtype (bfloat16 for float32 checkpoints) on GPU.")
@click.option("--tasks", default=None, metavar="TASK,...",
              help="Run lm-evaluation-harness tasks (e.g. arc_easy,hellaswag) instead; needs `pip install qmoe[eval]`.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="With --tasks: examples per task.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None, help="With --tasks: few-shot examples.")
@click.option("--include-path", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="With --tasks: a directory of extra lm-eval task YAML files.")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@handle_errors
def eval_command(model_name: str, data_sources: tuple[str, ...], samples: int, seed: int, device: str,
                 dtype: str, tasks: str | None, limit: int | None, num_fewshot: int | None,
                 include_path: Path | None, threads: int | None, as_json: bool) -> None:
    """Loss and perplexity of a model (original, quantized or packed), streamed: masked-LM
    (span corruption) for Switch, next-token for decoder-only models; or lm-eval --tasks."""
    from .api import evaluate

    threads = _use_threads(threads)
    if tasks is not None:
        from .execute.device import resolve_device

        _harness(model_name, tasks, limit, num_fewshot, include_path, resolve_device(device), dtype, as_json)
        return
    result = evaluate(model_name, data_sources, samples=samples, seed=seed, device=device, dtype=dtype,
                      progress=not as_json and sys.stderr.isatty(), log=note)
    report = result.report
    if as_json:
        click.echo(json.dumps({"model": model_name, "kind": result.kind, **report.to_json(), "threads": threads}))
        return
    click.echo(f"model {model_name} ({result.kind}) on {result.device} ({threads} CPU thread{'s' if threads != 1 else ''}), "
               f"{str(result.dtype).removeprefix('torch.')}")
    click.echo(f"{'dataset':<24} {'samples':>8} {'tokens':>9} {'loss':>8} {'ppl':>10}")
    rows = list(report.datasets.items()) + ([("all", report.overall)] if len(report.datasets) > 1 else [])
    for name, r in rows:
        click.echo(f"{name:<24} {r.samples:>8} {r.tokens:>9} {r.loss:>8.4f} {r.perplexity:>10.3f}")


def _harness(model_name: str, tasks: str, limit: int | None, num_fewshot: int | None, include_path: Path | None,
             run_device: Any, dtype: str, as_json: bool) -> None:
    """`qmoe eval --tasks`: lm-eval's table, or with --json its results object."""
    from .execute.device import resolve_dtype
    from .formats.open import open_model
    from .run.stream import RunConfig

    try:
        from .run import harness
    except ImportError:
        raise QmoeError("--tasks needs lm-evaluation-harness, which is not installed: pip install 'qmoe[eval]' "
                        "(or pip install lm-eval)") from None
    cfg = harness.HarnessConfig(tuple(t.strip() for t in tasks.split(",")), limit, num_fewshot,
                                None if include_path is None else str(include_path))
    model = open_model(model_name)
    run = RunConfig(device=run_device, dtype=resolve_dtype(dtype, model.stored_dtype, run_device), progress=False)
    results = harness.run_tasks(model, run, cfg)
    if as_json:
        keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
        click.echo(json.dumps({"model": model_name, "kind": model.kind,
                               **{k: results[k] for k in keep if k in results}}, default=str))
    else:
        click.echo(harness.results_table(results))


@main.command("generate")
@model_option(MODEL_HELP.removesuffix(".") + " (original, quantized, packed).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="A prompt: text to continue (decoder-only models), or text with spans to fill marked "
                   "<extra_id_0>, <extra_id_1>, ... (Switch); repeat for several.")
@click.option("--input", "input_file", type=click.Path(path_type=Path), default=None, metavar="FILE.jsonl",
              help='Prompts, one JSON object a line: {"prompt": TEXT} (or "text").')
@click.option("--chat", is_flag=True,
              help="Each prompt is a user's message, laid out by the tokenizer's chat template (decoder-only models).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most tokens generated per prompt.")
@click.option("--greedy", is_flag=True, help="Most likely token each step (the default without --temperature).")
@click.option("--temperature", type=Finite(min=0, min_open=True), default=None,
              help="Sample at this temperature instead of greedy.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample from the K most likely tokens (all).")
@click.option("--top-p", type=Finite(min=0, max=1, min_open=True), default=None,
              help="Sample from the smallest set of tokens with this mass (1.0).")
@click.option("--repetition-penalty", type=Finite(min=0, min_open=True), default=None,
              help="Make tokens already seen less likely, as transformers' (1.0: none; 1.1-1.3 usual).")
@click.option("--stop", "stop", multiple=True, metavar="STRING",
              help="End a sequence once its text holds STRING (cut before it); repeatable.")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the sampler (0).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Prompts decoded together.")
@click.option("--device", "devices", multiple=True, metavar="DEVICE",
              help=DEVICE_HELP + "; cuda takes every visible GPU; repeat cuda:N for a chosen set. Default: auto.")
@click.option("--max-memory", "max_memory", multiple=True, metavar="SIZE",
              help="Cap on what each GPU holds (70GiB, 80GB): one for all, or one per GPU. "
                   "The rest streams from host memory.")
@click.option("--dtype", type=Choice(DTYPES), default="auto", show_default=True,
              help="Compute dtype; auto: float32 on CPU, the stored dtype (bfloat16 for float32 checkpoints) on GPU.")
@threads_option
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object on stdout (else the text is printed as it is generated).")
@handle_errors
def generate_command(model_name: str, prompts: tuple[str, ...], input_file: Path | None, chat: bool,
                     max_new_tokens: int, greedy: bool, temperature: float | None, top_k: int | None,
                     top_p: float | None, repetition_penalty: float | None, stop: tuple[str, ...], seed: int | None,
                     batch_size: int, devices: tuple[str, ...], max_memory: tuple[str, ...], dtype: str,
                     threads: int | None, as_json: bool) -> None:
    """Continue text prompts (decoder-only models) or fill the marked spans of prompts (T5 span
    filling), with a model of any kind, on CPU or GPUs. Timing goes to stderr (and --json)."""
    from .api import CacheReserve, check_room, open_checkpoint, resolve_devices
    from .cli_output import StreamPrinter
    from .data.prompts import read_prompts
    from .run.generate import GenerateConfig
    from .run.placement import parse_bytes
    from .run.timing import GenerationStats

    if bool(prompts) == (input_file is not None):
        raise ValueError("give prompts with --prompt TEXT (repeatable) or --input FILE.jsonl, not both or neither")
    if greedy and temperature is not None:
        raise ValueError("--greedy and --temperature exclude each other")
    if temperature is None and (top_p is not None or top_k is not None or seed is not None):
        raise ValueError("--top-p, --top-k and --seed apply to sampling; give --temperature too")
    _use_threads(threads)
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=1.0 if top_p is None else top_p, top_k=top_k,
                         repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
                         stop=stop, seed=seed or 0, batch_size=batch_size)
    caps = [parse_bytes(m) for m in max_memory]
    run_devices = resolve_devices(devices)
    if caps and run_devices[0].type != "cuda":
        raise ValueError("--max-memory caps GPUs; it does not apply to --device cpu")
    texts = [(f"--prompt {i + 1}", t) for i, t in enumerate(prompts)] or read_prompts(input_file)
    checkpoint = open_checkpoint(model_name)
    tokenizer = checkpoint.require_tokenizer()
    parsed = tokenizer.parse_prompts(texts, chat=chat)
    longest = max(len(p.ids) for p in parsed)
    check_room(checkpoint.opened.weights.arch.generation(), longest, max_new_tokens, "--max-new-tokens")
    reserve = CacheReserve(min(batch_size, len(parsed)), longest + len(tokenizer.suffix), max_new_tokens)
    model = checkpoint.load(run_devices, dtype, caps, reserve, log=note)
    stats = GenerationStats()
    printer = None if as_json else StreamPrinter(parsed, cfg.stop)
    outputs = model.generate_text(parsed, cfg, streamer=printer, stats=stats)
    note(stats.describe())
    if as_json:
        click.echo(json.dumps({"model": model_name, "kind": model.kind, "outputs": [o.to_json() for o in outputs],
                               "timing": stats.to_json()}))


@main.command("compress")
@model_option()
@click.option("--bits", type=Choice(["ternary", "2", "3", "4", "8"]), default="ternary", show_default=True,
              help="Expert weight grid: ternary {min, 0, max} per row, or b-bit min-max per row.")
@click.option("--method", type=Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="gptq, or round-to-nearest on the same grid (the baseline).")
@click.option("--calib", "calib_source", metavar="c4|wikitext2|FILE",
              help="Calibration data (the named sets' train splits). Default: the model's (c4 for hub models).")
@click.option("--calib-samples", type=click.IntRange(min=1), default=128, show_default=True,
              help="Calibration samples (a file with fewer is used whole, with a note).")
@click.option("--group-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Experts quantized per batched call.")
@click.option("--damp", type=Finite(min=0), default=0.1, show_default=True,
              help="Hessian dampening, fraction of its mean diagonal.")
@click.option("--act-order", is_flag=True, help="GPTQ columns by descending Hessian diagonal.")
@click.option("--grid-group", type=click.IntRange(min=1), default=None,
              help="Columns per grid (default: one grid per row).")
@click.option("--symmetric", is_flag=True,
              help="Grids centred on 0 (zero point 2^(b-1), ternary {-a, 0, a}), as transformers loads exports.")
@click.option("--token-cap", type=Finite(min=0, min_open=True), default=4.0, show_default=True,
              help="Hessian tokens per expert capped at this multiple of the mean.")
@click.option("--shared-experts", type=Choice(["quantize", "keep"]), default="quantize", show_default=True,
              help="Shared experts (Qwen2-MoE, DeepSeek): quantized like routed ones, or kept as stored.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Span-corruption seed; also picks wikitext2's calibration windows.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, callback=output_dir,
              help="Output directory (default: ./NAME-METHOD-BITS[-sym]). Never overwritten.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same settings into --out.")
@click.option("--pack", "then_pack", is_flag=True, help="Then pack the result into OUT-packed (see `qmoe pack`).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--distributed", is_flag=True,
              help="Run as one rank of a torchrun job (detected without this flag; with it, no torchrun is an error).")
@click.option("--dist-timeout", type=Finite(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds a rank waits for the others in one collective before the job fails.")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout.")
@handle_errors
def compress_command(model_name: str, bits: str, method: str, calib_source: str | None, calib_samples: int,
                     group_size: int, damp: float, act_order: bool, grid_group: int | None, symmetric: bool,
                     token_cap: float, shared_experts: str, seed: int, out_dir: Path | None, resume: bool,
                     then_pack: bool, device: str, distributed: bool, dist_timeout: float, threads: int | None,
                     as_json: bool) -> None:
    """Quantize every expert with batched GPTQ, streaming the model block by block.

    Under torchrun (`torchrun --nproc-per-node N -m qmoe_cli compress ...`) each process is one
    rank: calibration samples are sharded, the experts of each group are split across ranks, and
    rank 0 writes the checkpoint.
    """
    from .api import compress
    from .compress.config import CompressConfig
    from .formats.info import checkpoint_info

    cfg = CompressConfig(bits=bits, method=method, group_size=group_size, damp=damp, act_order=act_order,
                         grid_group=grid_group, symmetric=symmetric, token_cap=token_cap, shared_experts=shared_experts)
    threads = _use_threads(threads)
    result = compress(model_name, cfg, calib=calib_source, calib_samples=calib_samples, seed=seed, out=out_dir,
                      resume=resume, then_pack=then_pack, device=device, distributed=distributed,
                      dist_timeout=dist_timeout, progress=sys.stderr.isatty(), log=note)
    if result.manifest is None:
        return  # rank 0 reports (and packs)
    manifest, out = result.manifest, result.out
    summary = {"out": str(out), "calibration_loss": manifest["calibration_loss"], "settings": manifest["settings"],
               "fallbacks": sum(b["fallbacks"] for b in manifest["blocks"].values()), "blocks": manifest["blocks"]}
    summary.update(world_size=result.world_size, communicated_bytes=result.communicated_bytes,
                   threads=threads)  # rank 0's
    if result.packed is not None:
        summary["packed"] = checkpoint_info(result.packed)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"wrote {out} (calibration loss {manifest['calibration_loss']:.4f}, "
                   f"{summary['fallbacks']} fallbacks); evaluate with: qmoe eval --model {out}")
        if result.packed is not None:
            _echo_packed(result.packed, summary["packed"])


@main.command("pack")
@click.argument("source", type=click.Path(path_type=Path), metavar="QUANTIZED_DIR")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, callback=output_dir,
              help="Output directory (default: QUANTIZED_DIR-packed). Never overwritten.")
@click.option("--dictionary-size", type=int, default=1 << 16, show_default=True,
              help="Codewords (at most 65536: 16-bit indices).")
@click.option("--max-pairs", type=int, default=14, show_default=True,
              help="Longest codeword, in pairs of weights (14 = 28 weights, what the kernel expects).")
@click.option("--sample-matrices", type=int, default=64, show_default=True,
              help="Expert matrices (spread over all blocks) whose symbols fit the dictionary; 0: every one.")
@threads_option
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (as `qmoe info --json`, plus `threads` and `throughput`) on stdout.")
@handle_errors
def pack_command(source: Path, out_dir: Path | None, dictionary_size: int, max_pairs: int, sample_matrices: int,
                 threads: int | None, as_json: bool) -> None:
    """Entropy-code a quantized checkpoint (ternary: dictionary code; b-bit: bit-packed)."""
    from .api import pack
    from .compress.pack import PackConfig
    from .formats.info import checkpoint_info

    cfg = PackConfig(dictionary_size=dictionary_size, max_pairs=max_pairs, sample_matrices=sample_matrices,
                     progress=sys.stderr.isatty())
    threads = _use_threads(threads)
    out, result = pack(source, out_dir, cfg, note)
    info = {**checkpoint_info(out), "throughput": result.throughput()}
    if as_json:
        click.echo(json.dumps({**info, "threads": threads}))
    else:
        _echo_packed(out, info)


def _echo_packed(out: Path, info: dict[str, Any]) -> None:
    click.echo(f"wrote {out}: {info['bits_per_weight_codes']:.4f} bits per expert weight "
               f"({info['bits_per_weight_all_in']:.4f} all-in), {info['total_bytes'] / 1e6:.2f} MB; "
               f"evaluate with: qmoe eval --model {out}")


@main.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path), metavar="CHECKPOINT")
@click.option("--format", "fmt", type=Choice(["hf", "compressed-tensors"]), required=True,
              help="hf: dequantized Hugging Face checkpoint; compressed-tensors: packed b-bit experts.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, callback=output_dir,
              help="Output directory (written under a temporary name, never overwritten).")
@click.option("--config", "config", type=click.Path(path_type=Path), default=None, metavar="FILE|DIR",
              help="The source model's config.json, if its source is not on this machine.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout.")
@handle_errors
def export_command(checkpoint: Path, fmt: str, out_dir: Path, config: Path | None, as_json: bool) -> None:
    """Write CHECKPOINT (original, quantized or packed) as a checkpoint transformers loads."""
    from .api import silent
    from .export.writer import ExportConfig, export

    check_output_dir(out_dir, "--out")  # before anything is read
    summary = export(checkpoint, out_dir, ExportConfig(fmt, config), note if sys.stderr.isatty() else silent)
    for line in summary["notes"]:
        note(f"note: {line}")
    click.echo(json.dumps(summary) if as_json else f"wrote {out_dir} ({fmt}, {summary['shards']} shards)")


@main.command("info")
@click.argument("directory", type=click.Path(path_type=Path), metavar="DIR")
@click.option("--verify", is_flag=True, help="Also check every file's checksum and validate every expert matrix.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@handle_errors
def info_command(directory: Path, verify: bool, as_json: bool) -> None:
    """Kind, source, size of a checkpoint (original, quantized or packed); for a compressed one its
    settings and bits per expert weight."""
    from .formats.info import checkpoint_info, info_lines

    info = checkpoint_info(directory, verify)
    click.echo(json.dumps(info) if as_json else "\n".join(info_lines(info, verify)))


@main.command("build-kernels")
@click.option("--verbose", is_flag=True, help="Show the compiler's command lines and output.")
@handle_errors
def build_kernels_command(verbose: bool) -> None:
    """Compile the CUDA decode-matmul kernels ahead of time (needs nvcc and a CUDA torch, not a GPU)."""
    from .kernels import build_kernels

    build = build_kernels(verbose)  # says on stderr when it compiles (minutes, once per version)
    click.echo(f"built {build.library} with nvcc {build.nvcc} for sm_{', sm_'.join(build.archs)} "
               f"(+ compute_{build.ptx} PTX) in {build.seconds:.1f} s")


@main.command("presets")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@handle_errors
def presets_command(as_json: bool) -> None:
    """List the known models (`--model NAME`) and their hub ids."""
    from .arch.presets import load_preset, preset_names

    presets = [load_preset(name) for name in preset_names()]
    if as_json:
        click.echo(json.dumps({p.name: {"hub_id": p.hub_id, "description": p.description} for p in presets}))
        return
    for p in presets:
        click.echo(f"{p.name:<18} {p.hub_id:<28} {p.description}")
