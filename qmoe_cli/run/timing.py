"""Where a `generate` call's time and memory went: prefill and decode rates, time to first
token, peak memory (what `qmoe generate` prints on stderr and puts in --json)."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field

import torch

from .resident import ResidentModel


@dataclass
class GenerationStats:
    """Where the time of `generate` went, summed over its batches: prefill (prompt stack, or the
    decoder-only prompt, up to the first token chosen) and decode (every later step)."""

    prompt_tokens: int = 0  # real prompt tokens (a family's suffix included), padding not
    first_tokens: int = 0  # tokens the prefill steps chose (one per sequence)
    decode_tokens: int = 0  # tokens the decode steps chose for sequences still running
    prefill_s: float = 0.0
    decode_s: float = 0.0
    time_to_first_token_s: float | None = None  # from the start to the first batch's first token
    devices: list[torch.device] = field(default_factory=list)

    def to_json(self) -> dict:
        """Rates (tokens/s), time to first token, and peak memory: the process's peak resident
        set (ru_maxrss) and, on GPUs, the most torch held allocated on each."""
        cuda = {str(d): torch.cuda.max_memory_allocated(d) for d in self.devices if d.type == "cuda"}
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.first_tokens + self.decode_tokens,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "prefill_tokens_per_s": _rate(self.prompt_tokens, self.prefill_s),
                "decode_tokens_per_s": _rate(self.decode_tokens, self.decode_s),
                "time_to_first_token_s": self.time_to_first_token_s,
                "peak_rss_bytes": peak_rss_bytes(), **({"cuda_max_allocated_bytes": cuda} if cuda else {})}

    def describe(self) -> str:
        """One line for stderr."""
        report = self.to_json()
        rates = (f"prefill {report['prompt_tokens']} tokens at {report['prefill_tokens_per_s']:.1f} tokens/s, "
                 f"decode {self.decode_tokens} tokens at {report['decode_tokens_per_s']:.1f} tokens/s, "
                 f"first token after {self.time_to_first_token_s or 0.0:.3f} s")
        memory = f"peak RSS {report['peak_rss_bytes'] / (1 << 20):.0f} MiB"
        for device, held in report.get("cuda_max_allocated_bytes", {}).items():
            memory += f", {device} max allocated {held / (1 << 20):.0f} MiB"
        return f"timing: {rates}; {memory}"


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def devices_of(model: ResidentModel) -> list[torch.device]:
    """Every device the model computes on (whose peak memory `GenerationStats` reports)."""
    return sorted({p.run.device for blocks in model.blocks.values() for p in blocks} | {model.first_device}, key=str)


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
