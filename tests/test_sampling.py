"""Generation's logits processing against transformers' own processors on fresh random logits
(odd vocabularies, several rows): the repetition penalty, and temperature, top-k and top-p in
the order transformers applies them; sampling draws only from what they keep; the CLI's flags."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from qmoe_cli.cli import main
from qmoe_cli.run.generate import GenerateConfig, cut_at_stop
from qmoe_cli.run.sampling import choose, penalize, seen_mask, warp

generation = pytest.importorskip("transformers.generation.logits_process")


def _logits(seed: int, rows: int = 5, vocab: int = 97) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("seed, penalty", [(0, 1.3), (1, 0.7), (2, 2.0)])
def test_repetition_penalty_is_transformers(seed: int, penalty: float) -> None:
    """Seen ids with repeats (a token counts once) over rows of different lengths."""
    logits = _logits(seed)
    g = torch.Generator().manual_seed(seed + 10)
    rows = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (1, 7, 7, 30, 12)]
    rows[3][:4] = [5, 5, 5, 5]
    ours = penalize(logits, seen_mask(rows, 97, logits.device), penalty)
    processor = generation.RepetitionPenaltyLogitsProcessor(penalty)
    for b, row in enumerate(rows):  # transformers takes one [B, T] tensor: rows one at a time
        theirs = processor(torch.tensor([row]), logits[b:b + 1].clone())
        torch.testing.assert_close(ours[b:b + 1], theirs, atol=0, rtol=0)
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize("seed, temperature, top_k, top_p", [
    (0, 1.0, None, 0.9), (1, 0.7, 20, 1.0), (2, 1.6, 13, 0.8), (3, 0.5, 1, 0.5), (4, 2.5, None, 0.3),
    (5, 1.0, 96, 0.999), (6, 0.9, 200, 0.95),
])
def test_warpers_are_transformers_in_their_order(seed: int, temperature: float, top_k: int | None,
                                                 top_p: float) -> None:
    """Temperature, then top-k, then top-p, as `GenerationMixin._get_logits_processor` chains
    them: the same logits, the same tokens cut (-inf)."""
    logits = _logits(seed)
    ids = torch.zeros(5, 1, dtype=torch.long)
    theirs = logits.clone()
    if temperature != 1.0:
        theirs = generation.TemperatureLogitsWarper(temperature)(ids, theirs)
    if top_k is not None:
        theirs = generation.TopKLogitsWarper(top_k)(ids, theirs)
    if top_p < 1.0:
        theirs = generation.TopPLogitsWarper(top_p)(ids, theirs)
    ours = warp(logits, GenerateConfig(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(ours)
    torch.testing.assert_close(ours[kept], theirs[kept], atol=0, rtol=0)
    assert kept.sum(dim=-1).min() >= 1


def test_samples_come_only_from_the_kept_tokens_in_proportion() -> None:
    """top_k 3 of a known distribution: only the 3 best are drawn, in proportion to their
    renormalised probabilities (4000 draws: a binomial's standard error is under 0.008)."""
    probs = torch.tensor([[0.4, 0.05, 0.3, 0.1, 0.15]])
    config = GenerateConfig(temperature=1.0, top_k=3)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([choose(probs.log(), config, g) for _ in range(4000)]).flatten()
    counts = torch.bincount(draws, minlength=5).double() / 4000
    assert counts[[1, 3]].sum() == 0
    expected = torch.tensor([0.4, 0.3, 0.15]) / 0.85
    assert (counts[[0, 2, 4]] - expected).abs().max() < 0.04


def test_greedy_takes_the_penalised_argmax() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = seen_mask([[0]], 3, logits.device)
    assert choose(logits, GenerateConfig(repetition_penalty=1.2), None, seen).item() == 1
    assert choose(logits, GenerateConfig(), None).item() == 0


def test_cut_at_stop_takes_the_earliest() -> None:
    assert cut_at_stop("a b. c\n d", (".", "\n")) == ("a b", True)
    assert cut_at_stop("abc", ("x",)) == ("abc", False)


@pytest.mark.parametrize("args, fragment", [
    (("--top-k", "5"), "give --temperature too"),
    (("--temperature", "1", "--top-k", "0"), "'--top-k': 0 is not in the range x>=1"),
    (("--repetition-penalty", "0"), "'--repetition-penalty': 0.0 is not in the range x>0"),
    (("--stop", ""), "--stop must be non-empty strings"),
])
def test_bad_generation_flags_are_usage_errors(args, fragment) -> None:
    result = CliRunner().invoke(main, ["generate", "--device", "cpu", "--prompt", "a <extra_id_0>", *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in result.stderr
