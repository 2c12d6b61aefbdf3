"""The one family registry (`arch.families.FAMILIES`) is what every list of families follows:
the unsupported-family message, the parity fixtures of the tests, and the docs' families table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hf_models import DECODER_FAMILIES

from qmoe_cli.arch import architecture_from_config
from qmoe_cli.arch.families import DEFAULT_MODEL_TYPE, FAMILIES, Family, model_types
from qmoe_cli.errors import QmoeError

ROOT = Path(__file__).resolve().parent.parent
# A table row's first cell names the family and, last, its model_type: "Mixtral (`mixtral`)".
ROW = re.compile(r"^\|\s*[^|]*\(`(\w+)`\)\s*\|")


def _table_model_types(text: str) -> set[str]:
    """model_types of the markdown table whose header has a `model_type` column."""
    found: set[str] = set()
    in_table = False
    for line in text.splitlines():
        if line.startswith("|") and "model_type" in line.split("|")[1]:
            in_table = True
        elif in_table and not line.startswith("|"):
            break
        elif in_table and (match := ROW.match(line)):
            found.add(match.group(1))
    return found


def _families_doc() -> Path:
    """docs/families.md where the table lives there, else the README."""
    doc = ROOT / "docs" / "families.md"
    return doc if doc.is_file() and _table_model_types(doc.read_text()) else ROOT / "README.md"


def test_the_docs_table_lists_exactly_the_registered_families() -> None:
    doc = _families_doc()
    assert _table_model_types(doc.read_text()) == set(model_types()), doc


def test_the_table_reader_sees_rows_and_only_rows() -> None:
    text = ("intro\n| family (`model_type`) | x |\n|---|---|\n| Mixtral (`mixtral`) | a |\n"
            "| scaled RoPE (`rope_scaling` or `rope_parameters`) | b |\n\n| Other (`olmoe`) | c |\n")
    assert _table_model_types(text) == {"mixtral"}


def test_every_decoder_family_has_a_parity_fixture() -> None:
    """The parity tests (tests/test_decoder_families.py against transformers) run over the
    fixtures of tests/hf_models.py: one per registered decoder family, no more; a family that
    wraps another's text model (Llama 4's multimodal `llama4` around `llama4_text`) instead has a
    test that writes a checkpoint of its own model_type and compares it with transformers."""
    unfixtured = set(model_types()) - {DEFAULT_MODEL_TYPE} - set(DECODER_FAMILIES)
    assert set(DECODER_FAMILIES) <= set(model_types())
    sources = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for model_type in unfixtured:
        assert f'"model_type": "{model_type}"' in sources, f"{model_type}: no parity fixture and no test of its own"


def test_the_unsupported_message_names_every_family() -> None:
    with pytest.raises(QmoeError, match="model_type 'llama' is not supported") as info:
        architecture_from_config({"model_type": "llama"})
    assert f"supported: {', '.join(model_types())})" in str(info.value)


def test_a_family_line_is_validated() -> None:
    assert len({f.model_type for f in FAMILIES}) == len(FAMILIES)
    with pytest.raises(ValueError, match="Family.model_type must be"):
        Family("not a type", "X", FAMILIES[0].config, FAMILIES[0].architecture)
    with pytest.raises(ValueError, match="has no from_hf_dict"):
        Family("x", "X", object, FAMILIES[0].architecture)
