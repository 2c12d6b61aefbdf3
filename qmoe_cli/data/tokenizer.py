"""The T5-family tokenizer of a model directory, behind one small interface.

Switch Transformer checkpoints ship either a Hugging Face `tokenizer.json` (a `tokenizers`
pipeline) or a SentencePiece `spiece.model`, or both. The rest of the package needs only a
handful of things from either: text -> ids without special tokens (span corruption adds EOS
itself), ids -> text for debugging, the ids of `</s>`, `<pad>`, `<unk>`, and the sentinels
`<extra_id_0>`, `<extra_id_1>`, ... that T5 span corruption puts in place of the dropped spans.

Sentinel ids follow Hugging Face's `T5Tokenizer`: a `tokenizer.json` lists them in its vocab
(usually as added tokens); a bare `spiece.model` does not hold them, and T5 appends `extra_ids`
(default 100) ids after the SentencePiece vocab in reverse order, so `<extra_id_0>` is the last
id (sp_vocab_size + 99) and `<extra_id_99>` is sp_vocab_size. The T5 vocab is 32000 pieces, so
`<extra_id_0>` = 32099 for every Switch checkpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece
import tokenizers

from ..errors import QmoeError

TOKENIZER_JSON = "tokenizer.json"
SPIECE_MODEL = "spiece.model"
TOKENIZER_CONFIG = "tokenizer_config.json"

EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"  # also T5's decoder start token
UNK_TOKEN = "<unk>"
DEFAULT_EXTRA_IDS = 100  # T5Tokenizer's default `extra_ids`

_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")

Backend = tokenizers.Tokenizer | sentencepiece.SentencePieceProcessor


def sentinel_token(index: int) -> str:
    """The text of sentinel number `index`: `<extra_id_{index}>` (T5 convention)."""
    return f"<extra_id_{index}>"


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer: a `tokenizers` or SentencePiece backend plus T5's special ids.

    All ids lie in [0, vocab_size). `sentinel_ids[i]` is the id of `<extra_id_i>`; there is at
    least one. `vocab_size` counts every id the tokenizer can produce or name (added tokens and
    appended sentinels included); a model's embedding may have more rows (switch: 32128 > 32100).
    """

    path: Path  # the file it was read from (tokenizer.json or spiece.model)
    eos_id: int
    pad_id: int
    unk_id: int
    vocab_size: int
    sentinel_ids: tuple[int, ...]
    backend: Backend = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, (tokenizers.Tokenizer, sentencepiece.SentencePieceProcessor)):
            raise ValueError(
                f"Tokenizer.backend must be a tokenizers.Tokenizer or a SentencePieceProcessor, "
                f"got {type(self.backend).__name__}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"Tokenizer.vocab_size must be a positive integer, got {self.vocab_size!r}")
        for name in ("eos_id", "pad_id", "unk_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"Tokenizer.{name} must be an id in [0, {self.vocab_size}), got {value!r}")
        if not self.sentinel_ids:
            raise ValueError("Tokenizer.sentinel_ids must hold at least one id (<extra_id_0>)")
        bad = [i for i in self.sentinel_ids if not isinstance(i, int) or not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Tokenizer.sentinel_ids must be ids in [0, {self.vocab_size}), got {bad[:5]}")
        if len(set(self.sentinel_ids)) != len(self.sentinel_ids):
            raise ValueError("Tokenizer.sentinel_ids must be distinct")
        clash = set(self.sentinel_ids) & {self.eos_id, self.pad_id, self.unk_id}
        if clash:
            raise ValueError(f"Tokenizer.sentinel_ids must not include eos/pad/unk ids, got {sorted(clash)}")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added (in particular no trailing EOS).

        The SentencePiece backend does not recognise `<extra_id_N>` written in the text (it
        encodes the characters); `tokenizer.json` does, as Hugging Face does.
        """
        if isinstance(self.backend, tokenizers.Tokenizer):
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.backend.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens and sentinels kept visible (meant for reading samples)."""
        ids = [int(i) for i in ids]
        if isinstance(self.backend, tokenizers.Tokenizer):
            return self.backend.decode(ids, skip_special_tokens=False)
        return _decode_sentencepiece(self.backend, ids, self.sentinel_ids)


def _decode_sentencepiece(sp: sentencepiece.SentencePieceProcessor, ids: list[int],
                          sentinel_ids: tuple[int, ...]) -> str:
    """Decode with sentinels written as `<extra_id_N>`, even when they lie past the sp vocab.

    SentencePiece cannot decode the ids T5 appends after its vocab, so runs of ordinary ids are
    decoded by SentencePiece and the sentinels spliced in between.
    """
    sentinel_index = {sid: i for i, sid in enumerate(sentinel_ids)}
    pieces: list[str] = []
    run: list[int] = []
    for token in ids:
        if token in sentinel_index:
            if run:
                pieces.append(sp.decode(run))
                run = []
            pieces.append(sentinel_token(sentinel_index[token]))
        elif 0 <= token < sp.get_piece_size():
            run.append(token)
        else:
            raise ValueError(f"cannot decode id {token}: not in the SentencePiece vocab "
                             f"({sp.get_piece_size()} pieces) and not a sentinel")
    if run:
        pieces.append(sp.decode(run))
    return " ".join(piece for piece in pieces if piece)


def has_tokenizer(model_dir: Path) -> bool:
    """Whether `model_dir` holds tokenizer files (they may still be unreadable)."""
    return any((Path(model_dir) / name).is_file() for name in (TOKENIZER_JSON, SPIECE_MODEL))


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer of `model_dir`: `tokenizer.json` when present, else `spiece.model`.

    Raises QmoeError when neither file exists, when the file cannot be read, or when it lacks
    `</s>`, `<pad>`, `<unk>` or any `<extra_id_N>` sentinel.
    """
    model_dir = Path(model_dir)
    if (model_dir / TOKENIZER_JSON).is_file():
        return _load_tokenizer_json(model_dir / TOKENIZER_JSON)
    if (model_dir / SPIECE_MODEL).is_file():
        return _load_sentencepiece(model_dir / SPIECE_MODEL, _extra_ids(model_dir / TOKENIZER_CONFIG))
    raise QmoeError(
        f"{model_dir}: no tokenizer found (looked for {TOKENIZER_JSON} and {SPIECE_MODEL}); "
        f"copy the model's tokenizer files into the directory")


@dataclass(frozen=True)
class CausalTokenizer:
    """A decoder-only model's `tokenizer.json`: text -> ids as the model was trained on them,
    with the special tokens its post-processor adds (Mixtral's `<s>`; Qwen adds none). Causal
    LMs need no EOS, pad or sentinel ids, so none are required."""

    path: Path
    vocab_size: int
    backend: tokenizers.Tokenizer = field(repr=False, compare=False)
    sentinel_ids: tuple[int, ...] = ()  # no span corruption, so no positions to leave out of Hessians

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; without the post-processor's special tokens for text that already holds
        them (a rendered chat template writes its own <s>)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` as the tokenizer's decoder writes it, special tokens kept visible."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def load_causal_tokenizer(model_dir: Path) -> CausalTokenizer:
    """The `tokenizer.json` of a decoder-only model in `model_dir`; QmoeError when missing or unreadable."""
    path = Path(model_dir) / TOKENIZER_JSON
    if not path.is_file():
        raise QmoeError(f"{model_dir}: no {TOKENIZER_JSON}; copy the model's tokenizer files into the directory")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for every parse failure
        raise QmoeError(f"{path}: not a valid tokenizers file ({_first_line(err)}); "
                        f"re-download the model's tokenizer.json") from None
    return CausalTokenizer(path, backend.get_vocab_size(with_added_tokens=True), backend)


def _load_tokenizer_json(path: Path) -> Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for every parse failure
        raise QmoeError(f"{path}: not a valid tokenizers file ({_first_line(err)}); "
                        f"re-download the model's tokenizer.json") from None
    vocab = backend.get_vocab(with_added_tokens=True)  # token -> id
    return Tokenizer(
        path=path,
        eos_id=_required_id(path, EOS_TOKEN, vocab.get),
        pad_id=_required_id(path, PAD_TOKEN, vocab.get),
        unk_id=_required_id(path, UNK_TOKEN, vocab.get),
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        sentinel_ids=_sentinels_in_vocab(path, vocab),
        backend=backend,
    )


def _load_sentencepiece(path: Path, extra_ids: int) -> Tokenizer:
    backend = sentencepiece.SentencePieceProcessor()
    try:
        backend.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise QmoeError(f"{path}: not a valid SentencePiece model ({_first_line(err)}); "
                        f"re-download the model's spiece.model") from None
    size = backend.get_piece_size()
    pieces = {backend.id_to_piece(i): i for i in range(size)}
    sentinels = _sentinels_in_vocab(path, pieces, required=False)
    vocab_size = size
    if not sentinels:
        # T5Tokenizer appends the sentinels after the sp vocab, highest index first.
        sentinels = tuple(size + extra_ids - 1 - i for i in range(extra_ids))
        vocab_size = size + extra_ids
    if not sentinels:
        raise QmoeError(
            f"{path}: no <extra_id_N> sentinel tokens: the model has none and "
            f"{path.parent / TOKENIZER_CONFIG} sets extra_ids to 0; span corruption needs them, "
            f"so remove that setting or pass pre-tokenized data")
    return Tokenizer(
        path=path,
        eos_id=_required_id(path, EOS_TOKEN, pieces.get),
        pad_id=_required_id(path, PAD_TOKEN, pieces.get),
        unk_id=_required_id(path, UNK_TOKEN, pieces.get),
        vocab_size=vocab_size,
        sentinel_ids=sentinels,
        backend=backend,
    )


def _required_id(path: Path, token: str, lookup: Callable[[str], int | None]) -> int:
    token_id = lookup(token)
    if token_id is None:
        raise QmoeError(f"{path}: has no {token} token, which T5-family models need; "
                        f"use the tokenizer that came with the model")
    return token_id


def _sentinels_in_vocab(path: Path, vocab: dict[str, int], required: bool = True) -> tuple[int, ...]:
    """Ids of `<extra_id_0>`, `<extra_id_1>`, ... found in `vocab`, numbered without gaps."""
    numbers = sorted(int(m.group(1)) for token in vocab if (m := _SENTINEL_RE.fullmatch(token)))
    if not numbers:
        if required:
            raise QmoeError(f"{path}: has no <extra_id_N> sentinel tokens, which T5 span corruption "
                            f"needs; use the tokenizer that came with the model or pre-tokenized data")
        return ()
    missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
    if missing:
        raise QmoeError(f"{path}: sentinel tokens must be numbered <extra_id_0> .. <extra_id_N> without "
                        f"gaps, but {sentinel_token(missing[0])} is missing while "
                        f"{sentinel_token(numbers[-1])} exists; use the tokenizer that came with the model")
    return tuple(vocab[sentinel_token(i)] for i in range(len(numbers)))


def _extra_ids(config_path: Path) -> int:
    """`extra_ids` from tokenizer_config.json (T5Tokenizer's setting), else 100."""
    if not config_path.is_file():
        return DEFAULT_EXTRA_IDS
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QmoeError(f"{config_path}: not valid JSON ({err}); fix or delete the file") from None
    value = config.get("extra_ids", DEFAULT_EXTRA_IDS) if isinstance(config, dict) else DEFAULT_EXTRA_IDS
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise QmoeError(f"{config_path}: extra_ids must be an integer >= 0, got {value!r}; "
                        f"T5 models use 100")
    return value


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
