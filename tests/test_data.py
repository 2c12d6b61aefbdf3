"""qmoe_cli.data.datasets: T5 noise mask, span corruption, file, C4 and WikiText-2 loading with their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from conftest import TINY_WORDS, fake_hub_datasets, tiny_sentences, wikitext_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from qmoe_cli.data.datasets import (
    DataSpec,
    LoadedData,
    Sample,
    SpanCorruption,
    corrupted_lengths,
    load_samples,
    noise_counts,
    random_spans_noise_mask,
    span_corrupt,
)
from qmoe_cli.data.hub import consecutive_windows, random_windows
from qmoe_cli.data.tokenizer import CausalTokenizer, Tokenizer, load_causal_tokenizer
from qmoe_cli.errors import QmoeError

# --- noise mask -----------------------------------------------------------------------------


def _runs(mask: np.ndarray) -> int:
    """Number of maximal runs of True in a bool mask."""
    padded = np.concatenate([[False], mask])
    return int(np.sum(padded[1:] & ~padded[:-1]))


@settings(max_examples=200, deadline=None)
@given(length=st.integers(2, 2000), density=st.floats(0.01, 0.6), mean_span=st.floats(1.0, 10.0),
       seed=st.integers(0, 2**32 - 1))
def test_noise_mask_properties(length: int, density: float, mean_span: float, seed: int) -> None:
    mask = random_spans_noise_mask(length, density, mean_span, np.random.default_rng(seed))
    num_noise, num_spans = noise_counts(length, density, mean_span)
    assert mask.dtype == bool and mask.shape == (length,)
    assert int(mask.sum()) == num_noise == min(max(round(length * density), 1), length - 1)
    assert not mask[0] and mask[-1]  # starts with kept tokens, ends with noise (T5)
    assert _runs(mask) == num_spans
    # T5's span count, clipped (beyond T5) so that no kept run between spans is empty.
    assert num_spans == min(max(round(num_noise / mean_span), 1), length - num_noise)


def test_noise_mask_t5_numbers() -> None:
    # T5 defaults on 512 tokens: 77 noise tokens in 26 spans.
    mask = random_spans_noise_mask(512, 0.15, 3.0, np.random.default_rng(0))
    assert mask.sum() == 77 and _runs(mask) == 26
    assert corrupted_lengths(512, SpanCorruption()) == (512 - 77 + 26 + 1, 77 + 26 + 1)
    # At T5's defaults the clip never binds: every length gets T5's own span count.
    for length in range(2, 5000):
        num_noise, num_spans = noise_counts(length, 0.15, 3.0)
        assert num_spans == max(round(num_noise / 3.0), 1)
    # Too short for noise and non-noise: no noise, as T5's pad-to-2-and-truncate gives.
    assert random_spans_noise_mask(1, 0.15, 3.0, np.random.default_rng(0)).tolist() == [False]
    assert random_spans_noise_mask(0, 0.15, 3.0, np.random.default_rng(0)).shape == (0,)


def test_noise_mask_high_density_clips_spans() -> None:
    mask = random_spans_noise_mask(10, 0.9, 1.0, np.random.default_rng(3))
    assert mask.sum() == 9 and _runs(mask) == 1 and not mask[0]


def test_noise_mask_spans_are_random_and_seeded() -> None:
    masks = {tuple(random_spans_noise_mask(100, 0.15, 3.0, np.random.default_rng(s))) for s in range(20)}
    assert len(masks) > 15
    a = random_spans_noise_mask(100, 0.15, 3.0, np.random.default_rng(7))
    b = random_spans_noise_mask(100, 0.15, 3.0, np.random.default_rng(7))
    assert np.array_equal(a, b)


# --- span corruption -------------------------------------------------------------------------


def _reconstruct(sample: Sample, tokenizer: Tokenizer) -> list[int]:
    """The original tokens, from inputs with each sentinel replaced by its span from labels."""
    assert sample.input_ids[-1] == tokenizer.eos_id and sample.labels[-1] == tokenizer.eos_id
    spans: dict[int, list[int]] = {}
    current = None
    for token in sample.labels[:-1]:
        if token in tokenizer.sentinel_ids:
            current = token
            spans[current] = []
        else:
            assert current is not None, "labels must start with a sentinel"
            spans[current].append(token)
    out: list[int] = []
    for token in sample.input_ids[:-1]:
        out.extend(spans.pop(token) if token in tokenizer.sentinel_ids else [token])
    assert not spans
    return out


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(st.integers(3, 32), min_size=2, max_size=150),  # 3..32: word ids, no sentinels
       seed=st.integers(0, 10**6))
def test_span_corrupt_reconstructs(tiny_tokenizer: Tokenizer, tokens: list[int], seed: int) -> None:
    sample = span_corrupt(tokens, tiny_tokenizer, SpanCorruption(), np.random.default_rng(seed))
    assert _reconstruct(sample, tiny_tokenizer) == tokens
    num_noise, num_spans = noise_counts(len(tokens), 0.15, 3.0)
    sentinels_in = [t for t in sample.input_ids if t in tiny_tokenizer.sentinel_ids]
    assert sentinels_in == list(tiny_tokenizer.sentinel_ids[:num_spans])  # <extra_id_0>, 1, ... in order
    assert (len(sample.input_ids), len(sample.labels)) == corrupted_lengths(len(tokens), SpanCorruption())


def test_span_corrupt_example(tiny_tokenizer: Tokenizer) -> None:
    tokens = list(range(10, 30))
    sample = span_corrupt(tokens, tiny_tokenizer, SpanCorruption(0.15, 3.0), np.random.default_rng(0))
    s0 = tiny_tokenizer.sentinel_ids[0]
    # 20 tokens: 3 noise tokens in 1 span.
    assert sample.labels[0] == s0 and len(sample.labels) == 1 + 3 + 1
    start = sample.input_ids.index(s0)
    assert sample.labels[1:4] == tuple(tokens[start:start + 3])
    assert sample.input_ids == tuple(tokens[:start]) + (s0,) + tuple(tokens[start + 3:]) + (1,)


def test_span_corrupt_too_many_spans(tiny_tokenizer: Tokenizer) -> None:
    # 300 tokens -> 45 noise tokens in 15 spans, but the tiny tokenizer has 10 sentinels.
    with pytest.raises(QmoeError, match=r"300 tokens needs 15 noise spans.*only 10 sentinel tokens"):
        span_corrupt(list(range(3, 303)), tiny_tokenizer, SpanCorruption(), np.random.default_rng(0))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"noise_density must be in \(0, 1\), got 1.5"):
        SpanCorruption(noise_density=1.5)
    with pytest.raises(ValueError, match=r"mean_span must be a finite number >= 1, got 0.5"):
        SpanCorruption(mean_span=0.5)
    with pytest.raises(ValueError, match=r"num_samples must be an integer >= 1 or None, got 0"):
        DataSpec("x.txt", num_samples=0)
    with pytest.raises(ValueError, match=r"window must be an integer >= 2, got 1"):
        DataSpec("x.txt", window=1)
    with pytest.raises(ValueError, match=r"split must be one of train, validation, got 'test'"):
        DataSpec("x.txt", split="test")
    with pytest.raises(ValueError, match=r"num_samples must be given for source 'c4'"):
        DataSpec("c4")
    with pytest.raises(ValueError, match=r"num_samples must be given for source 'wikitext2'"):
        DataSpec("wikitext2", split="train", objective="causal_lm")
    with pytest.raises(ValueError, match=r"Sample.labels must be a non-empty tuple"):
        Sample((1,), ())
    assert DataSpec("c4", num_samples=4).name == "c4"
    assert DataSpec("wikitext2", num_samples=4).name == "wikitext2"
    assert DataSpec("/some/dir/eval.jsonl").name == "eval.jsonl"


# --- loading files ---------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_text_jsonl_is_deterministic(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    # ~40 tokens each: 2+ noise spans, so where they fall depends on the seed (with a single
    # span T5's mask always puts it at the end).
    texts = [" ".join(tiny_sentences(5, seed=i)) for i in range(30)]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    a = load_samples(DataSpec(str(path), seed=3), tiny_tokenizer)
    b = load_samples(DataSpec(str(path), seed=3), tiny_tokenizer)
    c = load_samples(DataSpec(str(path), seed=4), tiny_tokenizer)
    assert isinstance(a, LoadedData) and a.name == "d.jsonl"
    assert a == b and a.samples != c.samples
    assert len(a.samples) == 30 and not a.short and a.requested is None
    for text, sample in zip(texts, a.samples):
        assert _reconstruct(sample, tiny_tokenizer) == tiny_tokenizer.encode(text)
    assert a.label_tokens == sum(len(s.labels) for s in a.samples)


def test_txt_one_sample_per_nonempty_line(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    texts = tiny_sentences(6, seed=6)
    path = tmp_path / "d.txt"
    path.write_text(texts[0] + "\n\n   \n" + "\r\n".join(texts[1:]) + "\nfox\n")
    data = load_samples(DataSpec(str(path)), tiny_tokenizer)
    assert [_reconstruct(s, tiny_tokenizer) for s in data.samples] == [tiny_tokenizer.encode(t) for t in texts]
    assert data.skipped_too_short == 1  # "fox": a single token, nothing to corrupt


def test_txt_matches_text_jsonl(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    texts = tiny_sentences(10, seed=8)
    (tmp_path / "d.txt").write_text("\n".join(texts))
    _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    a = load_samples(DataSpec(str(tmp_path / "d.txt"), seed=1), tiny_tokenizer)
    b = load_samples(DataSpec(str(tmp_path / "d.jsonl"), seed=1), tiny_tokenizer)
    assert a.samples == b.samples


def test_window_skips_long_texts(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    short, long = "the cat sat on the mat", " ".join(["the big red barn"] * 10)  # 6 and 40 tokens
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": short}, {"text": long}, {"text": ""}, {"text": short}])
    data = load_samples(DataSpec(str(path), window=16), tiny_tokenizer)
    assert len(data.samples) == 2 and data.skipped_too_long == 1 and data.skipped_too_short == 1
    assert all(len(s.input_ids) <= 16 and len(s.labels) <= 16 for s in data.samples)


def test_num_samples_stops_reading(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    texts = tiny_sentences(5, seed=9)
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts] + ["this line is not json"])
    data = load_samples(DataSpec(str(path), num_samples=5), tiny_tokenizer)
    assert len(data.samples) == 5 and not data.short
    prefix = load_samples(DataSpec(str(path), num_samples=3), tiny_tokenizer)
    assert prefix.samples == data.samples[:3]  # a prefix: the rng is consumed in sample order


def test_fewer_samples_than_requested_is_a_note(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in tiny_sentences(3)])
    data = load_samples(DataSpec(str(path), num_samples=10), tiny_tokenizer)
    assert len(data.samples) == 3 and data.requested == 10 and data.short


def test_pretokenized_used_exactly(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    rows = [{"input_ids": [5, 6, 7, 1], "labels": [12, 9, 1]}, {"input_ids": [4], "labels": [3, 3], "text": "x"}]
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    data = load_samples(DataSpec(str(path), window=4), tiny_tokenizer)
    assert data.samples == (Sample((5, 6, 7, 1), (12, 9, 1)), Sample((4,), (3, 3)))


@pytest.mark.parametrize(("rows", "message"), [
    (["{\"text\": \"a\"}", "{oops"], r"p.jsonl line 2: not valid JSON .*JSONL"),
    ([[1, 2]], r"p.jsonl line 1: expected a JSON object, got a list"),
    ([{"txt": "a"}], r"p.jsonl line 1: the object has neither \"text\" nor \"input_ids\" \+ \"labels\" \(keys: txt\)"),
    ([{"input_ids": [1]}], r"line 1: has input_ids but no labels"),
    ([{"text": 3}], r"line 1: \"text\" must be a string, got int"),
    ([{"input_ids": [1, -2], "labels": [1]}], r"line 1: input_ids must be a list of integer token ids >= 0"),
    ([{"input_ids": [1, 2.5], "labels": [1]}], r"line 1: input_ids must be a list of integer token ids"),
    ([{"input_ids": [1, True], "labels": [1]}], r"line 1: input_ids must be a list of integer token ids"),
    ([{"input_ids": [1], "labels": [10**6]}], r"line 1: labels holds id 1000000, outside the model's vocabulary"),
    ([{"input_ids": [1], "labels": []}], r"line 1: labels is empty"),
    ([{"input_ids": [], "labels": [1]}], r"line 1: input_ids is empty"),
    ([{"text": "the cat"}, {"input_ids": [1], "labels": [1]}],
     r"line 2: a pre-tokenized sample in a file whose first sample \(line 1\) is text; use one kind per file"),
    ([{"input_ids": [1], "labels": [1]}, "", {"text": "the cat"}],
     r"line 3: a text sample in a file whose first sample \(line 1\) is pre-tokenized"),
])
def test_jsonl_errors(tmp_path: Path, tiny_tokenizer: Tokenizer, rows: list[object], message: str) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(QmoeError, match=message):
        load_samples(DataSpec(str(path)), tiny_tokenizer)


def test_pretokenized_longer_than_window(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    rows = [{"input_ids": [3] * 5, "labels": [1]}] * 6 + [{"input_ids": [3] * 600, "labels": [1]}]
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(QmoeError, match=r"p.jsonl line 7: input_ids has 600 tokens, the model's window is "
                                        r"512; shorten or drop the sample"):
        load_samples(DataSpec(str(path)), tiny_tokenizer)


def test_file_errors(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    with pytest.raises(QmoeError, match=r"nope.jsonl: data file not found"):
        load_samples(DataSpec(str(tmp_path / "nope.jsonl")), tiny_tokenizer)
    (tmp_path / "d.csv").write_text("a\n")
    with pytest.raises(QmoeError, match=r"d.csv: unknown data file type '.csv'; use .jsonl"):
        load_samples(DataSpec(str(tmp_path / "d.csv")), tiny_tokenizer)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(QmoeError, match=r"empty.txt: no usable samples \(no data\)"):
        load_samples(DataSpec(str(tmp_path / "empty.txt")), tiny_tokenizer)
    (tmp_path / "long.txt").write_text(" ".join(["the big red barn"] * 10) + "\nfox\n")
    with pytest.raises(QmoeError, match=r"long.txt: no usable samples \(1 empty or under 2 tokens, 1 too long"):
        load_samples(DataSpec(str(tmp_path / "long.txt"), window=16), tiny_tokenizer)
    (tmp_path / "bad.txt").write_bytes(b"the cat\nthe \xff dog\n")
    with pytest.raises(QmoeError, match=r"bad.txt line 2: not UTF-8 text"):
        load_samples(DataSpec(str(tmp_path / "bad.txt")), tiny_tokenizer)


def test_too_many_spans_names_the_line(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    path = tmp_path / "d.txt"
    path.write_text("the cat\n" + " ".join(["the big red barn"] * 75) + "\n")  # 300 tokens: 15 spans
    with pytest.raises(QmoeError, match=r"d.txt line 2: a text of 300 tokens needs 15 noise spans"):
        load_samples(DataSpec(str(path), window=1024), tiny_tokenizer)


# --- C4 -------------------------------------------------------------------------------------


def test_c4_download_failure_is_clean(monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: Tokenizer) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("qmoe_cli.data.hub.probe_hub", lambda *args: None)  # reached, then fails
    with pytest.raises(QmoeError, match=r"could not download C4 \(allenai/c4, en/c4-train.00000-of-01024.json.gz\)"
                                        r".*ConnectionError: Couldn't reach.*--data FILE") as info:
        load_samples(DataSpec("c4", split="train", num_samples=2), tiny_tokenizer)
    assert "\n" not in str(info.value)
    assert calls[0][0] == ("allenai/c4",)
    assert calls[0][1]["streaming"] is True
    assert calls[0][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}


def test_c4_stream_failure_and_success(monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: Tokenizer) -> None:
    datasets = pytest.importorskip("datasets")
    texts = tiny_sentences(4, seed=11)

    def stream(fail_after: int | None):
        for i, text in enumerate(texts):
            if i == fail_after:
                raise OSError("connection reset")
            yield {"text": text, "url": "u", "timestamp": "t"}

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: stream(2))
    monkeypatch.setattr("qmoe_cli.data.hub.probe_hub", lambda *args: None)  # reached, then fails
    with pytest.raises(QmoeError, match=r"could not download C4 .*c4-validation.00000-of-00008.*OSError"):
        load_samples(DataSpec("c4", num_samples=3), tiny_tokenizer)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: stream(None))
    data = load_samples(DataSpec("c4", num_samples=3), tiny_tokenizer)
    assert data.name == "c4" and len(data.samples) == 3
    assert [_reconstruct(s, tiny_tokenizer) for s in data.samples] == [tiny_tokenizer.encode(t) for t in texts[:3]]


# --- WikiText-2 -------------------------------------------------------------------------------


def test_windows_cut_the_tokens_exactly() -> None:
    assert consecutive_windows(10, 3) == [(0, 3), (3, 6), (6, 9)]  # token 9 is a partial window: dropped
    assert consecutive_windows(9, 3) == [(0, 3), (3, 6), (6, 9)]
    assert consecutive_windows(2, 3) == [] and random_windows(2, 3, 5, seed=0) == []
    assert consecutive_windows(3, 3) == [(0, 3)] and random_windows(3, 3, 4, seed=1) == [(0, 3)] * 4
    windows = random_windows(1000, 64, 200, seed=7)
    assert windows == random_windows(1000, 64, 200, seed=7) != random_windows(1000, 64, 200, seed=8)
    assert len(windows) == 200 and all(0 <= a and b == a + 64 <= 1000 for a, b in windows)
    starts = {a for a, _ in windows}
    assert min(starts) < 100 and max(starts) > 836  # spread over the whole range [0, 936]


def _causal_tokenizer(directory: Path) -> CausalTokenizer:
    """TINY_WORDS plus <unk> and <s>, with a post-processor that prepends <s> as Mixtral's does."""
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(TINY_WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return load_causal_tokenizer(directory)


def test_wikitext2_causal_windows_follow_the_standard_protocol(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """Rows joined with blank lines, tokenized once (one BOS, at the start), cut into
    consecutive windows of the window for evaluation, seeded random windows for calibration."""
    tokenizer = _causal_tokenizer(tmp_path / "tok")
    splits = {"test": wikitext_rows(tiny_sentences(40, seed=1)), "train": wikitext_rows(tiny_sentences(90, seed=2))}
    calls = fake_hub_datasets(monkeypatch, splits)
    ids = {split: tokenizer.backend.encode("\n\n".join(rows)).ids for split, rows in splits.items()}
    assert ids["test"][0] == 1 and 1 not in ids["test"][1:] and 0 in ids["test"]  # headings' "=" are <unk>
    window = 32
    whole = len(ids["test"]) // window
    data = load_samples(DataSpec("wikitext2", num_samples=1000, window=window, objective="causal_lm"), tokenizer)
    assert calls[-1] == (("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "test"})
    assert data.name == "wikitext2" and data.short and len(data.samples) == whole > 5
    for i, sample in enumerate(data.samples):
        window_ids = tuple(ids["test"][i * window:(i + 1) * window])
        assert sample == Sample(input_ids=window_ids[:-1], labels=window_ids[1:])
    assert data.label_tokens == whole * (window - 1) and data.skipped_too_long == data.skipped_too_short == 0
    first = load_samples(DataSpec("wikitext2", num_samples=3, window=window, objective="causal_lm"), tokenizer)
    assert first.samples == data.samples[:3] and not first.short

    spec = DataSpec("wikitext2", split="train", num_samples=6, seed=5, window=window, objective="causal_lm")
    calib = load_samples(spec, tokenizer)
    assert calls[-1] == (("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "train"})
    expected = [tuple(ids["train"][a:b]) for a, b in random_windows(len(ids["train"]), window, 6, seed=5)]
    assert [s.input_ids + s.labels[-1:] for s in calib.samples] == expected
    assert load_samples(spec, tokenizer) == calib
    other = load_samples(DataSpec("wikitext2", split="train", num_samples=6, seed=6, window=window,
                                  objective="causal_lm"), tokenizer)
    assert other.samples != calib.samples


def test_wikitext2_span_corruption_reads_paragraph_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         tiny_tokenizer: Tokenizer) -> None:
    paragraphs = tiny_sentences(12, seed=3)
    fake_hub_datasets(monkeypatch, {"test": wikitext_rows(paragraphs), "train": wikitext_rows(paragraphs[:5])})
    data = load_samples(DataSpec("wikitext2", num_samples=100), tiny_tokenizer)
    assert len(data.samples) == 12 and data.short  # headings and blank rows are no samples
    assert [_reconstruct(s, tiny_tokenizer) for s in data.samples] == [tiny_tokenizer.encode(p) for p in paragraphs]
    # The same texts from a file give the same samples: one span-corruption stream, one seed.
    (tmp_path / "paragraphs.txt").write_text("\n".join(paragraphs))
    assert data.samples == load_samples(DataSpec(str(tmp_path / "paragraphs.txt")), tiny_tokenizer).samples
    calib = load_samples(DataSpec("wikitext2", split="train", num_samples=100), tiny_tokenizer)
    assert ([_reconstruct(s, tiny_tokenizer) for s in calib.samples]
            == [tiny_tokenizer.encode(p) for p in paragraphs[:5]])


def test_wikitext2_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       tiny_tokenizer: Tokenizer) -> None:
    fake_hub_datasets(monkeypatch, ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub\nmore"))
    with pytest.raises(QmoeError, match=r"could not download WikiText-2 \(Salesforce/wikitext, wikitext-2-raw-v1, "
                                        r"test split\) from the Hugging Face hub \(ConnectionError: Couldn't reach"
                                        r".*--data FILE for eval, --calib FILE for compress") as info:
        load_samples(DataSpec("wikitext2", num_samples=2), tiny_tokenizer)
    assert "\n" not in str(info.value)
    with pytest.raises(QmoeError, match=r"WikiText-2 \(Salesforce/wikitext, wikitext-2-raw-v1, train split\)"):
        load_samples(DataSpec("wikitext2", split="train", num_samples=2, objective="causal_lm"), tiny_tokenizer)
    tokenizer = _causal_tokenizer(tmp_path / "tok")
    fake_hub_datasets(monkeypatch, {"test": [" the fox \n", ""]})
    with pytest.raises(QmoeError, match=r"^WikiText-2 test: 3 tokens, fewer than one window of 4$"):
        load_samples(DataSpec("wikitext2", num_samples=2, window=4, objective="causal_lm"), tokenizer)
    with pytest.raises(QmoeError, match=r"^WikiText-2 test: holds text but the model has no tokenizer"):
        load_samples(DataSpec("wikitext2", num_samples=2, objective="causal_lm"), None, vocab_size=10)
    fake_hub_datasets(monkeypatch, {"test": [" the fox ran over the big dog \n"]})
    with pytest.raises(QmoeError, match=r"^WikiText-2 test window 1 \(tokens 0..3\): input_ids holds id \d+, "
                                        r"outside the model's vocabulary \[0, 4\)"):
        load_samples(DataSpec("wikitext2", num_samples=2, window=4, objective="causal_lm"), tokenizer, vocab_size=4)


def test_spiece_tokenizer_samples(tmp_path: Path, tiny_spiece_dir: Path) -> None:
    """With a bare spiece.model the sentinels lie past the sp vocab; samples still round-trip."""
    from qmoe_cli.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_spiece_dir)
    texts = [" ".join(tiny_sentences(6, seed=i)) for i in range(5)]
    (tmp_path / "d.txt").write_text("\n".join(texts))
    data = load_samples(DataSpec(str(tmp_path / "d.txt")), tokenizer)
    for text, sample in zip(texts, data.samples, strict=True):
        assert _reconstruct(sample, tokenizer) == tokenizer.encode(text)
        assert sample.labels[0] == tokenizer.sentinel_ids[0] == tokenizer.vocab_size - 1


def _tiny_switch_paragraphs(count: int) -> list[str]:
    """Paragraphs of tiny-switch's own validation texts, which its tokenizer knows."""
    from qmoe_cli.resources import package_dir

    rows = (json.loads(line)["text"] for line in (package_dir() / "assets/tiny-switch/validation.jsonl").open())
    return [p for text in rows for p in text.split("\n") if p.strip()][:count]


def test_tiny_switch_evaluates_and_calibrates_on_wikitext2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--data wikitext2` / `--calib wikitext2` through the CLI (the hub faked): the paragraph
    rows are the texts, so a .txt file of the same paragraphs gives the same numbers."""
    from click.testing import CliRunner

    from qmoe_cli.cli import main

    paragraphs = _tiny_switch_paragraphs(24)
    calls = fake_hub_datasets(monkeypatch, {"test": wikitext_rows(paragraphs), "train": wikitext_rows(paragraphs[4:])})
    (tmp_path / "test.txt").write_text("\n".join(paragraphs))
    (tmp_path / "train.txt").write_text("\n".join(paragraphs[4:]))

    def run(*args: str) -> dict:
        result = CliRunner().invoke(main, [*args, "--device", "cpu", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    ours, file = (run("eval", "--model", "tiny-switch", "--data", d, "--samples", "16") for d in
                  ("wikitext2", str(tmp_path / "test.txt")))
    assert calls[0][1] == {"split": "test"}
    assert ours["datasets"]["wikitext2"] == file["datasets"]["test.txt"] and ours["samples"] == 16
    assert 0 < ours["loss"] < 3
    ours, file = (run("compress", "--model", "tiny-switch", "--calib", d, "--calib-samples", "8", "--out",
                      str(tmp_path / f"q-{Path(d).stem}")) for d in ("wikitext2", str(tmp_path / "train.txt")))
    assert calls[-1][1] == {"split": "train"}
    assert ours["calibration_loss"] == file["calibration_loss"] and ours["blocks"] == file["blocks"]
    files = sorted((tmp_path / "q-wikitext2" / "experts").rglob("*.safetensors"))
    assert files
    for expert_file in files:
        twin = tmp_path / "q-train" / expert_file.relative_to(tmp_path / "q-wikitext2")
        assert expert_file.read_bytes() == twin.read_bytes()
    offline = fake_hub_datasets(monkeypatch, OSError("[Errno 101] Network is unreachable"))
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-switch", "--data", "wikitext2", "--device", "cpu"])
    assert offline and result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("error: could not download WikiText-2 (Salesforce/wikitext, wikitext-2-raw-v1, "
                                    "test split)") and result.stderr.count("\n") == 1
