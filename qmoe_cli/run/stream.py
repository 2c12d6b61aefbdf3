"""Streamed execution: the model runs block by block over a CPU buffer of hidden states.

Memory bound (what makes a 3.2 TB model runnable): at any time the process holds the hidden
states of all samples (`ListBuffer`, tokens x d_model, CPU), the encoder outputs while the
decoder runs, the embedding, ONE block's non-expert weights, and ONE group of experts
(`group_size` experts, only those that received tokens), or, where the bank runs its experts
grouped on the GPU (packed checkpoints), ONE block's compressed experts in GPU memory; plus, in a
sparse block, one more tokens x d_model buffer where the experts' outputs add up. Peak memory
therefore does not grow with the number of experts or blocks. Attention runs per sample (no padding, exact); the
feed-forward sublayers run over the flat token buffer in chunks, and a sparse block routes all
tokens first (top-1 or top-k), then visits its experts group by group, gathering each expert's
tokens with one index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..arch import ExpertBank, ModelWeights, MoEBlock, bank_shared, bank_stores_shared, routed_experts


@dataclass(frozen=True)
class RunConfig:
    """How to execute: where, in what precision, and how much to hold at once."""

    device: torch.device
    dtype: torch.dtype
    token_chunk: int = 4096  # tokens per dense feed-forward / logits step on the device
    group_size: int = 16  # experts resident at once
    progress: bool = True

    def __post_init__(self) -> None:
        if self.token_chunk < 1:
            raise ValueError(f"RunConfig.token_chunk must be >= 1, got {self.token_chunk}")
        if self.group_size < 1:
            raise ValueError(f"RunConfig.group_size must be >= 1, got {self.group_size}")


class ListBuffer:
    """Hidden states of many variable-length samples in one CPU tensor plus offsets.

    `data` is [total_tokens, d] (pinned when a GPU is used, so copies overlap compute);
    sample i is the view `data[offsets[i]:offsets[i+1]]`, and tokens of any subset (say, those
    routed to one expert) are one `index_select` away.
    """

    def __init__(self, lengths: Sequence[int], width: int, dtype: torch.dtype, pin: bool):
        self.offsets = [0]
        for length in lengths:
            self.offsets.append(self.offsets[-1] + length)
        self.data = torch.empty(self.offsets[-1], width, dtype=dtype, pin_memory=pin)

    @classmethod
    def of(cls, data: torch.Tensor) -> "ListBuffer":
        """A buffer around existing tokens data [N, d] (one sample; any device, used in place):
        how generation runs a step's hidden states through the runner's expert dispatch."""
        buffer = cls.__new__(cls)
        buffer.offsets, buffer.data = [0, data.shape[0]], data
        return buffer

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> torch.Tensor:
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    def chunks(self, size: int) -> Iterator[slice]:
        for start in range(0, self.data.shape[0], size):
            yield slice(start, min(start + size, self.data.shape[0]))

    def sample_chunks(self, size: int) -> Iterator[slice]:
        """Chunks of at most `size` tokens that never span two samples."""
        for i in range(len(self)):
            for start in range(self.offsets[i], self.offsets[i + 1], size):
                yield slice(start, min(start + size, self.offsets[i + 1]))


@dataclass(frozen=True)
class Routing:
    """Top-k routing of every token of a buffer as N x k assignments (assignment a is token
    a // k's slot a % k); the assignments to expert j are order[starts[j]:starts[j+1]], in token
    order. Top-1 (Switch) is k = 1, where assignments are tokens."""

    index: torch.Tensor  # [N * k] int64, the expert of each assignment
    prob: torch.Tensor  # [N * k] fp32, its weight
    order: torch.Tensor  # [N * k] int64, assignment ids sorted by expert (stable)
    starts: list[int]  # num_experts + 1 offsets into order
    k: int = 1

    def tokens(self, expert: int) -> torch.Tensor:
        """Token ids [n] int64 routed to `expert`, ascending."""
        assignments = self.order[self.starts[expert]:self.starts[expert + 1]]
        return assignments if self.k == 1 else assignments // self.k

    def weights(self, expert: int) -> torch.Tensor:
        """The router weights [n] fp32 of `tokens(expert)`."""
        return self.prob[self.order[self.starts[expert]:self.starts[expert + 1]]]

    def per_assignment(self, mask: torch.Tensor) -> torch.Tensor:
        """A per-token tensor [N, ...] repeated for each of a token's k assignments -> [N * k, ...]."""
        return mask if self.k == 1 else mask.repeat_interleave(self.k, dim=0)

    def count(self, expert: int) -> int:
        return self.starts[expert + 1] - self.starts[expert]


def route(block: MoEBlock, buffer: ListBuffer, run: RunConfig) -> Routing:
    """Route every token of the buffer (norm then router, fp32), chunk by chunk; the routing
    lives where the buffer does."""
    index, prob = [], []
    for part in buffer.chunks(run.token_chunk):
        x = buffer.data[part].to(run.device, non_blocking=True)
        top_index, top_prob = block.route(block.ffn_norm(x))  # [n] or [n, k]
        index.append(top_index.reshape(x.shape[0], -1).to(buffer.data.device))
        prob.append(top_prob.reshape(x.shape[0], -1).to(buffer.data.device))
    k = index[0].shape[1]
    index_all, prob_all = torch.cat(index).flatten(), torch.cat(prob).flatten()
    counts = torch.bincount(index_all, minlength=block.experts.num_experts)
    starts = [0] + torch.cumsum(counts, 0).tolist()
    return Routing(index_all, prob_all, torch.argsort(index_all, stable=True), starts, k)


def apply_expert(block: MoEBlock, expert: nn.Module, buffer: ListBuffer, tokens: torch.Tensor,
                 weights: torch.Tensor, run: RunConfig, out: torch.Tensor) -> None:
    """out[tokens] += weights * expert(norm(buffer[tokens])); tokens [n] int64, weights [n] fp32,
    out [N, d] in the buffer's dtype. The buffer is only read: every expert of a top-k token must
    see the same input, so outputs gather in `out` until `finish_sparse` adds them."""
    for first in range(0, tokens.numel(), run.token_chunk):
        ids = tokens[first:first + run.token_chunk]
        x = buffer.data.index_select(0, ids).to(run.device, non_blocking=True)
        out.index_add_(0, ids, expert_output(block, expert, x, weights[first:first + run.token_chunk])
                       .to(out.device, out.dtype))


def expert_output(block: MoEBlock, expert: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights * expert(norm(x)): x [n, d] on the expert's device, weights [n] fp32 -> [n, d] x.dtype.
    A block with `routing_on_input` (Llama 4) scales the input instead: expert(weights * norm(x))."""
    weights = weights.to(x.device, x.dtype)[:, None]
    if getattr(block, "routing_on_input", False):
        return expert(block.ffn_norm(x) * weights)
    return expert(block.ffn_norm(x)) * weights


def bind_expert(block: MoEBlock, j: int, expert: nn.Module) -> nn.Module:
    """Expert j of `block` as the block runs it: a bank's module plus what the block keeps per
    expert beside the matrices (GPT-OSS's full-precision biases: `bind_expert` on the block)."""
    bind = getattr(block, "bind_expert", None)
    return expert if bind is None else bind(j, expert)


def apply_experts(block: MoEBlock, bank: ExpertBank, buffer: ListBuffer, routing: Routing, run: RunConfig,
                  out: torch.Tensor) -> None:
    """Run every routed token through its experts from `bank`; results add up in `out`. Where the
    bank has a grouped path on the device: all experts at once, chunk by chunk of tokens, all k
    routing slots in one call (its outputs [chunk, k, d] on the device), weighted and added in slot
    order; else ascending expert id (so a token's outputs add up in that order), loading
    `run.group_size` at a time."""
    routed = routed_experts(bank, run.device, run.dtype)
    if routed is not None:
        index, prob = routing.index.view(-1, routing.k), routing.prob.view(-1, routing.k)  # [N, k]
        for part in buffer.chunks(run.token_chunk):
            x = block.ffn_norm(buffer.data[part].to(run.device, non_blocking=True))
            weight = prob[part].to(run.device, x.dtype)  # [n, k]
            if getattr(block, "routing_on_input", False):  # each slot's own input: one call per slot
                for slot in range(routing.k):
                    y = routed(x * weight[:, slot, None], index[part, slot].to(run.device))  # [n, d]
                    out[part] += y.to(out.device, out.dtype)
                continue
            y = routed(x, index[part].to(run.device))  # [n, k, d]
            for slot in range(routing.k):
                out[part] += (y[:, slot] * weight[:, slot, None]).to(out.device, out.dtype)
        return
    active = [j for j in range(bank.num_experts) if routing.count(j)]
    for first in range(0, len(active), run.group_size):
        ids = active[first:first + run.group_size]
        for j, expert in zip(ids, bank.load(ids, run.device, run.dtype)):
            expert = bind_expert(block, j, expert)
            apply_expert(block, expert, buffer, routing.tokens(j), routing.weights(j), run, out)


def finish_sparse(block: MoEBlock, buffer: ListBuffer, out: torch.Tensor, run: RunConfig) -> None:
    """buffer += out (+ the shared experts' output, where the block has them), sample by sample
    in token chunks: a matrix product's rounding can depend on how many rows share the call, and
    samples are the unit that is the same however they are sharded over ranks (distributed
    compression gives byte-identical results only so)."""
    for part in buffer.sample_chunks(run.token_chunk):
        x = buffer.data[part].to(run.device, non_blocking=True)
        y = out[part].to(run.device)
        shared = block.shared_output(block.ffn_norm(x))
        if shared is not None:
            y = y + shared
        buffer.data[part] = (x + y).to(buffer.data.device)


def sparse_feed_forward(block: MoEBlock, buffer: ListBuffer, run: RunConfig) -> Routing:
    """Memory: one [tokens, d] buffer for the experts' outputs, beside the hidden states."""
    routing = route(block, buffer, run)
    out = torch.zeros_like(buffer.data)
    apply_experts(block, block.experts, buffer, routing, run, out)
    finish_sparse(block, buffer, out, run)
    return routing


def dense_feed_forward(block: MoEBlock, buffer: ListBuffer, run: RunConfig) -> None:
    for part in buffer.chunks(run.token_chunk):
        x = buffer.data[part].to(run.device, non_blocking=True)
        buffer.data[part] = block.feed_forward(x).cpu()


def load_block(weights: ModelWeights, stack: str, index: int, run: RunConfig,
               bank: ExpertBank | None = None) -> MoEBlock:
    """Build block `index` of `stack` with its non-expert weights read now, on the device, around
    `bank` (default: the checkpoint's experts, read when asked for), and its shared expert from
    the bank where the bank stores it (compressed checkpoints; `bank_shared`: on a GPU, a packed
    bank's runs there compressed)."""
    arch = weights.arch
    if bank is None and arch.is_sparse(stack, index):
        bank = weights.experts(stack, index)
    with torch.device("meta"):
        block = arch.block(stack, index, bank)
    prefix = arch.block_prefix(stack, index)
    state = {name: weights.tensor(prefix + name, run.dtype, run.device) for name in block.state_dict()}
    block.load_state_dict(state, assign=True)
    if bank_stores_shared(bank):
        block.use_shared(bank_shared(bank, run.device, run.dtype))
    return block.eval()


class BlockHook(Protocol):
    """Replaces how a sparse block's feed-forward is run (compression plugs in here)."""

    def __call__(self, stack: str, index: int, block: MoEBlock, buffer: ListBuffer, run: RunConfig) -> None: ...


def default_sparse(stack: str, index: int, block: MoEBlock, buffer: ListBuffer, run: RunConfig) -> None:
    sparse_feed_forward(block, buffer, run)


@torch.no_grad()
def streamed_losses(weights: ModelWeights, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                    run: RunConfig, sparse_hook: BlockHook = default_sparse) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every sample, streaming the model block by block.

    Returns (loss_sum [n] fp64, tokens [n] int64): per sample, summed token losses over label
    positions (labels of -100 are ignored) and the number of such positions.
    """
    states = streamed_states(weights, weights.arch.stack_tokens(input_ids, labels), run, sparse_hook)
    return _losses(weights, states, [torch.tensor(l, dtype=torch.long) for l in labels], run)


@torch.no_grad()
def streamed_states(weights: ModelWeights, tokens: dict[str, Sequence[Sequence[int]]], run: RunConfig,
                    sparse_hook: BlockHook = default_sparse) -> ListBuffer:
    """Final (normalised) hidden states of the last stack for every sample, streaming block by
    block; `tokens` holds the ids entering each stack (`Architecture.stack_tokens`)."""
    arch = weights.arch
    pin = run.device.type == "cuda"
    buffers: dict[str, ListBuffer] = {}
    bar = tqdm(total=sum(arch.num_blocks(stack) for stack in arch.stacks), desc="blocks", unit="block",
               disable=not run.progress, leave=False)
    for stack in arch.stacks:
        buffer = _embed(weights.tensor(arch.embedding_tensor(stack), run.dtype, run.device), tokens[stack], pin)
        context = arch.stack_context(stack, weights.tensor, run.device, run.dtype)
        memory_stack = arch.memory_stack(stack)
        memory = None if memory_stack is None else buffers[memory_stack]
        for i in range(arch.num_blocks(stack)):
            block = load_block(weights, stack, i, run)
            for s in range(len(buffer)):
                x = buffer.sample(s).to(run.device)[None]
                m = None if memory is None else memory.sample(s).to(run.device)[None]
                buffer.sample(s).copy_(context.attend(block, x, m)[0])
            if block.is_sparse:
                sparse_hook(stack, i, block, buffer, run)
            else:
                dense_feed_forward(block, buffer, run)
            del block
            bar.update()
        norm = arch.final_norm(stack, weights.tensor, run.device, run.dtype)
        for part in buffer.chunks(run.token_chunk):
            buffer.data[part] = norm(buffer.data[part].to(run.device)).cpu()
        buffers[stack] = buffer
    bar.close()
    return buffers[arch.stacks[-1]]


def _embed(embedding: torch.Tensor, ids: Sequence[Sequence[int]], pin: bool) -> ListBuffer:
    buffer = ListBuffer([len(s) for s in ids], embedding.shape[1], embedding.dtype, pin)
    for s, sample in enumerate(ids):
        index = torch.tensor(sample, dtype=torch.long, device=embedding.device)
        buffer.sample(s).copy_(F.embedding(index, embedding))
    return buffer


def _losses(weights: ModelWeights, states: ListBuffer, labels: list[torch.Tensor],
            run: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    head = weights.arch.head(weights.tensor, run.device, run.dtype)
    flat_labels = torch.cat(labels)
    sample_of = torch.repeat_interleave(torch.arange(len(labels)), torch.tensor([len(l) for l in labels]))
    token_loss = torch.empty(flat_labels.shape[0], dtype=torch.float64)
    step = max(1, run.token_chunk // 4)  # logits are [step, vocab]: keep them small
    for part in states.chunks(step):
        logits = head(states.data[part].to(run.device)).float()
        target = flat_labels[part].to(run.device)
        token_loss[part] = F.cross_entropy(logits, target, ignore_index=-100, reduction="none").double().cpu()
    valid = flat_labels != -100
    loss_sum = torch.zeros(len(labels), dtype=torch.float64).index_add_(0, sample_of, token_loss * valid)
    tokens = torch.zeros(len(labels), dtype=torch.long).index_add_(0, sample_of, valid.long())
    return loss_sum, tokens
