"""`CompressConfig`: the settings of one `qmoe compress` run (all of them enter its fingerprint)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..arch import Architecture
from ..formats.quantized_manifest import SHARED_MODES
from ..quant.gptq import GPTQConfig
from ..quant.grids import QuantSpec

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class CompressConfig:
    """Settings of one compression run; all of them enter the resume fingerprint."""

    bits: str  # "ternary" | "2" | "3" | "4" | "8"
    method: str = "gptq"  # "rtn": round-to-nearest on the same grids, the baseline
    group_size: int = 16  # experts quantized in one batched call (bounds GPU memory)
    damp: float = 0.1  # fraction of the mean Hessian diagonal added to it (QMoE's value)
    block_size: int = 128  # GPTQ lazy-batch width
    act_order: bool = False
    grid_group: int | None = None  # columns per grid; None: one grid per row (QMoE)
    # Grids centred on 0 with a fixed zero point (GPTQ's `sym`): what compressed-tensors readers
    # without zero points (transformers' fused MoE experts) load. Recorded only when set (`settings_of`).
    symmetric: bool = False
    token_cap: float = 4.0  # an expert's Hessian uses at most token_cap x mean tokens/expert
    # Shared experts (families with one): quantized like routed ones, or kept as stored. Left out
    # of the settings of a model without one (`settings_of`), whose output it does not change.
    shared_experts: str = "quantize"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.shared_experts not in SHARED_MODES:
            raise ValueError(f"--shared-experts must be one of {', '.join(SHARED_MODES)}, got {self.shared_experts!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"--group-size must be an integer >= 1, got {self.group_size!r}")
        if not self.token_cap > 0:
            raise ValueError(f"--token-cap must be > 0, got {self.token_cap!r}")
        self.gptq  # validates bits, damp, block_size, grid_group

    def settings_of(self, arch: Architecture) -> dict[str, Any]:
        """The settings as the manifest and the fingerprint record them for `arch`: all of them,
        but `shared_experts` only where the model has shared experts and `symmetric` only when set
        (so runs that do not use them write what they wrote before the settings existed, and
        `--resume` of such a run still matches)."""
        settings = asdict(self)
        if arch.shared_expert is None:
            del settings["shared_experts"]
        if not self.symmetric:
            del settings["symmetric"]
        return settings

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.grid_group, self.symmetric)

    @property
    def gptq(self) -> GPTQConfig:
        return GPTQConfig(spec=self.spec, damp=self.damp, block_size=self.block_size, act_order=self.act_order)
