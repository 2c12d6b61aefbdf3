"""qmoe_cli.data.tokenizer on tiny offline tokenizers: both backends, special ids, sentinels, errors."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece
import tokenizers
from conftest import TINY_SENTINELS, tiny_sentences, write_tiny_spiece_model, write_tiny_tokenizer_json

from qmoe_cli.data.tokenizer import Tokenizer, load_tokenizer
from qmoe_cli.errors import QmoeError


def test_tokenizer_json_special_ids_and_sentinels(tiny_tokenizer_json_dir: Path) -> None:
    tok = load_tokenizer(tiny_tokenizer_json_dir)
    raw = tokenizers.Tokenizer.from_file(str(tiny_tokenizer_json_dir / "tokenizer.json"))
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert len(tok.sentinel_ids) == TINY_SENTINELS
    assert tok.sentinel_ids == tuple(raw.token_to_id(f"<extra_id_{i}>") for i in range(TINY_SENTINELS))
    assert tok.sentinel_ids[0] == tok.vocab_size - 1  # appended last-number-first, like T5
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert tok.path.name == "tokenizer.json"


def test_tokenizer_json_round_trip_without_special_tokens(tiny_tokenizer: Tokenizer) -> None:
    for text in tiny_sentences(20, seed=1):
        ids = tiny_tokenizer.encode(text)
        assert ids and tiny_tokenizer.eos_id not in ids  # no EOS added
        assert tiny_tokenizer.unk_id not in ids
        assert tiny_tokenizer.decode(ids) == text
    shown = tiny_tokenizer.decode([tiny_tokenizer.sentinel_ids[3], tiny_tokenizer.eos_id])
    assert "<extra_id_3>" in shown and "</s>" in shown


def test_tokenizer_json_preferred_over_spiece(tmp_path: Path) -> None:
    write_tiny_tokenizer_json(tmp_path)
    write_tiny_spiece_model(tmp_path)
    assert load_tokenizer(tmp_path).path.name == "tokenizer.json"


def test_spiece_appends_sentinels_like_t5(tiny_spiece_dir: Path) -> None:
    tok = load_tokenizer(tiny_spiece_dir)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_spiece_dir / "spiece.model"))
    size = sp.get_piece_size()
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size == size + 100
    assert tok.sentinel_ids[0] == size + 99 and tok.sentinel_ids[99] == size
    assert tok.sentinel_ids == tuple(range(size + 99, size - 1, -1))


def test_spiece_round_trip_and_sentinel_decode(tiny_spiece_dir: Path) -> None:
    tok = load_tokenizer(tiny_spiece_dir)
    for text in tiny_sentences(20, seed=2):
        ids = tok.encode(text)
        assert ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
    ids = tok.encode("the quick fox")
    text = tok.decode(ids[:1] + [tok.sentinel_ids[0]] + ids[1:] + [tok.sentinel_ids[1], tok.eos_id])
    assert text.startswith("the <extra_id_0> quick fox <extra_id_1>")
    with pytest.raises(ValueError, match="cannot decode id"):
        tok.decode([tok.vocab_size + 5])


def test_spiece_extra_ids_from_tokenizer_config(tmp_path: Path, tiny_spiece_dir: Path) -> None:
    shutil.copy(tiny_spiece_dir / "spiece.model", tmp_path / "spiece.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 7}))
    tok = load_tokenizer(tmp_path)
    size = tok.vocab_size - 7
    assert tok.sentinel_ids == tuple(range(size + 6, size - 1, -1))


def test_spiece_sentinels_agree_with_transformers(tiny_spiece_dir: Path) -> None:
    """Hugging Face's T5Tokenizer gives the same sentinel ids for a bare spiece.model."""
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(tiny_spiece_dir)
    hf = _hf_t5_tokenizer(transformers, tiny_spiece_dir)
    for i in (0, 1, 50, 99):
        assert hf.convert_tokens_to_ids(f"<extra_id_{i}>") == ours.sentinel_ids[i]
    assert hf.eos_token_id == ours.eos_id and hf.pad_token_id == ours.pad_id


