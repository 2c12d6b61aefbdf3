"""Calibration and evaluation samples: a named dataset or a local file, turned into
(input_ids, labels) pairs.

Switch Transformers are T5-style encoder-decoders pretrained on span corruption, so a sample is
an encoder input with some spans replaced by sentinels and the labels the decoder must produce
(each sentinel followed by the tokens it hid, then EOS). Sources (DESIGN.md, "Data files"):

- `c4`: the English C4 shards the QMoE paper uses, streamed with `datasets` (train shard 0 for
  calibration, validation shard 0 for evaluation), tokenized and span-corrupted;
- `wikitext2`: WikiText-2 (raw), its test split for evaluation and train split for calibration
  (`hub.py`); for span corruption each paragraph row is one text;
- `FILE.jsonl` of `{"text": ...}` lines, or `FILE.txt` with one sample per non-empty line:
  tokenized and span-corrupted with a fixed seed;
- `FILE.jsonl` of `{"input_ids": [...], "labels": [...]}` lines: used exactly as given.

Decoder-only (causal) language models (`DataSpec.objective = "causal_lm"`) read the same
sources without span corruption: a text is tokenized as the model's `tokenizer.json` does it
(special tokens such as BOS included), and a pre-tokenized line is `{"input_ids": [...]}`, used
exactly as given. A sequence of T tokens is the sample (inputs t[:-1], labels t[1:]): every
position but the last predicts the next token, and the loss averages over those T - 1.
WikiText-2 follows the standard perplexity protocol instead: the split tokenized as one text and
cut into window-sized samples (`hub.py`).

Like QMoE, texts whose corrupted input or labels would not fit the model's window are skipped
rather than truncated (the large Switch models were not trained on clipped samples). Files are
streamed line by line and reading stops once `num_samples` samples are collected, so a huge
file is never held in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import QmoeError
from .hub import (
    C4,
    NAMED,
    SPLITS,
    WIKITEXT2,
    WIKITEXT2_JOIN,
    WIKITEXT2_SPLITS,
    article_lines,
    c4_documents,
    consecutive_windows,
    random_windows,
    wikitext2_rows,
)
from .tokenizer import CausalTokenizer, Tokenizer

OBJECTIVES = ("span_corruption", "causal_lm")  # encoder-decoder (T5) samples, or next-token prediction
FILE_SUFFIXES = (".jsonl", ".txt")


@dataclass(frozen=True)
class Sample:
    """One encoder-decoder example.

    input_ids: encoder input ids; labels: the decoder's targets. The decoder input is the
    decoder start token (pad, id 0) followed by labels[:-1]; the model code builds it.
    Both are non-empty tuples of ids >= 0.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("input_ids", "labels"):
            ids = getattr(self, name)
            if not isinstance(ids, tuple) or not ids:
                raise ValueError(f"Sample.{name} must be a non-empty tuple of ids, got {ids!r:.80}")
            if not all(type(i) is int and i >= 0 for i in ids):
                raise ValueError(f"Sample.{name} must hold Python ints >= 0, got {ids!r:.80}")


@dataclass(frozen=True)
class SpanCorruption:
    """T5's span-corruption objective (Raffel et al. 2020, section 3.1.4)."""

    noise_density: float = 0.15  # fraction of tokens dropped from the input: T5's default
    mean_span: float = 3.0  # mean length of a dropped span, in tokens: T5's default

    def __post_init__(self) -> None:
        if not (isinstance(self.noise_density, (int, float)) and 0.0 < self.noise_density < 1.0):
            raise ValueError(f"SpanCorruption.noise_density must be in (0, 1), got {self.noise_density!r}")
        # Below 1 a span would be shorter than a token and there could be more spans than tokens.
        if not (isinstance(self.mean_span, (int, float)) and math.isfinite(self.mean_span)
                and self.mean_span >= 1.0):
            raise ValueError(f"SpanCorruption.mean_span must be a finite number >= 1, got {self.mean_span!r}")


