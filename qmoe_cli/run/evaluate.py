"""Evaluation: token-weighted cross-entropy over every label token (span-corruption targets for
Switch, next tokens for causal LMs) and perplexity, per dataset and overall.

All datasets run through the model together in one streamed pass (weights are read once), and
the per-sample loss sums are split back by dataset afterwards.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..data.datasets import LoadedData
from .stream import ModelWeights, RunConfig, streamed_losses


@dataclass(frozen=True)
class LossReport:
    loss: float  # mean cross-entropy per label token, nats
    perplexity: float
    tokens: int  # label tokens averaged over
    samples: int


@dataclass(frozen=True)
class EvalReport:
    overall: LossReport
    datasets: dict[str, LossReport]

    def to_json(self) -> dict:
        """The `--json` object: the overall fields at top level, `datasets` per name."""
        return {**asdict(self.overall), "datasets": {k: asdict(v) for k, v in self.datasets.items()}}


def _report(loss_sum: float, tokens: int, samples: int) -> LossReport:
    loss = loss_sum / tokens
    return LossReport(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens, samples=samples)


def evaluate(weights: ModelWeights, datasets: list[LoadedData], run: RunConfig) -> EvalReport:
    """Loss of the model on every dataset; datasets must be non-empty with distinct names."""
    samples = [s for data in datasets for s in data.samples]
    loss_sum, tokens = streamed_losses(weights, [s.input_ids for s in samples], [s.labels for s in samples], run)
    per_dataset, first = {}, 0
    for data in datasets:
        last = first + len(data.samples)
        per_dataset[data.name] = _report(loss_sum[first:last].sum().item(), int(tokens[first:last].sum()),
                                         len(data.samples))
        first = last
    overall = _report(loss_sum.sum().item(), int(tokens.sum()), len(samples))
    return EvalReport(overall, per_dataset)