def _hf_t5_tokenizer(transformers, directory: Path):
    """T5Tokenizer for `directory`, built offline; skips the test when that cannot be done.

    `from_pretrained` reads the spiece.model proto with protobuf; without protobuf, replay the
    same conversion (T5's converter orders the sentinels) from the pieces sentencepiece reads.
    """
    try:
        return transformers.T5Tokenizer.from_pretrained(str(directory))
    except Exception:  # protobuf missing, or an offline lookup failed: try the converter route
        pass
    try:
        from transformers.convert_slow_tokenizer import SLOW_TO_FAST_CONVERTERS

        sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "spiece.model"))
        pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
        kwargs = SLOW_TO_FAST_CONVERTERS["T5Tokenizer"].convert_from_spm(vocab=pieces)
        return transformers.T5Tokenizer(**kwargs)
    except Exception as err:
        pytest.skip(f"transformers.T5Tokenizer cannot be built offline here: {err}")


def test_spiece_with_sentinel_pieces_uses_them(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_sentences()), model_writer=buf, vocab_size=60, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
        user_defined_symbols=[f"<extra_id_{i}>" for i in range(3)])
    (model / "spiece.model").write_bytes(buf.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model / "spiece.model"))
    tok = load_tokenizer(model)
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.sentinel_ids == tuple(sp.piece_to_id(f"<extra_id_{i}>") for i in range(3))


def test_no_tokenizer_names_directory(tmp_path: Path) -> None:
    with pytest.raises(QmoeError, match=rf"{tmp_path}: no tokenizer found.*tokenizer.json.*spiece.model"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_without_sentinels(tmp_path: Path) -> None:
    write_tiny_tokenizer_json(tmp_path, sentinels=0)
    with pytest.raises(QmoeError, match=r"tokenizer.json: has no <extra_id_N> sentinel"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_sentinel_gap(tmp_path: Path) -> None:
    path = write_tiny_tokenizer_json(tmp_path, sentinels=2)
    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.add_special_tokens(["<extra_id_5>"])
    tok.save(str(path))
    with pytest.raises(QmoeError, match=r"<extra_id_2> is missing while <extra_id_5> exists"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_missing_eos(tmp_path: Path) -> None:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
    tok.add_special_tokens(["<extra_id_0>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(QmoeError, match=r"tokenizer.json: has no </s> token"):
        load_tokenizer(tmp_path)


def test_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(QmoeError, match=r"tokenizer.json: not a valid tokenizers file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "spiece.model").write_bytes(b"\x00garbage")
    with pytest.raises(QmoeError, match=r"spiece.model: not a valid SentencePiece model"):
        load_tokenizer(tmp_path)


def test_bad_tokenizer_config(tmp_path: Path, tiny_spiece_dir: Path) -> None:
    shutil.copy(tiny_spiece_dir / "spiece.model", tmp_path / "spiece.model")
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"extra_ids": "many"}))
    with pytest.raises(QmoeError, match=r"tokenizer_config.json: extra_ids must be an integer >= 0, got 'many'"):
        load_tokenizer(tmp_path)
    config.write_text(json.dumps({"extra_ids": 0}))
    with pytest.raises(QmoeError, match=r"no <extra_id_N> sentinel tokens.*extra_ids to 0"):
        load_tokenizer(tmp_path)
    config.write_text("{")
    with pytest.raises(QmoeError, match=r"tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)


def test_tokenizer_validates_its_fields(tiny_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"Tokenizer.eos_id must be an id in \[0, "):
        dataclasses.replace(tiny_tokenizer, eos_id=tiny_tokenizer.vocab_size)
    with pytest.raises(ValueError, match=r"sentinel_ids must hold at least one"):
        dataclasses.replace(tiny_tokenizer, sentinel_ids=())
    with pytest.raises(ValueError, match=r"must not include eos/pad/unk"):
        dataclasses.replace(tiny_tokenizer, sentinel_ids=(tiny_tokenizer.eos_id,))
