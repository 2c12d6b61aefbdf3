"""A tokenizer's chat template: the Jinja text in `tokenizer_config.json` that lays out a
conversation as the model was tuned on it, rendered as transformers' `apply_chat_template` does.

Templates come with downloaded models and are untrusted code, so they render in Jinja's
immutable sandbox (jinja2 >= 3.1.6: older releases have known sandbox escapes), with the
helpers transformers gives them (`raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII text) and its whitespace settings (`trim_blocks`, `lstrip_blocks`), so the rendered
text, and so the tokens, are the ones transformers would give.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import QmoeError

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 writes a template of its own


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template (`source`, Jinja) and the special tokens it may name."""

    source: str
    path: Path  # the file it came from, for messages
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"ChatTemplate.source must be a non-empty Jinja template, got {self.source!r}")

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation `messages` ([{"role": ..., "content": ...}, ...]) as text, ending
        with the assistant's turn opened when `add_generation_prompt`. QmoeError naming the file
        when the template fails (a syntax error, or its own `raise_exception`)."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
                   sort_keys: bool = False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return env.from_string(self.source).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as err:
            raise QmoeError(f"{self.path}: the chat template failed: {err}") from None


def load_chat_template(model_dir: Path) -> ChatTemplate | None:
    """The chat template of a model directory (`chat_template.jinja`, else `chat_template` in
    tokenizer_config.json: a string, or a list of named templates of which "default" is used),
    None when it has none; QmoeError naming the file when it is malformed."""
    model_dir = Path(model_dir)
    config_path = model_dir / TOKENIZER_CONFIG
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise QmoeError(f"{config_path}: not valid JSON ({err}); fix or delete the file") from None
        config = loaded if isinstance(loaded, dict) else {}
    specials = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    template_file = model_dir / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return ChatTemplate(template_file.read_text(encoding="utf-8"), template_file, **specials)
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    if not isinstance(source, str) or not source.strip():
        raise QmoeError(f"{config_path}: chat_template must be a Jinja string (or a list with a 'default' one), "
                        f"got {json.dumps(source)[:80]}")
    return ChatTemplate(source, config_path, **specials)


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
