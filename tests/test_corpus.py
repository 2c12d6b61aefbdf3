"""Tests for the synthetic corpus and its tokenizer (scripts/corpus.py): fast, CPU only."""

from __future__ import annotations

import hashlib
import json
import math
import re

import corpus  # scripts/corpus.py: pyproject's pytest `pythonpath` puts scripts/ on sys.path
import pytest
from corpus import (
    NUM_SENTINELS,
    STREAMS,
    TOPICS,
    CorpusSpec,
    build_tokenizer,
    generate_documents,
    generate_records,
    save_tokenizer,
    sentinel,
    unigram_entropy_bits,
    vocabulary,
    write_jsonl,
)
from tokenizers import Tokenizer

# sha256 of write_jsonl(..., "train", 50, CorpusSpec(seed=0)). If generation changes on purpose,
# update it (and retrain anything trained on the old corpus); if it changes by accident, that
# is the bug this test exists to catch.
PINNED_TRAIN_50_SHA256 = "f2bddcf71ce1b994a3708729931d8952373e500aa6c7f5e35b9acccc7601a4cf"
DOCS_PER_STREAM = 1000  # 3000 documents in all


@pytest.fixture(scope="module")
def docs() -> dict[str, list[str]]:
    return {s: list(generate_documents(s, DOCS_PER_STREAM)) for s in STREAMS}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return build_tokenizer()


def test_prng_matches_splitmix64_reference_vector():
    # Vigna's splitmix64 reference output for seed 1234567: pins the generator itself.
    rng = corpus._Rng(1234567)
    assert [rng.next_u64() for _ in range(5)] == [
        6457827717110365317, 3203168211198807973, 9817491932198370423,
        4593380528125082431, 16408922859458223821]


def test_same_seed_same_text_and_other_seed_other_text():
    first = list(generate_documents("train", 30, CorpusSpec(seed=7)))
    assert first == list(generate_documents("train", 30, CorpusSpec(seed=7)))
    assert first != list(generate_documents("train", 30, CorpusSpec(seed=8)))


