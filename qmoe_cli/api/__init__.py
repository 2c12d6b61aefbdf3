"""The public Python API, which the CLI's commands wrap: `load` a model of any checkpoint kind as
a `torch.nn.Module` (`model.QmoeModel`), and `compress`, `pack`, `evaluate` with the settings of
the CLI's flags (`ops`). Documented in docs/python.md.

Sits at the top beside `cli`: may import every subpackage; nothing but `cli` and the package's
lazy attributes imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..compress.config import CompressConfig
from ..compress.pack import PackConfig
from ..data.tokenizer import load_causal_tokenizer, load_tokenizer
from ..errors import QmoeError
from ..execute.device import resolve_device, resolve_dtype
from ..formats.open import OpenModel, open_model
from ..run.generate import GenerateConfig, Output, Prompt
from ..run.limits import check_cache_fits
from ..run.placement import device_budgets, parse_bytes, plan_model
from ..run.resident import load_resident
from ..run.timing import GenerationStats
from .model import ModelOutput, QmoeModel, check_room
from .ops import compress, evaluate, pack, silent
from .tokenizer import QmoeTokenizer

DEFAULT_PROMPT_TOKENS = 2048  # what `load` reserves decoding caches for, unless told (capped by the window)
DEFAULT_NEW_TOKENS = 256


@dataclass(frozen=True)
class CacheReserve:
    """What placement keeps free on the GPUs for decoding caches: batches of `batch` sequences
    of up to `prompt_tokens` prompt and `new_tokens` generated tokens. Larger batches still run,
    but may not fit beside the blocks the plan put on a GPU."""

    batch: int = 1
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    new_tokens: int = DEFAULT_NEW_TOKENS

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_tokens", "new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CacheReserve.{name} must be an integer >= 1, got {value!r}")


@dataclass
class Checkpoint:
    """An opened checkpoint: what it is and its tokenizer, its weights not yet read (cheap)."""

    opened: OpenModel
    tokenizer: QmoeTokenizer | None

    @property
    def kind(self) -> str:
        return self.opened.kind

    def require_tokenizer(self) -> QmoeTokenizer:
        """The tokenizer; QmoeError naming the directory and the file it lacks when there is none."""
        if self.tokenizer is None:
            arch = self.opened.weights.arch
            load = load_causal_tokenizer if arch.objective == "causal_lm" else load_tokenizer
            load(self.opened.tokenizer_dir)  # raises, naming what is missing
            raise QmoeError(f"{self.opened.tokenizer_dir}: no tokenizer")
        return self.tokenizer

    def load(self, device: str | torch.device | Sequence[str | torch.device] = "auto",
             dtype: str | torch.dtype = "auto", max_memory: int | str | Sequence[int | str] | None = None,
             reserve: CacheReserve | None = None, log: Callable[[str], None] | None = None) -> QmoeModel:
        """Read the weights and place them (see `load`); `log` hears the placement's lines."""
        devices = resolve_devices(device)
        caps = _caps(max_memory)
        if caps and devices[0].type != "cuda":
            raise ValueError("--max-memory caps GPUs; it does not apply to --device cpu")
        run_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, self.opened.stored_dtype,
                                                                               devices[0])
        placement = None
        if devices[0].type == "cpu" and reserve is not None:  # GPUs: plan_model weighs caches against memory
            check_cache_fits(self.opened.weights.arch, reserve.batch, reserve.prompt_tokens, reserve.new_tokens,
                             run_dtype)
        if devices[0].type == "cuda":
            window = self.tokenizer.window if self.tokenizer else self.opened.window
            reserve = reserve or CacheReserve(prompt_tokens=min(DEFAULT_PROMPT_TOKENS, window))
            placement = plan_model(self.opened.weights, device_budgets(devices, caps), run_dtype, reserve.batch,
                                   reserve.new_tokens, reserve.prompt_tokens)
            for line in placement.describe():
                (log or silent)(line)
        resident = load_resident(self.opened.weights, placement, devices, run_dtype)
        return QmoeModel(self.opened, resident, self.tokenizer)


def open_checkpoint(model: str | Path) -> Checkpoint:
    """Open a preset name, hub id or checkpoint directory (original, quantized or packed) and its
    tokenizer, without reading its weights."""
    opened = open_model(str(model))
    return Checkpoint(opened, QmoeTokenizer.of(opened))


def load(model: str | Path | Checkpoint, device: str | torch.device | Sequence[str | torch.device] = "auto",
         dtype: str | torch.dtype = "auto", max_memory: int | str | Sequence[int | str] | None = None, *,
         batch_size: int = 1, prompt_tokens: int | None = None, new_tokens: int = DEFAULT_NEW_TOKENS,
         log: Callable[[str], None] | None = None) -> QmoeModel:
    """A model of any checkpoint kind, preset or path, as a `torch.nn.Module` in eval mode.

    device: "auto" (every visible GPU, else the CPU), "cpu", "cuda", "cuda:N", or several
    "cuda:N"; dtype: "auto" (float32 on the CPU; on GPUs the stored dtype, bfloat16 for float32
    checkpoints), "float32", "bfloat16", "float16" or a torch dtype; max_memory: a cap per GPU
    (bytes or "70GiB"; one for all or one per GPU), what does not fit streams from host memory.
    On GPUs the placement leaves room for decoding caches of `batch_size` sequences of
    `prompt_tokens` (default: 2048, or the model's window if shorter) plus `new_tokens`.
    """
    checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    window = checkpoint.tokenizer.window if checkpoint.tokenizer else checkpoint.opened.window
    reserve = CacheReserve(batch_size, prompt_tokens or min(DEFAULT_PROMPT_TOKENS, window), new_tokens)
    return checkpoint.load(device, dtype, max_memory, reserve, log)


def resolve_devices(names: str | torch.device | Sequence[str | torch.device]) -> list[torch.device]:
    """Device names -> torch devices: auto and cuda take every visible GPU (auto: the CPU
    without one); cuda:N names one; cpu stands alone."""
    names = tuple(str(n) for n in ([names] if isinstance(names, (str, torch.device)) else names)) or ("auto",)
    if len(names) == 1 and names[0] in ("auto", "cuda"):
        device = resolve_device(names[0])
        return ([torch.device("cuda", i) for i in range(torch.cuda.device_count())] if device.type == "cuda"
                else [device])
    resolved = [resolve_device(n) for n in names]
    if len(resolved) > 1 and any(d.type != "cuda" or d.index is None for d in resolved):
        raise ValueError(f"--device: several devices must each be cuda:N, got {', '.join(names)}")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"--device: each device may be given once, got {', '.join(names)}")
    return resolved


def _caps(max_memory: int | str | Sequence[int | str] | None) -> list[int]:
    if max_memory is None:
        return []
    values = [max_memory] if isinstance(max_memory, (int, str)) else list(max_memory)
    return [v if isinstance(v, int) else parse_bytes(v) for v in values]


__all__ = ["CacheReserve", "Checkpoint", "CompressConfig", "GenerateConfig", "GenerationStats", "ModelOutput", "Output", "PackConfig", "Prompt",
           "QmoeModel", "QmoeTokenizer", "check_room", "compress", "evaluate", "load", "open_checkpoint", "pack",
           "resolve_devices"]

