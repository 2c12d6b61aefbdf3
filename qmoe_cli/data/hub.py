"""The named datasets, read from the Hugging Face hub with `datasets`: C4 and WikiText-2.

`datasets` is imported here only, and only once a named dataset is asked for: its import takes
about a second, and file data never needs it.

- `c4`: the English C4 shards the QMoE paper uses, streamed (train shard 0 for calibration,
  validation shard 0 for evaluation); only the documents used are read.
- `wikitext2`: `Salesforce/wikitext`, config `wikitext-2-raw-v1` (the raw text, no `<unk>`
  substitutions), downloaded whole and cached by `datasets` (train 36,718 rows, about 11 MB;
  test 4,358 rows, about 1.3 MB; with HF_DATASETS_OFFLINE=1 a later run reads the cache). Evaluation
  (`DataSpec.split` "validation") reads WikiText's *test* split, the usual perplexity benchmark;
  calibration ("train") its train split. WikiText's validation split is never read.

How a causal LM cuts WikiText-2 into samples is the standard perplexity protocol (GPTQ, QMoE and
the tools after them): the split's rows joined with "\\n\\n", tokenized once, cut into windows of
the model's window. Evaluation takes consecutive non-overlapping windows from the first token
(the partial window at the end is dropped); calibration, as GPTQ does, windows at random starts
drawn from one seeded generator. `consecutive_windows` and `random_windows` are those cuts, as
pure functions of the token count.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from ..errors import QmoeError

C4 = "c4"
C4_REPO = "allenai/c4"
C4_FILES = {  # DataSpec.split -> the one shard QMoE reads
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}

WIKITEXT2 = "wikitext2"
WIKITEXT_REPO = "Salesforce/wikitext"  # formerly "wikitext"; the hub redirects the old id
WIKITEXT2_CONFIG = "wikitext-2-raw-v1"
WIKITEXT2_SPLITS = {"train": "train", "validation": "test"}  # DataSpec.split -> WikiText's split
WIKITEXT2_JOIN = "\n\n"  # what the standard protocol puts between rows before tokenizing

NAMED = (C4, WIKITEXT2)
# The first call to the hub waits at most this long, and is not retried: offline, `huggingface_hub`
# and `datasets` would otherwise retry for ~30 s and end in a dozen lines of traceback-like text.
HUB_TIMEOUT_S = 5.0
OFFLINE_ON = ("1", "true", "yes", "on")  # what huggingface_hub and datasets read as "set"
DATA_REMEDY = "pass a local .jsonl or .txt file (--data FILE for eval, --calib FILE for compress)"
SPLITS = tuple(C4_FILES)


def c4_documents(split: str) -> Iterator[tuple[str, str]]:
    """(where, text) of each C4 document of `split`'s shard, streamed in order.

    Raises QmoeError (naming C4 and the shard) when the hub cannot be reached, at the start or
    mid-stream.
    """
    shard = C4_FILES[split]
    offline = offline_variable("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    if offline:  # streamed, so never in the cache
        raise QmoeError(f"C4 ({C4_REPO}) is streamed from the Hugging Face hub and never cached, and {offline} "
                        f"is set; {DATA_REMEDY}")
    probe_hub("dataset", C4_REPO, "C4", DATA_REMEDY)
    import datasets  # slow import (~1 s); only the named datasets need it

    try:
        rows = iter(datasets.load_dataset(C4_REPO, data_files={split: shard}, split=split, streaming=True))
    except Exception as err:  # network, hub and decompression errors have no common base
        raise download_error("C4", f"{C4_REPO}, {shard}", err) from err
    number = 0
    while True:
        number += 1
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as err:  # as above
            raise download_error("C4", f"{C4_REPO}, {shard}", err) from err
        yield f"C4 {shard} document {number}", row["text"]


def wikitext2_rows(split: str) -> list[str]:
    """The text of every row of WikiText-2's split for `split` ("validation" reads "test"), in
    order, blank rows included. Memory: the split's text (about 11 MB for train).

    Raises QmoeError (naming WikiText-2 and the split) when the hub cannot be reached.
    """
    where = f"{WIKITEXT_REPO}, {WIKITEXT2_CONFIG}, {WIKITEXT2_SPLITS[split]} split"
    offline = offline_variable("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    if not offline:
        probe_hub("dataset", WIKITEXT_REPO, "WikiText-2", DATA_REMEDY)
    import datasets  # slow import (~1 s); only the named datasets need it

    try:
        return [row["text"] for row in datasets.load_dataset(WIKITEXT_REPO, WIKITEXT2_CONFIG,
                                                             split=WIKITEXT2_SPLITS[split])]
    except Exception as err:  # network, hub and parquet errors have no common base
        if offline:
            raise QmoeError(f"WikiText-2 ({where}) is not in the datasets cache and {offline} is set; run once "
                            f"without it to download it, or {DATA_REMEDY}") from None
        raise download_error("WikiText-2", where, err) from err


def article_lines(rows: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(1-based row number, stripped text) of each paragraph row: blank rows and the section
    headings (` = Title = `, ` = = Section = = `) left out, for span corruption's text samples."""
    for number, row in enumerate(rows, start=1):
        text = row.strip()
        if text and not (text.startswith("=") and text.endswith("=")):
            yield number, text


