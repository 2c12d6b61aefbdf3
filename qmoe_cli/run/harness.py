"""lm-evaluation-harness tasks on our runtime: `QmoeLM`, an `lm_eval` model over any checkpoint
kind (original, quantized, packed) of a decoder-only family, registered as `qmoe`.

lm-eval's `TemplateLM` tokenizes (context, continuation) pairs; we score them exactly as its own
`hf` model does (`_loglikelihood_tokens`: context + continuation truncated on the left to
`max_length + 1` tokens, the last token dropped, continuation log-probabilities summed in fp32),
so the two agree to rounding on the same checkpoint. Scoring streams the model block by block
over all requests at once (`streamed_states`, as `qmoe eval` does): each block's weights are read
once per call, whatever the number of requests. Memory: the hidden states of every request's
tokens (`[tokens, d_model]` in the run dtype), plus one block and one request's logits.
`generate_until` loads the model resident (`load_resident`) and decodes greedily with a cache.

Switch Transformers (encoder-decoder, trained on span corruption only) are refused: lm-eval's
multiple-choice tasks score causal continuations, which a span-filling model was never trained
to produce; `qmoe eval --data` measures its masked-LM loss instead.

This module needs the optional `lm-eval` package (`pip install qmoe[eval]`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..data.tokenizer import load_causal_tokenizer
from ..errors import QmoeError
from ..formats.open import OpenModel
from .generate import GenerateConfig, generate_ids
from .resident import load_resident
from .stream import RunConfig, streamed_states

DEFAULT_GEN_TOKENS = 256  # lm-eval's own default `max_gen_toks`


@dataclass(frozen=True)
class HarnessConfig:
    """Which lm-eval tasks to run and how."""

    tasks: tuple[str, ...]
    limit: int | None = None  # examples per task (None: all)
    num_fewshot: int | None = None  # None: each task's own default
    include_path: str | None = None  # a directory of extra task YAML files

    def __post_init__(self) -> None:
        if not self.tasks or any(not t for t in self.tasks):
            raise ValueError(f"--tasks must name at least one task (comma-separated), got {','.join(self.tasks)!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")


@register_model("qmoe")
class QmoeLM(TemplateLM):
    """An lm-eval model computing with qmoe's runtime (see the module docstring)."""

    def __init__(self, model: OpenModel, run: RunConfig):
        super().__init__()
        arch = model.weights.arch
        if arch.objective != "causal_lm":
            raise ValueError(f"--model {model.label}: lm-eval tasks need a decoder-only model; {arch.family} is "
                             "encoder-decoder (span corruption): measure it with `qmoe eval --data` instead")
        self.model, self.run = model, run
        self.tokenizer_ = load_causal_tokenizer(model.tokenizer_dir)
        spec = arch.generation()
        self._eot = spec.eos_tokens[0] if spec.eos_tokens else spec.pad_token
        # BOS where the tokenizer adds one (what the `hf` model takes as prefix), else EOS
        bos = self.tokenizer_.backend.encode("", add_special_tokens=True).ids
        self._prefix = bos[0] if bos else self._eot
        self.max_length = spec.max_positions or model.window
        self._resident = None

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = True if add_special_tokens is None else add_special_tokens
        return self.tokenizer_.backend.encode(string, add_special_tokens=special).ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer_.backend.decode(list(tokens), skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Per request (key, context ids, continuation ids): (sum of the continuation's log-probs,
        whether each continuation token is the most likely one)."""
        inputs, spans = [], []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            inputs.append(whole[:-1])
            spans.append(continuation[-len(whole) + 1:] if len(continuation) >= len(whole) else continuation)
        if not inputs:
            return []
        weights, arch = self.model.weights, self.model.weights.arch
        states = streamed_states(weights, arch.stack_tokens(inputs, inputs), self.run)
        head = arch.head(weights.tensor, self.run.device, self.run.dtype)
        results = []
        for i, target in enumerate(spans):
            hidden = states.sample(i)[-len(target):].to(self.run.device)  # [n, d]
            logprobs = F.log_softmax(head(hidden).float(), dim=-1)  # [n, vocab] fp32
            target_ids = torch.tensor(target, device=logprobs.device)
            picked = logprobs.gather(1, target_ids[:, None])[:, 0]
            results.append((float(picked.sum()), bool((logprobs.argmax(-1) == target_ids).all())))
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of `max_length` (as lm-eval's `hf`)."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until one of its `until` strings, EOS, or `max_gen_toks`."""
        if self._resident is None:
            self._resident = load_resident(self.model.weights, None, [self.run.device], self.run.dtype)
        eos = set(self._resident.weights.arch.generation().eos_tokens)
        outputs = []
        for context, kwargs in (req.args for req in requests):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = self.tok_encode(context)[-(self.max_length - 1):]
            budget = min(int(kwargs.get("max_gen_toks", DEFAULT_GEN_TOKENS)), self.max_length - len(prompt))
            if budget < 1:
                outputs.append("")
                continue
            ids = generate_ids(self._resident, [prompt], [eos], GenerateConfig(max_new_tokens=budget, batch_size=1))[0]
            text = self.tok_decode([t for t in ids if t not in eos])
            for stop in until:
                text = text.split(stop)[0] if stop else text
            outputs.append(text)
        return outputs


@functools.cache
def task_manager(include_path: str | None) -> Any:
    """lm-eval's index of its ~15k task configs plus those under `include_path`. Built once per
    process: indexing reads every YAML file (~6 s of CPU), and the index does not change."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def run_tasks(model: OpenModel, run: RunConfig, cfg: HarnessConfig) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `cfg.tasks` on our runtime: its results dict (JSON-ready
    parts: `results`, `n-shot`, `versions`, ...). ValueError naming an unknown task."""
    from lm_eval import simple_evaluate

    manager = task_manager(cfg.include_path)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: {unknown[0]!r} is not an lm-eval task (see `lm-eval ls tasks`"
                         + (f", or the YAML files in {cfg.include_path}" if cfg.include_path else "") + ")")
    try:
        results = simple_evaluate(model=QmoeLM(model, run), tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                  limit=cfg.limit, task_manager=manager, log_samples=False)
    except (FileNotFoundError, ConnectionError) as exc:
        raise QmoeError(f"--tasks {','.join(cfg.tasks)}: a task's data could not be read ({exc}); "
                        "run where its dataset is reachable or cached") from None
    return results


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table of `results`."""
    return lm_utils.make_table(results)
