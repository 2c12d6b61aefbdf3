"""How `qmoe generate` shows text as it is generated (the command layer's terminal output)."""

from __future__ import annotations

import sys
from typing import Any

import click


class StreamPrinter:
    """`qmoe generate`'s text output, `[i] PROMPT`, `-> TEXT` (and, filling spans, `filled: ...`),
    prompt by prompt in order, the text of the prompt being printed shown as its tokens come.
    Later prompts of the same batch wait until it is done, then show what they have so far.
    Text that may yet turn out to be the start of a stop string is held back until it is known."""

    def __init__(self, prompts: list[Any], stop: tuple[str, ...]):
        self.prompts, self.current, self.shown = prompts, 0, None
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.texts: dict[int, str] = {}
        self.done: dict[int, Any] = {}

    def on_text(self, index: int, text: str) -> None:
        self.texts[index] = text
        self._advance()

    def on_output(self, index: int, output: Any) -> None:
        self.done[index] = output
        self._advance()

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            click.echo(text[len(self.shown):], nl=False)
            sys.stdout.flush()
            self.shown = text

    def _advance(self) -> None:
        while self.current < len(self.prompts):
            i = self.current
            if self.shown is None:
                click.echo(f"[{i + 1}] {self.prompts[i].text}\n    -> ", nl=False)
                self.shown = ""
            if i not in self.done:
                text = self.texts.get(i, "").rstrip().rstrip("\ufffd")  # an incomplete character waits too
                self._show(text[:len(text) - self.hold] if self.hold else text)
                return
            output = self.done.pop(i)
            if not output.text.startswith(self.shown):  # the final text differs from the streamed one
                click.echo("\n    -> ", nl=False)
                self.shown = ""
            self._show(output.text)
            click.echo("" if output.spans is None else f"\n    filled: {output.filled()}")
            self.current, self.shown = i + 1, None
