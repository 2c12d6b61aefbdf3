"""The `qmoe` command line: parse flags into config dataclasses, call one library function.

Contract (scripts depend on it): results on stdout (`--json`: exactly one JSON object),
progress and notes on stderr; exit 0 on success, 2 for usage errors (bad flag values), 1 for
anything else, with a one-line `error: ...` message and no traceback unless `--debug`.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from . import __version__
from .errors import QmoeError

DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def note(message: str) -> None:
    """A line for the user on stderr (stdout is for results)."""
    click.echo(message, err=True)


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into the CLI's one-line messages and exit codes."""

    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except QmoeError as exc:
            if debug:
                raise
            note(f"error: {exc}")
            sys.exit(1)
        except ValueError as exc:  # configuration dataclasses reject a flag's value
            if debug:
                raise
            raise click.UsageError(str(exc)) from None
        except KeyboardInterrupt:
            note("interrupted")
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qmoe")
def main() -> None:
    """Compress Mixture-of-Experts models below one bit per expert weight, and run them."""


@main.command("eval")
@click.option("--model", "model_name", required=True, metavar="NAME|HUB_ID|DIR",
              help="A preset (see `qmoe presets`), a hub id, or a checkpoint directory.")
@click.option("--data", "data_sources", multiple=True, metavar="c4|FILE",
              help="Dataset to evaluate on; repeat for several. Default: the model's (c4 for hub models).")
@click.option("--samples", type=click.IntRange(min=1), default=128, show_default=True,
              help="Samples per dataset (fewer if a file has fewer).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the span corruption applied to text data.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Compute dtype; auto: float32 on CPU, the stored dtype (bfloat16 for float32 checkpoints) on GPU.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@handle_errors
def eval_command(model_name: str, data_sources: tuple[str, ...], samples: int, seed: int, device: str,
                 dtype: str, as_json: bool) -> None:
    """Masked-LM loss and perplexity of a model (original, quantized or packed), streamed."""
    from .data import DataSpec, load_samples
    from .evaluate import evaluate, resolve_device, resolve_dtype
    from .models import open_model
    from .runtime import RunConfig
    from .tokenizer import has_tokenizer, load_tokenizer

    run_device = resolve_device(device)
    model = open_model(model_name)
    tokenizer = load_tokenizer(model.tokenizer_dir) if has_tokenizer(model.tokenizer_dir) else None
    sources = data_sources or (model.default_data(),)
    if len(set(sources)) != len(sources):
        raise ValueError(f"--data: each dataset may be given once, got {', '.join(sources)}")
    datasets = []
    for source in sources:
        spec = DataSpec(source=source, split="validation", num_samples=samples, seed=seed, window=model.window)
        data = load_samples(spec, tokenizer, model.weights.config.vocab_size)
        if data.short:
            note(f"note: {data.name} has only {len(data.samples)} usable samples (asked for {samples}); using them all")
        if data.skipped_too_long:
            note(f"note: {data.name}: skipped {data.skipped_too_long} texts longer than the window of {model.window}")
        datasets.append(data)
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"--data: datasets need distinct file names, got {', '.join(names)}")
    run = RunConfig(device=run_device, dtype=resolve_dtype(dtype, model.stored_dtype, run_device),
                    progress=not as_json and sys.stderr.isatty())
    report = evaluate(model.weights, datasets, run)
    if as_json:
        click.echo(json.dumps({"model": model_name, "kind": model.kind, **report.to_json()}))
        return
    click.echo(f"model {model_name} ({model.kind}) on {run.device}, {str(run.dtype).removeprefix('torch.')}")
    click.echo(f"{'dataset':<24} {'samples':>8} {'tokens':>9} {'loss':>8} {'ppl':>10}")
    rows = list(report.datasets.items()) + ([("all", report.overall)] if len(report.datasets) > 1 else [])
    for name, r in rows:
        click.echo(f"{name:<24} {r.samples:>8} {r.tokens:>9} {r.loss:>8.4f} {r.perplexity:>10.3f}")


@main.command("presets")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@handle_errors
def presets_command(as_json: bool) -> None:
    """List the known models (`--model NAME`) and their hub ids."""
    from .config import load_preset, preset_names

    presets = [load_preset(name) for name in preset_names()]
    if as_json:
        click.echo(json.dumps({p.name: {"hub_id": p.hub_id, "description": p.description} for p in presets}))
        return
    for p in presets:
        click.echo(f"{p.name:<18} {p.hub_id:<28} {p.description}")
