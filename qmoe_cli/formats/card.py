"""The `README.md` model card of an output directory: Hub front matter (base_model,
library_name, tags, quantization) and what qmoe knows about the weights, from the manifest.

Only facts the run recorded are printed (a missing one is left out, never guessed), so a card is
a pure function of its facts: resumed runs that end with the same manifest write the same card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD = "README.md"
_LABELS = {  # fact -> how the card names it
    "kind": "qmoe checkpoint kind", "format": "export format", "family": "model family",
    "bits": "expert bits", "grid_group": "columns per grid (none: one grid per row)",
    "symmetric": "symmetric grids (zero point 2^(b-1))", "method": "quantizer",
    "bits_per_weight": "bits per expert weight (codes)", "calibration_loss": "calibration loss",
    "dtype": "dense weights dtype",
}


def card_text(facts: dict[str, Any]) -> str:
    """The card for `facts` (`base_model`, `kind`, optional `format`, `bits`, `grid_group`,
    `symmetric`, `method`, `bits_per_weight`, `calibration_loss`, `family`, `dtype`)."""
    fmt, bits = facts.get("format"), facts.get("bits")
    tags = ["qmoe", "mixture-of-experts", "moe"] + ([f"{bits}-bit" if bits != "ternary" else "ternary"]
                                                   if bits else [])
    if fmt == "compressed-tensors":
        tags.append("compressed-tensors")
    front = {"base_model": facts["base_model"], "library_name": "transformers" if fmt else "qmoe", "tags": tags}
    if bits:
        front["quantization"] = {"method": "QMoE (arXiv 2310.16795)", "bits": bits,
                                 **({"symmetric": True} if facts.get("symmetric") else {}),
                                 **({"quantizer": facts["method"]} if facts.get("method") else {})}
    lines = ["---"] + [f"{key}: {json.dumps(value)}" for key, value in front.items()] + ["---", ""]
    lines += [f"# {Path(str(facts['base_model'])).name} ({_title(facts)})", ""]
    lines += [_intro(facts), "", "| | |", "|---|---|"]
    lines += [f"| {label} | {_show(facts[key])} |" for key, label in _LABELS.items() if facts.get(key) is not None]
    lines += ["", _usage(facts), ""]
    return "\n".join(lines)


def write_card(directory: Path, facts: dict[str, Any]) -> Path:
    """Write the card into `directory` (a directory still being written: no atomic rename needed)."""
    path = directory / CARD
    path.write_text(card_text(facts))
    return path


def _title(facts: dict[str, Any]) -> str:
    bits = facts.get("bits")
    what = "dense" if not bits else "ternary" if bits == "ternary" else f"{bits}-bit"
    return f"{what} experts, " + (facts.get("format") or f"qmoe {facts['kind']}")


def _intro(facts: dict[str, Any]) -> str:
    if facts.get("format") == "hf":
        return ("Dequantized export of a qmoe checkpoint: every expert weight is its quantized value, stored "
                "dense, so any Hugging Face tool runs it (no size saving).")
    if facts.get("format") == "compressed-tensors":
        grids = "symmetric integer grids" if facts.get("symmetric") else "asymmetric integer grids, with zero points"
        return ("Expert weights quantized with QMoE and stored in compressed-tensors' `pack-quantized` layout "
                f"({grids}); every other weight as in the base model.")
    return "Mixture-of-experts model compressed with qmoe (QMoE: GPTQ over expert groups, entropy-coded experts)."


def _usage(facts: dict[str, Any]) -> str:
    if facts.get("format"):
        return ("Load with `transformers.AutoModelForCausalLM.from_pretrained(DIR)` (Switch Transformers: "
                "`SwitchTransformersForConditionalGeneration`)" +
                (", with `pip install compressed-tensors`." if facts["format"] == "compressed-tensors" else "."))
    return "Run with `qmoe eval --model DIR` or `qmoe generate --model DIR`; inspect with `qmoe info DIR`."


def _show(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def manifest_facts(manifest: dict[str, Any]) -> dict[str, Any]:
    """The card facts a quantized or packed manifest records."""
    settings = manifest.get("settings") or {}
    return {"base_model": manifest.get("source"), "kind": manifest.get("kind"), "bits": settings.get("bits"),
            "grid_group": settings.get("grid_group"), "symmetric": settings.get("symmetric"),
            "method": settings.get("method"),
            "calibration_loss": manifest.get("calibration_loss"),
            "bits_per_weight": (manifest.get("totals") or {}).get("bits_per_weight_codes")}