@dataclass(frozen=True)
class DataSpec:
    """Which samples to load: the source, how many, and how to corrupt text.

    `source` is a named dataset ("c4", "wikitext2") or a path to a .jsonl / .txt file (write
    ./c4 for a file named c4). `split` picks the named dataset's part (calibration reads
    "train", evaluation "validation", which for WikiText-2 is its test split); files ignore it.
    `window` is the model's longest input or label sequence, in tokens, and the length of each
    WikiText-2 window of a causal LM.
    """

    source: str
    split: str = "validation"
    num_samples: int | None = None  # None: every sample of a file; required for the named datasets
    seed: int = 0  # seeds span corruption; same seed, same samples
    window: int = 512  # Switch Transformers were trained with 512-token inputs
    corruption: SpanCorruption = field(default_factory=SpanCorruption)
    objective: str = "span_corruption"  # the model's (Architecture.objective)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"DataSpec.source must be one of {', '.join(NAMED)} or a file path, "
                             f"got {self.source!r}")
        if self.split not in SPLITS:
            raise ValueError(f"DataSpec.split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.num_samples is not None and (not _is_int(self.num_samples) or self.num_samples < 1):
            raise ValueError(f"DataSpec.num_samples must be an integer >= 1 or None, got {self.num_samples!r}")
        if self.num_samples is None and self.source in NAMED:
            raise ValueError(f"DataSpec.num_samples must be given for source {self.source!r} (a named dataset "
                             "holds more than a run needs); QMoE calibrates on 128 or more")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"DataSpec.seed must be an integer >= 0, got {self.seed!r}")
        # An input needs at least one token plus EOS.
        if not _is_int(self.window) or self.window < 2:
            raise ValueError(f"DataSpec.window must be an integer >= 2, got {self.window!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"DataSpec.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not isinstance(self.corruption, SpanCorruption):
            raise ValueError(f"DataSpec.corruption must be a SpanCorruption, got {type(self.corruption).__name__}")

    @property
    def name(self) -> str:
        """The dataset's name in reports: "c4", "wikitext2" or the file name."""
        return self.source if self.source in NAMED else Path(self.source).name


@dataclass(frozen=True)
class LoadedData:
    """The samples of one source, with what was left out and why.

    `requested` is DataSpec.num_samples; when the source ran out first, `len(samples)` is
    smaller and `short` is true, so the caller can print a note. Skipped texts are counted:
    `skipped_too_long` did not fit the window once corrupted; `skipped_too_short` were empty or
    under 2 tokens (nothing to corrupt).
    """

    name: str
    samples: tuple[Sample, ...]
    requested: int | None
    skipped_too_long: int = 0
    skipped_too_short: int = 0

    @property
    def short(self) -> bool:
        return self.requested is not None and len(self.samples) < self.requested

    @property
    def label_tokens(self) -> int:
        """Number of label tokens: what a loss over these samples averages over."""
        return sum(len(s.labels) for s in self.samples)


# --- span corruption: pure functions -------------------------------------------------------


def noise_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) T5 uses for a sequence of `length` >= 2 tokens.

    Deterministic in `length`, so the corrupted lengths are known before any randomness is spent.
    Both the noise and the non-noise part get at least one token, and every span at least one
    token. Beyond T5, the span count is clipped to the non-noise token count so that the
    non-noise runs between spans cannot be empty; T5 fails there instead. The clip binds only
    when noise_density is near or above mean_span / (1 + mean_span) (rounding decides on short
    sequences), never at T5's defaults.
    """
    # Python's round() rounds half to even, as tf.round in T5 and np.round in QMoE do.
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span), 1)
    return num_noise, min(num_spans, length - num_noise)


def corrupted_lengths(length: int, corruption: SpanCorruption) -> tuple[int, int]:
    """(input length, label length) of `span_corrupt` on `length` >= 2 tokens, EOS included."""
    num_noise, num_spans = noise_counts(length, corruption.noise_density, corruption.mean_span)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Which of `length` tokens to drop: a `[length]` bool mask, True = noise (T5's algorithm).

    Port of T5's `random_spans_noise_mask`: fix the numbers of noise tokens and spans
    (`noise_counts`), cut the noise tokens into that many non-empty spans and the non-noise
    tokens into as many non-empty runs, uniformly at random, and interleave them starting with
    non-noise. So the mask never starts with noise, always ends with it, and has exactly
    `num_spans` runs of noise. A sequence under 2 tokens has no room for both parts and gets no
    noise (T5 pads it to 2 and truncates the mask, which gives the same). T5's optional
    `random_roll` is not ported: neither T5's defaults nor QMoE use it.
    """
    if length < 2:
        return np.zeros(length, dtype=bool)
    num_noise, num_spans = noise_counts(length, noise_density, mean_span)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)  # [num_spans] int64
    keep_lengths = _random_segmentation(length - num_noise, num_spans, rng)  # [num_spans] int64
    run_lengths = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)  # keep, noise, keep, ...
    run_is_noise = np.tile(np.array([False, True]), num_spans)
    return np.repeat(run_is_noise, run_lengths)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of `num_items` into `num_segments` non-empty parts.

    Choose the segment starts among the `num_items - 1` gaps without replacement, as T5 does by
    shuffling a 0/1 vector. Returns `[num_segments]` int64 summing to `num_items`.
    """
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def span_corrupt(tokens: Sequence[int], tokenizer: Tokenizer, corruption: SpanCorruption,
                 rng: np.random.Generator) -> Sample:
    """T5 span corruption of `tokens` (ids without EOS).

    inputs: the kept tokens, each noise span replaced by one sentinel (`<extra_id_0>`,
    `<extra_id_1>`, ... in order), then EOS. labels: each sentinel followed by the tokens its
    span hid, then EOS. E.g. `a b c d e` with `b c` and `e` dropped gives inputs
    `a <0> d <1> </s>` and labels `<0> b c <1> e </s>`.
    Raises QmoeError when the text needs more spans than the tokenizer has sentinels.
    """
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("span_corrupt needs at least one token")
    if len(tokens) >= 2:
        _, num_spans = noise_counts(len(tokens), corruption.noise_density, corruption.mean_span)
        if num_spans > len(tokenizer.sentinel_ids):
            raise QmoeError(
                f"a text of {len(tokens)} tokens needs {num_spans} noise spans but the tokenizer "
                f"({tokenizer.path}) has only {len(tokenizer.sentinel_ids)} sentinel tokens; "
                f"use a smaller window or a larger mean span")
    mask = random_spans_noise_mask(len(tokens), corruption.noise_density, corruption.mean_span, rng)
    inputs: list[int] = []
    labels: list[int] = []
    span = -1
    for i, (token, is_noise) in enumerate(zip(tokens, mask)):
        if not is_noise:
            inputs.append(token)
            continue
        if i == 0 or not mask[i - 1]:  # first token of a span
            span += 1
            inputs.append(tokenizer.sentinel_ids[span])
            labels.append(tokenizer.sentinel_ids[span])
        labels.append(token)
    inputs.append(tokenizer.eos_id)
    labels.append(tokenizer.eos_id)
    return Sample(input_ids=tuple(inputs), labels=tuple(labels))


# --- loading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Text:
    where: str  # "FILE line N" / "C4 document N", for messages
    text: str


@dataclass(frozen=True)
class _Tokens:
    where: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...] | None  # None: a causal LM line, `{"input_ids": [...]}` alone


def load_samples(spec: DataSpec, tokenizer: Tokenizer | CausalTokenizer | None,
                 vocab_size: int | None = None) -> LoadedData:
    """Load up to `spec.num_samples` samples from `spec.source`, in source order.

    `tokenizer` may be None for pre-tokenized data (a text sample is then an error);
    `vocab_size` bounds pre-tokenized ids (default: the tokenizer's vocabulary).

    Deterministic for a given `spec.seed`: one numpy Generator seeded from it is consumed by
    the text samples in order (skipped texts consume none). Raises QmoeError for a missing or
    malformed file, a pre-tokenized sample longer than the window or with ids outside the
    vocab, a source with no usable sample, or a named dataset that cannot be downloaded. A
    source with fewer samples than requested is not an error: see `LoadedData.short`.
    """
    if tokenizer is None and vocab_size is None:
        raise ValueError("load_samples needs a tokenizer or a vocab_size to check ids against")
    records = _records(spec, tokenizer)
    with contextlib.closing(records):  # closes the file (or C4 stream) when we stop early
        samples, too_long, too_short = _collect(records, spec, tokenizer, vocab_size)
    if not samples:
        counts = f"{too_short} empty or under 2 tokens, {too_long} too long once span-corrupted"
        raise QmoeError(
            f"{spec.source}: no usable samples ({counts if too_short or too_long else 'no data'}); "
            f"give texts of at least 2 tokens that fit the {spec.window}-token window once "
            f"span-corrupted, or pre-tokenized samples")
    return LoadedData(name=spec.name, samples=tuple(samples), requested=spec.num_samples,
                      skipped_too_long=too_long, skipped_too_short=too_short)


def _collect(records: Iterable[_Text | _Tokens], spec: DataSpec, tokenizer: Tokenizer | CausalTokenizer | None,
             vocab_size: int | None) -> tuple[list[Sample], int, int]:
    """(samples, skipped too long, skipped too short) from `records`, stopping at num_samples."""
    rng = np.random.default_rng(spec.seed)
    samples: list[Sample] = []
    too_long = too_short = 0
    for record in records:
        if isinstance(record, _Tokens):
            bound = vocab_size if vocab_size is not None else tokenizer.vocab_size
            samples.append(_checked_sample(record, bound, spec.window) if spec.objective == "span_corruption"
                           else _causal_sample(record, bound, spec.window))
        elif tokenizer is None:
            raise _no_tokenizer(record.where)
        else:
            tokens = tokenizer.encode(record.text) if record.text.strip() else []
            if len(tokens) < 2:
                too_short += 1
                continue
            if spec.objective == "causal_lm":
                if len(tokens) > spec.window:
                    too_long += 1
                else:
                    samples.append(Sample(input_ids=tuple(tokens[:-1]), labels=tuple(tokens[1:])))
            elif max(corrupted_lengths(len(tokens), spec.corruption)) > spec.window:
                too_long += 1
                continue
            else:
                try:
                    samples.append(span_corrupt(tokens, tokenizer, spec.corruption, rng))
                except QmoeError as err:
                    raise QmoeError(f"{record.where}: {err}") from None
        if spec.num_samples is not None and len(samples) >= spec.num_samples:
            break  # before reading another line: stop streaming as soon as we have enough
    return samples, too_long, too_short


def _no_tokenizer(where: str) -> QmoeError:
    return QmoeError(f"{where}: holds text but the model has no tokenizer (tokenizer.json or spiece.model); "
                     "add the model's tokenizer files or give pre-tokenized data")


def _causal_sample(record: _Tokens, vocab_size: int, window: int) -> Sample:
    """A causal LM's pre-tokenized sequence t as given: inputs t[:-1], labels t[1:]."""
    ids = record.input_ids
    if record.labels is not None:
        raise QmoeError(f"{record.where}: has labels, but a causal LM sample is {{\"input_ids\": [...]}} alone "
                        f"(each token is predicted from the ones before it); drop \"labels\"")
    if len(ids) < 2:
        raise QmoeError(f"{record.where}: input_ids has {len(ids)} token(s); a causal LM sample needs at least 2 "
                        f"(one to read, one to predict)")
    _check_ids(record.where, "input_ids", ids, vocab_size, window)
    return Sample(input_ids=ids[:-1], labels=ids[1:])


def _checked_sample(record: _Tokens, vocab_size: int, window: int) -> Sample:
    """The pre-tokenized sample exactly as given, once its ids and lengths are checked."""
    if record.labels is None:
        raise QmoeError(f"{record.where}: has input_ids but no labels; a pre-tokenized sample needs both")
    for name in ("input_ids", "labels"):
        ids = getattr(record, name)
        if not ids:
            raise QmoeError(f"{record.where}: {name} is empty; every sample needs at least one "
                            f"input and one label token (end labels with EOS, id 1 for T5)")
        _check_ids(record.where, name, ids, vocab_size, window)
    return Sample(input_ids=record.input_ids, labels=record.labels)


def _check_ids(where: str, name: str, ids: Sequence[int], vocab_size: int, window: int) -> None:
    """A pre-tokenized sequence must fit the model's window and vocabulary (QmoeError naming it)."""
    if len(ids) > window:
        raise QmoeError(f"{where}: {name} has {len(ids)} tokens, the model's window is {window}; "
                        f"shorten or drop the sample")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise QmoeError(f"{where}: {name} holds id {bad}, outside the model's vocabulary "
                        f"[0, {vocab_size}); tokenize with the model's own tokenizer")


def _records(spec: DataSpec, tokenizer: Tokenizer | CausalTokenizer | None) -> Iterator[_Text | _Tokens]:
    """The records of `spec.source`, in order: a generator, so nothing is read before the first."""
    if spec.source == C4:
        yield from (_Text(where, text) for where, text in c4_documents(spec.split))
    elif spec.source == WIKITEXT2:
        yield from _wikitext2_records(spec, tokenizer)
    else:
        yield from _file_records(Path(spec.source))


def _wikitext2_records(spec: DataSpec, tokenizer: Tokenizer | CausalTokenizer | None) -> Iterator[_Text | _Tokens]:
    """WikiText-2 as samples: its paragraph rows as texts for span corruption; for a causal LM the
    standard protocol's windows (`hub.py`), consecutive for evaluation, random (seeded by
    `spec.seed`) for calibration. Memory: the split's text and its tokenization, which
    `tokenizers` holds whole for a moment (~580 bytes a token: measured 1.45 GB at the peak for
    2.5 M tokens, the size of the train split; the test split is about an eighth of that). One
    pass over the joined text is what the protocol defines: tokenizers that add a prefix space
    or BOS would cut pieces differently."""
    rows = wikitext2_rows(spec.split)
    name = f"WikiText-2 {WIKITEXT2_SPLITS[spec.split]}"
    if spec.objective == "span_corruption":
        yield from (_Text(f"{name} row {number}", text) for number, text in article_lines(rows))
        return
    if tokenizer is None:
        raise _no_tokenizer(name)
    ids = tokenizer.encode(WIKITEXT2_JOIN.join(rows))  # once: windows cut across rows and articles
    windows = (consecutive_windows(len(ids), spec.window) if spec.split == "validation"
               else random_windows(len(ids), spec.window, spec.num_samples, spec.seed))
    if not windows:
        raise QmoeError(f"{name}: {len(ids)} tokens, fewer than one window of {spec.window}")
    for number, (start, end) in enumerate(windows, start=1):
        yield _Tokens(f"{name} window {number} (tokens {start}..{end - 1})", tuple(ids[start:end]), None)


def _file_records(path: Path) -> Iterator[_Text | _Tokens]:
    """The samples of a .jsonl or .txt file, streamed line by line (blank lines skipped)."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise QmoeError(f"{path}: unknown data file type {path.suffix or '(no extension)'!r}; use .jsonl "
                        f"({{\"text\": ...}} or {{\"input_ids\": [...], \"labels\": [...]}} per line) "
                        f"or .txt (one sample per line), or a named dataset ({', '.join(NAMED)})")
    if path.is_dir():
        raise QmoeError(f"{path}: is a directory; give a .jsonl or .txt file")
    try:
        handle = path.open("rb")  # bytes: a decoding error can then name its exact line
    except FileNotFoundError:
        raise QmoeError(f"{path}: data file not found; check the path, or use a named dataset "
                        f"({', '.join(NAMED)})") from None
    except OSError as err:
        raise QmoeError(f"{path}: cannot open data file ({err.strerror})") from None
    with handle:
        lines = _numbered_lines(path, handle)
        if suffix == ".txt":
            yield from (_Text(f"{path} line {n}", line.rstrip("\r\n")) for n, line in lines)
        else:
            yield from _jsonl_records(path, lines)


def _numbered_lines(path: Path, handle: Iterable[bytes]) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) for each non-blank line of a binary file."""
    for number, raw in enumerate(handle, start=1):
        try:
            # utf-8-sig on line 1 drops the byte-order mark some editors write.
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise QmoeError(f"{path} line {number}: not UTF-8 text; re-encode the file as UTF-8") from None
        if line.strip():
            yield number, line


def _jsonl_records(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[_Text | _Tokens]:
    """Parse JSONL lines into text or pre-tokenized records; one kind per file."""
    first_kind: tuple[type, int] | None = None  # (kind, line number of the first record)
    for number, line in lines:
        where = f"{path} line {number}"
        record = _jsonl_record(where, line)
        if first_kind is None:
            first_kind = (type(record), number)
        elif type(record) is not first_kind[0]:
            kinds = {_Text: "text", _Tokens: "pre-tokenized"}
            raise QmoeError(f"{where}: a {kinds[type(record)]} sample in a file whose first sample "
                            f"(line {first_kind[1]}) is {kinds[first_kind[0]]}; use one kind per file")
        yield record


def _jsonl_record(where: str, line: str) -> _Text | _Tokens:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        # json's own messages may end in "at" ("Invalid control character at"): drop it, we say where
        reason = err.msg.removesuffix(" at")
        raise QmoeError(f"{where}: not valid JSON ({reason} at column {err.colno}); the file must be "
                        f"JSONL, one JSON object per line") from None
    if not isinstance(obj, dict):
        raise QmoeError(f"{where}: expected a JSON object, got a {type(obj).__name__}; write "
                        f"{{\"text\": ...}} or {{\"input_ids\": [...], \"labels\": [...]}}")
    if "input_ids" in obj or "labels" in obj:
        if "input_ids" not in obj:
            raise QmoeError(f"{where}: has labels but no input_ids; a pre-tokenized sample needs both")
        labels = _ids(where, "labels", obj["labels"]) if "labels" in obj else None
        return _Tokens(where, _ids(where, "input_ids", obj["input_ids"]), labels)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise QmoeError(f"{where}: \"text\" must be a string, got {type(obj['text']).__name__}")
        return _Text(where, obj["text"])
    raise QmoeError(f"{where}: the object has neither \"text\" nor \"input_ids\" + \"labels\" "
                    f"(keys: {', '.join(sorted(obj)) or 'none'}); write one of the two forms")


def _ids(where: str, name: str, value: object) -> tuple[int, ...]:
    # bool is an int subclass in Python; JSON true is never a token id.
    if not isinstance(value, list) or not all(type(i) is int and i >= 0 for i in value):
        raise QmoeError(f"{where}: {name} must be a list of integer token ids >= 0, got {json.dumps(value)[:60]}")
    return tuple(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
