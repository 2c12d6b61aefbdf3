"""`model.tokenizer`: text to the ids a loaded model takes and back, chat templates, and the
parsing of `qmoe generate`'s prompts, over either tokenizer kind (`data.tokenizer`: a Switch
model's T5 tokenizer or a decoder-only model's tokenizer.json)."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch

from ..arch import Architecture
from ..data.chat import ChatTemplate, load_chat_template
from ..data.tokenizer import CausalTokenizer, Tokenizer, has_tokenizer, load_causal_tokenizer, load_tokenizer
from ..formats.open import OpenModel
from ..run.generate import Prompt, parse_continuation_prompt, parse_prompt

_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")


class QmoeTokenizer:
    """A checkpoint's tokenizer as a loaded model wants its ids: decoder-only, with the special
    tokens its tokenizer.json adds (Mixtral's <s>); Switch, with sentinels written <extra_id_N>
    recognised and the </s> it was trained with at the end (as transformers' T5 tokenizer)."""

    def __init__(self, inner: Tokenizer | CausalTokenizer, arch: Architecture, window: int,
                 chat: ChatTemplate | None):
        self.inner, self.arch, self.chat_template = inner, arch, chat
        spec = arch.generation()
        self.window = spec.max_positions or window
        self.suffix = spec.prompt_suffix
        self.eos_token_ids = spec.eos_tokens
        self.pad_token_id = spec.pad_token
        self.sentinel_ids = inner.sentinel_ids

    @classmethod
    def of(cls, model: OpenModel) -> QmoeTokenizer | None:
        """The tokenizer of an opened checkpoint; None when its directory holds none."""
        if not has_tokenizer(model.tokenizer_dir):
            return None
        causal = model.weights.arch.objective == "causal_lm"
        inner = load_causal_tokenizer(model.tokenizer_dir) if causal else load_tokenizer(model.tokenizer_dir)
        return cls(inner, model.weights.arch, model.window, load_chat_template(model.tokenizer_dir) if causal else None)

    @property
    def encoder_decoder(self) -> bool:
        return self.arch.generation().prompt_stack is not None

    def encode(self, text: str) -> list[int]:
        """The ids of `text` a model's input_ids take (see the class docstring)."""
        if not self.encoder_decoder:
            return self.inner.encode(text)
        ids: list[int] = []
        position = 0
        for found in _SENTINEL_RE.finditer(text):  # SentencePiece does not know <extra_id_N> as text
            number = int(found.group(1))
            if number >= len(self.sentinel_ids):
                raise ValueError(f"{found.group(0)} is beyond the tokenizer's {len(self.sentinel_ids)} sentinels")
            ids += self.inner.encode(text[position:found.start()]) + [self.sentinel_ids[number]]
            position = found.end()
        return ids + self.inner.encode(text[position:]) + list(self.suffix)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False, **_: Any) -> str:
        """Text of `ids` (special tokens kept unless `skip_special_tokens`: EOS and padding left out).
        Other keywords transformers' streamers pass are accepted and ignored."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if skip_special_tokens:
            ids = [i for i in ids if i not in (*self.eos_token_ids, self.pad_token_id)]
        return self.inner.decode(ids)

    def __call__(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """{"input_ids": [B, T] int64, "attention_mask": [B, T] int64} of one text or several,
        padded with the pad id: on the left for decoder-only models (new tokens follow every
        prompt's last), on the right for Switch."""
        rows = [self.encode(t) for t in ([texts] if isinstance(texts, str) else texts)]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for b, row in enumerate(rows):
            where = slice(0, len(row)) if self.encoder_decoder else slice(length - len(row), length)
            ids[b, where], mask[b, where] = torch.tensor(row, dtype=torch.long), 1
        return {"input_ids": ids, "attention_mask": mask}

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        """A conversation laid out by the tokenizer's chat template (as transformers'), as ids or
        (`tokenize=False`) text; ValueError when the tokenizer has no template."""
        if self.chat_template is None:
            raise ValueError(f"{self.inner.path.parent}: the tokenizer has no chat template "
                             "(tokenizer_config.json has no chat_template)")
        text = self.chat_template.render(messages, add_generation_prompt)
        return self.inner.encode(text, add_special_tokens=False) if tokenize else text

    def parse_prompts(self, texts: Sequence[tuple[str, str]], chat: bool = False) -> list[Prompt]:
        """`qmoe generate`'s prompts, (where, text) each: Switch span-filling prompts or
        decoder-only text (`chat`: the user's turn under the chat template). QmoeError naming
        `where` for a bad prompt; ValueError for `chat` where the model cannot take it."""
        vocab = self.arch.config.vocab_size
        if chat and (self.encoder_decoder or self.chat_template is None):
            raise ValueError(f"--chat: {self._no_chat_reason()}; give plain prompts")
        if self.encoder_decoder:
            return [parse_prompt(text, self.inner, where, self.window, vocab, len(self.suffix))
                    for where, text in texts]
        template = self.chat_template if chat else None
        return [parse_continuation_prompt(text, self.inner, where, self.window, vocab, template)
                for where, text in texts]

    def _no_chat_reason(self) -> str:
        if self.encoder_decoder:
            return f"{self.arch.family} fills spans and has no chat template"
        return f"the tokenizer in {self.inner.path.parent} has no chat template (no chat_template in " \
               "tokenizer_config.json)"