def consecutive_windows(num_tokens: int, window: int) -> list[tuple[int, int]]:
    """[start, end) of the num_tokens // window non-overlapping `window`-token windows from
    token 0; the tokens after the last whole window are not used."""
    return [(start, start + window) for start in range(0, num_tokens - window + 1, window)]


def random_windows(num_tokens: int, window: int, count: int, seed: int) -> list[tuple[int, int]]:
    """[start, end) of `count` `window`-token windows, starts uniform over [0, num_tokens - window]
    from `np.random.default_rng(seed)`: the same seed, the same windows (they may overlap).
    Empty when the tokens do not fill one window."""
    if num_tokens < window:
        return []
    starts = np.random.default_rng(seed).integers(0, num_tokens - window + 1, size=count)  # [count] int64
    return [(int(s), int(s) + window) for s in starts]


def download_error(name: str, where: str, err: Exception) -> QmoeError:
    """One line: which dataset could not be read, why, and the local-file way out."""
    detail = str(err).strip().splitlines()
    return QmoeError(
        f"could not download {name} ({where}) from the Hugging Face hub "
        f"({type(err).__name__}: {detail[0] if detail else 'no details'}); check the network, "
        f"or pass a local .jsonl or .txt file (--data FILE for eval, --calib FILE for compress)")



def offline_variable(*names: str) -> str | None:
    """The first of the environment variables `names` set to a true value (as the Hugging Face
    libraries read them), e.g. "HF_HUB_OFFLINE=1"; None when none is."""
    for name in names:
        if os.environ.get(name, "").strip().lower() in OFFLINE_ON:
            return f"{name}={os.environ[name]}"
    return None


def hub_endpoint() -> str:
    """The hub's address: HF_ENDPOINT, read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def probe_hub(repo_type: str, repo_id: str, what: str, remedy: str) -> None:
    """One metadata request for `repo_id` ("model" or "dataset"), waiting at most HUB_TIMEOUT_S
    and never retried, so that an unreachable hub, a missing or gated repository fails at once
    with one line naming `what` and `remedy` (QmoeError), before any slow download starts."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    endpoint = hub_endpoint()
    try:
        HfApi(endpoint=endpoint).repo_info(repo_id, repo_type=repo_type, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise QmoeError(f"{what}: {repo_id} is gated on the Hugging Face hub; accept its terms on its page and log "
                        f"in (`hf auth login`), or {remedy}") from None
    except RepositoryNotFoundError:
        raise QmoeError(f"{what}: no {repo_type} {repo_id} on the Hugging Face hub ({endpoint}); check the name, "
                        f"or {remedy}") from None
    except Exception as err:  # httpx, socket and TLS errors have no common base
        detail = (str(err).strip().splitlines() or ["no details"])[0]
        raise QmoeError(f"{what}: the Hugging Face hub ({endpoint}) cannot be reached ({type(err).__name__}: "
                        f"{detail}); {remedy}, or set HF_HUB_OFFLINE=1 to use what is cached") from None
