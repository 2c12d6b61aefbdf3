"""The command line's contract, shared by every command: how errors end and how flag values are checked.

Every failure ends in exactly one `error: ...` line on stderr and no traceback (unless
`--debug`): exit 2 when the command line is wrong (a flag's value, a `--model` that names
nothing), 1 for anything else (a corrupt file, an unreachable hub, a full disk). Messages name
flags as the user typed them: the configuration dataclasses name their fields
(`GPTQConfig.damp`), and `user_words` turns those into flags (`--damp`) on the way out.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

import click
from safetensors import SafetensorError

from .errors import QmoeError, UsageError, did_you_mean, os_error_message, os_error_remedy

# Internal `Class.field` names in configuration errors -> the flag that sets the field, per
# command ("*": any). A field no flag sets (a config.json's) keeps its name: the message names
# the file then.
FIELD_FLAGS: dict[str, dict[str, str]] = {
    "GPTQConfig.damp": {"*": "--damp"},
    "GPTQConfig.act_order": {"*": "--act-order"},
    "QuantSpec.bits": {"*": "--bits"},
    "QuantSpec.group_size": {"*": "--grid-group"},
    "RunConfig.group_size": {"*": "--group-size"},
    "DictionarySpec.size": {"*": "--dictionary-size"},
    "DictionarySpec.max_len": {"*": "--max-pairs"},
    "DataSpec.num_samples": {"compress": "--calib-samples", "*": "--samples"},
    "DataSpec.seed": {"*": "--seed"},
    "DataSpec.source": {"compress": "--calib", "*": "--data"},
}
_FIELD = re.compile(r"\b[A-Z]\w*(?:Config|Spec)\.\w+")


def note(message: str) -> None:
    """A line for the user on stderr (stdout is for results)."""
    click.echo(message, err=True)


def user_words(message: str, command: str) -> str:
    """`message` with each configuration field it names replaced by the flag of `command` that
    sets it (`QuantSpec.group_size` -> `--grid-group` in compress)."""
    def flag(match: re.Match[str]) -> str:
        flags = FIELD_FLAGS.get(match.group(0), {})
        return flags.get(command, flags.get("*", match.group(0)))
    return _FIELD.sub(flag, message)


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into the CLI's one-line messages and exit codes."""

    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool, **kwargs: Any) -> Any:
        ctx = click.get_current_context(silent=True)
        name = ctx.info_name if ctx is not None else ""
        try:
            return command(*args, **kwargs)
        except UsageError as exc:  # before QmoeError, its base
            if debug:
                raise
            raise click.UsageError(user_words(str(exc), name), ctx) from None
        except QmoeError as exc:
            if debug:
                raise
            note(f"error: {user_words(str(exc), name)}")
            sys.exit(1)
        except (OSError, SafetensorError) as exc:  # the system said no: a permission, a full disk, ...
            if debug:
                raise
            note(f"error: {os_error_message(exc)}; {os_error_remedy(exc)}")
            sys.exit(1)
        except ValueError as exc:  # configuration dataclasses reject a flag's value
            if debug:
                raise
            raise click.UsageError(user_words(str(exc), name), ctx) from None
        except KeyboardInterrupt:
            note("interrupted")
            sys.exit(130)

    return wrapper


class Main(click.Group):
    """click's own usage errors (bad flags and values) in the style of all other errors: one line
    `error: ...` on stderr, exit 2, instead of click's usage text and `Error:` line. Bare `qmoe`
    prints the whole help, as click groups do (stderr, exit 2)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} -h`)" if isinstance(exc, click.UsageError) and ctx else ""
            note(f"error: {' '.join(exc.format_message().split())}{hint}")
            sys.exit(exc.exit_code)
        except click.Abort:
            note("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class Choice(click.Choice):
    """click.Choice that suggests the closest choice for a typo (`--bits tenary`)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:
            hint = did_you_mean(str(value), [str(c) for c in self.choices])
            raise click.BadParameter(exc.message.rstrip(".") + hint, ctx, param) from None


class Finite(click.FloatRange):
    """A float in a range that is also finite: click.FloatRange lets inf and nan through."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def output_dir(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """`--out` must name a directory to create (`--out ''` is the current directory's path '.')."""
    if value is not None and value.name in ("", ".", ".."):
        raise click.BadParameter(f"{str(value)!r} does not name a new directory; give one, such as ./my-run")
    return value


def threads_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--threads`, the same on every command that computes."""
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads. Default: the cores this process may use (CPU affinity, cgroup quota), "
                             "shared among torchrun's local ranks; OMP_NUM_THREADS when set, "
                             "outside torchrun.")(command)


MODEL_HELP = "A preset (see `qmoe presets`), a hub id, or a checkpoint directory."


def model_option(help: str = MODEL_HELP) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--model` (passed as `model_name`), the same on every command that opens a model."""
    return click.option("--model", "model_name", default="tiny-switch", show_default=True, metavar="NAME|HUB_ID|DIR",
                        help=help)