def test_pinned_digest_of_first_train_documents(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", "train", 50, CorpusSpec(seed=0))
    data = path.read_bytes()
    lines = data.decode("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"text": t} for t in generate_documents("train", 50)]
    assert not (tmp_path / "train.jsonl.tmp").exists()
    assert hashlib.sha256(data).hexdigest() == PINNED_TRAIN_50_SHA256


def test_documents_are_random_access():
    assert list(generate_documents("calibration", 5, start=10)) == \
        list(generate_documents("calibration", 15))[10:]


def test_streams_never_share_a_document(docs):
    seen: dict[str, str] = {}
    for stream in STREAMS:
        for text in docs[stream]:
            assert seen.setdefault(text, stream) == stream, f"document in {seen[text]} and {stream}"


def test_document_shape_within_bounds(docs):
    spec = CorpusSpec()
    for text in (t for stream in STREAMS for t in docs[stream]):
        assert spec.min_words <= len(text.split()) <= spec.max_words
        paragraphs = text.split("\n")
        assert 1 <= len(paragraphs) <= spec.max_paragraphs
        assert all(p and p == p.strip() and "  " not in p for p in paragraphs)
        assert re.fullmatch(r"[a-z0-9 ,.\n]+", text) and text.endswith(".")


def test_custom_spec_bounds_and_topics():
    spec = CorpusSpec(seed=3, min_words=60, max_words=100, max_paragraphs=2,
                      topics=("weather", "family"), mixed_permille=1000)
    records = list(generate_records("train", 200, spec))
    assert {t for r in records for t in r.topics} == {"weather", "family"}
    assert any(len(r.topics) == 2 for r in records)
    for r in records:
        assert 60 <= len(r.text.split()) <= 100 and r.text.count("\n") <= 1


def test_every_topic_appears_in_first_200_documents():
    topics = {t for r in generate_records("train", 200) for t in r.topics}
    assert topics == set(TOPICS)


def test_agreement_rules_hold(docs):
    text = "\n".join(docs["train"])
    assert not re.search(r"\bthere are 1 |\bthere is (?!1 )", text)
    assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", text)
    assert not re.search(r"\b1 (hours|days|minutes|moons|goals|points|stops|nights|planets|people)\b", text)


def test_special_and_sentinel_ids(tokenizer):
    size = tokenizer.get_vocab_size()
    assert size == 3 + len(vocabulary()) + NUM_SENTINELS
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    assert tokenizer.token_to_id("<extra_id_0>") == size - 1
    assert tokenizer.token_to_id("<extra_id_99>") == size - 100
    assert all(tokenizer.token_to_id(sentinel(i)) == size - 1 - i for i in range(NUM_SENTINELS))
    # Sentinels are atomic, and encoding appends </s> the way T5's tokenizer does.
    assert tokenizer.encode("anna <extra_id_5> 37.").ids == [
        tokenizer.token_to_id(w) for w in ("anna", "<extra_id_5>", "3", "7", ".", "</s>")]


def test_vocabulary_is_sorted_unique_and_small():
    words = vocabulary()
    assert list(words) == sorted(set(words)) and len(words) < 1500
    assert set("0123456789,.") <= set(words)
    assert not any(w.startswith("<") for w in words)


def test_generated_text_never_maps_to_unk_and_decodes_back(docs, tokenizer):
    texts = [t for stream in STREAMS for t in docs[stream]]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    for enc in encodings:
        assert 2 not in enc.ids, [w for w, i in zip(enc.tokens, enc.ids) if i == 2]
    # Decoding gives the text back up to whitespace, with numbers spelled digit by digit.
    for text, enc in zip(texts[::10], encodings[::10]):
        assert tokenizer.decode(enc.ids) == re.sub(r"(?<=\d)(?=\d)", " ", " ".join(text.split()))


def test_saved_tokenizer_loads_identically(tmp_path, tokenizer):
    path = save_tokenizer(tmp_path / "tok")
    assert path.name == "tokenizer.json"
    loaded = Tokenizer.from_file(str(path))
    text = next(generate_documents("validation", 1)) + " <extra_id_0>"
    assert loaded.encode(text).ids == tokenizer.encode(text).ids
    assert save_tokenizer(tmp_path / "again").read_bytes() == path.read_bytes()


def test_unigram_entropy_bits():
    assert unigram_entropy_bits([5, 5, 5]) == 0.0
    assert math.isclose(unigram_entropy_bits([0, 1, 2, 3] * 3), 2.0)
    assert math.isclose(unigram_entropy_bits(iter([1, 1, 2, 3])), 1.5)
    with pytest.raises(ValueError, match="at least one token"):
        unigram_entropy_bits([])


@pytest.mark.parametrize("kwargs, field", [
    ({"seed": -1}, "seed"), ({"seed": True}, "seed"), ({"min_words": 5}, "min_words"),
    ({"min_words": 100, "max_words": 120}, "max_words"), ({"max_paragraphs": 0}, "max_paragraphs"),
    ({"mixed_permille": 1001}, "mixed_permille"), ({"topics": ()}, "topics"),
    ({"topics": ("cooking", "poetry")}, "topics"), ({"topics": ("cooking", "cooking")}, "topics"),
])
def test_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"CorpusSpec.{field}"):
        CorpusSpec(**kwargs)


def test_bad_stream_and_count_fail_eagerly():
    with pytest.raises(ValueError, match="stream must be one of"):
        generate_documents("test", 1)
    with pytest.raises(ValueError, match="count and start"):
        generate_documents("train", -1)


def test_spec_to_dict_is_json():
    assert json.loads(json.dumps(CorpusSpec().to_dict()))["topics"] == list(TOPICS)


def test_word_lists_must_spell_out_irregular_plurals():
    assert corpus._nouns("egg peach:peaches") == (("egg", "eggs"), ("peach", "peaches"))
    with pytest.raises(ValueError, match="wrench:PLURAL"):
        corpus._nouns("wrench")
