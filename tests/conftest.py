"""Shared test fixtures. Tokenizer fixtures: tiny, built offline, T5-shaped special ids. `kernel_device`:
where the grouped GPU path runs, emulated on the CPU (`emulated_kernels`) or a real GPU."""

from __future__ import annotations

import io
import random
import sys
import types
from pathlib import Path

import pytest
import sentencepiece
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

# A closed vocabulary, so every test text made from these words encodes without <unk>.
TINY_WORDS = ("the quick brown fox jumps over a lazy dog while cat sat on mat and ran away "
              "from big red barn under blue sky with green grass near old river").split()
TINY_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
TINY_SENTINELS = 10  # <extra_id_0> .. <extra_id_9>


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A command run in-process sets torch's threads (`--threads`, or its default): later tests of
    the same worker get theirs back, so thread counts (and BLAS summation orders) never leak."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_sentences(count: int = 300, seed: int = 0) -> list[str]:
    """`count` random sentences of 4 to 12 TINY_WORDS."""
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(TINY_WORDS) for _ in range(rnd.randint(4, 12))) for _ in range(count)]


def fake_hub_datasets(monkeypatch: pytest.MonkeyPatch, splits: dict[str, list[str]] | Exception) -> list[tuple]:
    """Put a `datasets` module in sys.modules whose `load_dataset(..., split=S)` returns the rows
    `{"text": t}` of `splits[S]` (or raises `splits` when it is an exception), so the named-dataset
    code runs as it does against the hub, without a network. Returns the calls, (args, kwargs)."""
    calls: list[tuple] = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if isinstance(splits, Exception):
            raise splits
        return [{"text": text} for text in splits[kwargs["split"]]]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr("qmoe_cli.data.hub.probe_hub", lambda *args: None)  # the hub "answers"
    return calls


def wikitext_rows(paragraphs: list[str], title: str = "Tiny Article") -> list[str]:
    """`paragraphs` laid out as WikiText-2's raw rows are: a heading, blank rows between, each
    row with a leading space and a trailing newline."""
    rows = ["", f" = {title} = \n", ""]
    for i, paragraph in enumerate(paragraphs):
        if i and i % 3 == 0:
            rows += [f" = = Section {i} = = \n", ""]
        rows += [f" {paragraph} \n", ""]
    return rows


def write_tiny_tokenizer_json(directory: Path, sentinels: int = TINY_SENTINELS) -> Path:
    """A WordLevel `tokenizer.json` over TINY_WORDS with T5's specials, in `directory`.

    Sentinels are added tokens appended highest number first, as in T5's tokenizer.json, so
    `<extra_id_0>` gets the last id.
    """
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(TINY_WORDS)],
                            trainers.WordLevelTrainer(special_tokens=list(TINY_SPECIALS)))
    tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(sentinels))])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def write_tiny_spiece_model(directory: Path) -> Path:
    """A tiny unigram `spiece.model` (pad 0, eos 1, unk 2, no bos, no sentinels) in `directory`."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_sentences()), model_writer=model, vocab_size=60,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(model.getvalue())
    return directory / "spiece.model"


@pytest.fixture(scope="session")
def tiny_tokenizer_json_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding only a tiny tokenizer.json (10 sentinels)."""
    directory = tmp_path_factory.mktemp("tokjson")
    write_tiny_tokenizer_json(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_spiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding only a tiny spiece.model."""
    directory = tmp_path_factory.mktemp("spiece")
    write_tiny_spiece_model(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_json_dir: Path):
    """The `qmoe_cli.data.tokenizer.Tokenizer` of `tiny_tokenizer_json_dir`."""
    from qmoe_cli.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_json_dir)


@pytest.fixture(params=["emulated", "cuda"])
def kernel_device(request):
    """Where DeviceExperts runs: the CPU with the ops emulated in torch, or a GPU with the kernels.
    (Imported here, not at the top: conftest must not import torch or qmoe_cli for every test.)"""
    import torch
    from emulated_kernels import emulated_kernels

    from qmoe_cli.kernels import kernel_library

    if request.param == "emulated":
        with emulated_kernels():
            yield torch.device("cpu")
        return
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert kernel_library() is not None, "the kernels must build on a GPU machine"
    yield torch.device("cuda", torch.cuda.current_device())
