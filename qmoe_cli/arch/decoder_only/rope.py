"""Rotary position embeddings, scaled for long context as `transformers` 5 scales them.

`RopeScaling` is the scaling half of a config's `rope_parameters` (the base `rope_theta` stays a
`DecoderConfig` field); `rope_fields` reads it from either spelling a `config.json` may hold;
`inverse_frequencies` is the math of `transformers.modeling_rope_utils` for each type we run,
written operation for operation alike so that the tables agree bit for bit in fp32.

Types whose rotation of a position depends on the length of the sequence it sits in are
refused: the rotary tables are indexed by position alone (an incremental decoder gathers their
rows), and such a type has no per-position answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import QmoeError

ROPE_TYPES = ("default", "linear", "yarn", "llama3")
_REFUSED = {
    "dynamic": "dynamic NTK scaling recomputes every frequency from the longest sequence seen so far, so a "
               "position's rotation is not fixed (transformers' own result depends on what ran before)",
    "longrope": "LongRoPE switches every position's frequencies from its short to its long factors once a "
                "sequence passes original_max_position_embeddings, so a position's rotation depends on the "
                "sequence length",
}
_WITH_ORIGINAL_LENGTH = ("yarn", "llama3")  # the types that read original_max_position_embeddings


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are scaled, with transformers' defaults resolved (a type's unused
    fields stay at their defaults).

    default: none. linear: every frequency / factor. yarn: low frequencies / factor, high ones
    kept, a linear ramp between (from beta_fast, beta_slow rotations over the original length),
    and cos, sin times an attention factor. llama3: the same idea with wavelength thresholds
    (original length / low_freq_factor, / high_freq_factor), no attention factor.
    """

    rope_type: str = "default"
    factor: float = 1.0  # context extension factor (linear, yarn, llama3)
    original_max_position_embeddings: int | None = None  # pretraining length (yarn, llama3)
    attention_factor: float | None = None  # yarn: cos, sin multiplier (None: from factor and mscale)
    beta_fast: float = 32.0  # yarn: frequencies with more rotations over the original length are kept
    beta_slow: float = 1.0  # yarn: frequencies with fewer are divided by factor
    mscale: float | None = None  # yarn: attention factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    mscale_all_dim: float | None = None  # any scaled type: DeepSeek's MLA softmax times mscale(factor, this)^2
    truncate: bool = True  # yarn: ramp ends rounded outwards to whole dimensions
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RopeScaling.rope_type must be one of {', '.join(ROPE_TYPES)}, got {self.rope_type!r}")
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor!r}")
        original = self.original_max_position_embeddings
        if self.rope_type in _WITH_ORIGINAL_LENGTH and (not isinstance(original, int) or original < 1):
            raise ValueError(f"RopeScaling.original_max_position_embeddings must be a positive integer for "
                             f"{self.rope_type}, got {original!r}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"RopeScaling.attention_factor must be > 0 or None, got {self.attention_factor!r}")
        if self.rope_type == "llama3":
            low, high = self.low_freq_factor, self.high_freq_factor
            # low == high (Llama 4 Scout's 1.0 and 1.0) is a hard switch: no wavelength is medium
            if low is None or high is None or not 0 < low <= high:
                raise ValueError(f"RopeScaling: llama3 needs 0 < low_freq_factor <= high_freq_factor, got "
                                 f"{low!r} and {high!r}")

    @property
    def softmax_mscale(self) -> float:
        """DeepSeek's MLA multiplies its softmax scale by this twice (`yarn_apply_mscale`): 1 unless
        a scaled type names mscale_all_dim."""
        return _yarn_mscale(self.factor, self.mscale_all_dim) if self.mscale_all_dim else 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rotary_fraction(raw: dict[str, Any], default: float = 1.0) -> float:
    """`partial_rotary_factor` as transformers 5 reads it: inside `rope_scaling` or
    `rope_parameters`, else beside them, else the family's `default` (GLM: 0.5)."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    for found in (params.get("partial_rotary_factor"), raw.get("partial_rotary_factor")):
        if found is not None:
            return float(found)
    return default


def rope_fields(raw: dict[str, Any], default_theta: float = 10000.0, partial: bool = False) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` of a Hugging Face config, read as transformers 5 reads them:
    `rope_scaling` (transformers 4) wins over `rope_parameters` (5) as a whole; a `rope_theta`
    inside it over one beside it; a top-level `original_max_position_embeddings` over both, and
    `max_position_embeddings` fills it in. QmoeError for a type we do not run, and for a
    `partial_rotary_factor` below 1 unless the family reads it (`partial`: its parser sets
    `rotary_dim`; the frequencies are then those of the rotated width, as in transformers)."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise QmoeError("config.json: per-layer rope_parameters are not supported")
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta") or raw.get("rope_theta") or default_theta)
    if kind in _REFUSED:
        raise QmoeError(f"config.json: rope type {kind!r} is not supported: {_REFUSED[kind]}")
    if kind not in ROPE_TYPES:
        raise QmoeError(f"config.json: rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if not partial and (params.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1.0) != 1.0:
        raise QmoeError(f"config.json: partial_rotary_factor (rope type {kind!r}) is not supported for model_type "
                        f"{raw.get('model_type')!r}")
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": RopeScaling()}
    # DeepSeek's attention reads mscale_all_dim under any scaled type; 0 counts as absent, as there.
    fields: dict[str, Any] = {"rope_type": kind, "mscale_all_dim": _optional(params.get("mscale_all_dim") or None)}
    if kind in _WITH_ORIGINAL_LENGTH:
        fields["original_max_position_embeddings"] = (raw.get("original_max_position_embeddings")
                                                      or params.get("original_max_position_embeddings")
                                                      or _need(raw, "max_position_embeddings", kind))
    if kind == "yarn":
        factor = params.get("factor")  # absent: the ratio of the extended to the original length
        if factor is None:
            factor = _need(raw, "max_position_embeddings", kind) / fields["original_max_position_embeddings"]
        fields.update(factor=float(factor), attention_factor=_optional(params.get("attention_factor")),
                      beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                      mscale=_optional(params.get("mscale") or None),
                      truncate=bool(params.get("truncate", True)))
    else:
        fields["factor"] = float(_need(params, "factor", kind))
    if kind == "llama3":
        fields.update(low_freq_factor=float(_need(params, "low_freq_factor", kind)),
                      high_freq_factor=float(_need(params, "high_freq_factor", kind)))
    return {"rope_theta": theta, "rope_scaling": RopeScaling(**fields)}


def _optional(value: Any) -> float | None:
    return None if value is None else float(value)


def _need(params: dict[str, Any], key: str, kind: str) -> Any:
    if params.get(key) is None:
        raise QmoeError(f"config.json: rope type {kind!r} needs {key}")
    return params[key]


def inverse_frequencies(theta: float, dim: int, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """The rotary inverse frequencies [dim / 2] fp32 (CPU, where transformers computes them too)
    and the attention factor that multiplies cos and sin."""
    if scaling.rope_type == "yarn":
        return _yarn(theta, dim, scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling.rope_type == "linear":
        inv_freq /= scaling.factor
    elif scaling.rope_type == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq, 1.0


def _yarn(theta: float, dim: int, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate the frequencies that turn fewer than beta_slow times
    over the original length, keep those turning more than beta_fast times, ramp between."""
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(s.factor)
    original = s.original_max_position_embeddings

    def dimension(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dimension(s.beta_fast), dimension(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    keep = 1 - ramp  # 1: the frequency as trained, 0: divided by factor
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: wavelengths beyond original / low_freq_factor divided by factor, those below
    original / high_freq_factor kept, a smooth blend between."""
    original, low, high = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(medium, smoothed, scaled)
