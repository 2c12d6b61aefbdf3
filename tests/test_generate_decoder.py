"""`qmoe generate` on decoder-only families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3):
the cached decoder against the streamed runner, padded batches against prompts alone, greedy
tokens against `transformers`' `generate`, quantized against packed checkpoints, and the CLI;
DeepSeek's latent cache (absorbed attention) against the expanded form and its size at full scale."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import tokenizers
import torch
from click.testing import CliRunner
from hf_models import DECODER_FAMILIES, DEEPSEEK_V3, save_hf_decoder, write_causal_tokenizer_json

from qmoe_cli.arch import architecture_from_config
from qmoe_cli.arch.decoder_only.incremental import DecoderIncrementalStack
from qmoe_cli.arch.decoder_only.layers import LatentAttention, SelfAttention, causal_bias, rotary_tables
from qmoe_cli.cli import main
from qmoe_cli.formats.open import open_model
from qmoe_cli.run.generate import GenerateConfig, generate_ids, prefill
from qmoe_cli.run.placement import block_bytes, plan_model
from qmoe_cli.run.resident import load_resident
from qmoe_cli.run.stream import RunConfig, streamed_states

FAMILIES = sorted(DECODER_FAMILIES)
CPU = torch.device("cpu")
VOCAB = 64


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> tuple[str, Path, object]:
    """(family, checkpoint directory with a word-level tokenizer.json, the transformers model)."""
    directory = tmp_path_factory.mktemp(request.param) / "model"
    reference = save_hf_decoder(directory, request.param)
    write_causal_tokenizer_json(directory, VOCAB)
    return request.param, directory, reference


def _random_ids(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _streamed_logits(weights, sequence: list[int]) -> torch.Tensor:
    """Next-token logits [T, vocab] of one sequence run whole by the streamed runner (`qmoe eval`)."""
    run = RunConfig(CPU, torch.float32, progress=False)
    states = streamed_states(weights, weights.arch.stack_tokens([sequence], [sequence]), run)
    return weights.arch.head(weights.tensor, CPU, torch.float32)(states.data)


def _assert_cached_equals_streamed(directory: Path, lengths: tuple[int, ...], chunks: tuple[int, ...]) -> None:
    """A left-padded batch of sequences of `lengths` fed to the cache in the chunks that end at
    `chunks`: at every real position, the logits of each sequence run whole and alone."""
    weights = open_model(str(directory)).weights
    model = load_resident(weights, None, [CPU], torch.float32)
    sequences = _random_ids(lengths, seed=5)
    length = max(len(s) for s in sequences)
    assert chunks[-1] == length
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for b, s in enumerate(sequences):
        ids[b, length - len(s):], mask[b, length - len(s):] = torch.tensor(s), True
    cache = model.stacks["decoder"].new_cache(len(sequences), length + 2, key_mask=mask)
    parts = []
    with torch.no_grad():
        for first, end in zip((0,) + chunks[:-1], chunks):
            hidden = model.run_stack("decoder", model.embed("decoder", ids[:, first:end]), cache)
            parts.append(model.logits(hidden.reshape(-1, hidden.shape[-1])).view(len(sequences), end - first, -1))
    stepped = torch.cat(parts, dim=1)  # [B, length, vocab]
    assert all(cache.length(i) == length for i in range(weights.arch.num_blocks("decoder")))
    for b, s in enumerate(sequences):
        whole = _streamed_logits(weights, s)
        torch.testing.assert_close(stepped[b, length - len(s):], whole, atol=2e-5, rtol=0)
        assert whole.std() > 0.5  # random weights far from flat logits: a wrong position would show


def test_cached_decoder_equals_the_streamed_runner(family) -> None:
    """Three sequences in uneven chunks (a prefill of several positions, single steps, a chunk
    of padding only for the shortest). Lengths beyond Mixtral's window of 9 exercise the
    sliding window; for DeepSeek-V3 the cache holds the latent and attends absorbed, the
    streamed runner expands keys and values per head."""
    _assert_cached_equals_streamed(family[1], (21, 6, 14), (4, 5, 12, 13, 14, 21))


# DeepSeek-V3 variants for its latent cache: queries without the low-rank bottleneck, and
# DeepSeek's own YaRN (mscale_all_dim: the softmax scale times 1.87) over an original context
# of 16 that the longest sequence exceeds.
MLA_CASES = {
    "no-q-lora": dict(q_lora_rank=None),
    "yarn": dict(qk_rope_head_dim=8, max_position_embeddings=640,
                 rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


@pytest.mark.parametrize("case", sorted(MLA_CASES))
def test_latent_cache_equals_the_streamed_runner(case: str, tmp_path: Path) -> None:
    override = MLA_CASES[case]
    reference = save_hf_decoder(tmp_path / "model", "deepseek_v3", config_override=override)
    assert all(getattr(reference.config, k) == v for k, v in override.items() if k != "rope_scaling")
    if "rope_scaling" in override:
        assert reference.config.rope_parameters["mscale_all_dim"] == 1.0
    _assert_cached_equals_streamed(tmp_path / "model", (37, 9, 20), (7, 8, 9, 19, 20, 36, 37))


def test_absorbed_attention_is_the_expanded_form_up_to_rounding() -> None:
    """One latent attention at awkward widths (3 heads, latent 7, rope 6, nope 5, v 9,
    interleaved rotary dims, YaRN with mscale_all_dim) on random float64 weights and inputs: a
    left-padded batch through the latent cache in uneven chunks equals, to fp64 rounding, the same chunks
    through a cache of expanded per-head keys and values (`SelfAttention.forward`, the cached
    form before the latent one) and each sequence alone in the expanded form; the latent cache
    holds [B, 1, max_length, 7 + 6] and no values, the expanded one 3 x (5 + 6 + 9) per position."""
    import transformers

    hf = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=3,
        q_lora_rank=11, kv_lora_rank=7, qk_rope_head_dim=6, qk_nope_head_dim=5, v_head_dim=9,
        max_position_embeddings=32, rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 8.0,
                                                      "original_max_position_embeddings": 4, "mscale_all_dim": 0.7})
    config = architecture_from_config(hf.to_dict()).config
    assert config.rope_interleave and config.softmax_scale != (5 + 6) ** -0.5
    g = torch.Generator().manual_seed(7)
    attention = LatentAttention(config).double()
    with torch.no_grad():
        for param in attention.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64) * 0.5)
    lengths, chunks = (13, 4, 9), (3, 4, 10, 13)
    x = torch.randn(len(lengths), max(lengths), 16, generator=g, dtype=torch.float64)
    mask = torch.arange(13)[None, :] >= torch.tensor([13 - n for n in lengths])[:, None]  # left padding
    stack = DecoderIncrementalStack(config, CPU, torch.float64)
    cache, expanded_cache = (stack.new_cache(len(lengths), 15, key_mask=mask) for _ in range(2))
    with torch.no_grad():
        parts, expanded_parts = [], []
        for first, end in zip((0,) + chunks[:-1], chunks):
            cos, sin, bias = cache.step(first, end - first, CPU)
            parts.append(attention(x[:, first:end], cos, sin, bias, lambda k, v: cache.extend(0, k, v)))
            expanded_parts.append(SelfAttention.forward(attention, x[:, first:end], cos, sin, bias,
                                                        lambda k, v: expanded_cache.extend(0, k, v)))
        stepped = torch.cat(parts, dim=1)  # [B, 13, 16]
        # fp64 rounding along the chain (projections of width 16, 11, 7 + 6, attention over <= 13
        # keys, values of 9, output of 27): ~100 accumulated terms per output, each off by at most
        # an ulp of the running sum; 10x headroom. An fp32 step anywhere (6e-8) fails it by 1e4.
        atol = 1000 * torch.finfo(torch.float64).eps * stepped.abs().max().item()
        torch.testing.assert_close(stepped, torch.cat(expanded_parts, dim=1), atol=atol, rtol=0)
        for b, n in enumerate(lengths):
            cos, sin = rotary_tables(config, n, CPU, torch.float64)
            alone = attention(x[b:b + 1, 13 - n:], cos, sin, causal_bias(n, None, CPU))
            torch.testing.assert_close(stepped[b:b + 1, 13 - n:], alone, atol=atol, rtol=0)
            assert alone.abs().max() > 1
    entry = cache.blocks[0]
    assert entry.keys.shape == (3, 1, 15, 7 + 6) and entry.values is None and entry.length == 13
    expanded = expanded_cache.blocks[0]
    assert expanded.keys.shape == (3, 3, 15, 5 + 6) and expanded.values.shape == (3, 3, 15, 9)


def test_full_size_deepseek_v3_caches_the_latent() -> None:
    """DeepSeek-V3's config: kv_lora_rank + rope = 576 values per position and block, against
    128 heads x (128 + 64 + 128) = 40960 for the expanded keys and values, 71x less."""
    arch = architecture_from_config(copy.deepcopy(DEEPSEEK_V3))
    c = arch.config
    latent = arch.cache_bytes("decoder", 4, 4096, 0, torch.bfloat16)
    assert latent == 4 * 4096 * (512 + 64) * 2
    expanded = 4 * 4096 * c.num_heads * (c.qk_nope_head_dim + c.head_dim + c.v_head_dim) * 2
    assert expanded == 4 * 4096 * 40960 * 2 and expanded / latent == pytest.approx(71.11, abs=0.01)


def _transformers_greedy(reference, prompt: list[int], new: int, pad: int) -> tuple[list[int], float]:
    """transformers' greedy tokens for one prompt and the smallest gap between the best and the
    second-best logit over its steps."""
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=new, do_sample=False, num_beams=1, pad_token_id=pad,
                                 output_scores=True, return_dict_in_generate=True)
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(prompt):].tolist(), min(gaps)


# Prompts of three lengths (one past Mixtral's sliding window of 9), random ids from a fixed
# seed. Random-weight models can have near-ties between the two best logits, where float
# summation order decides the token; the test asserts first that transformers' own margins
# exceed 1e-3 at every step (our logits are within 1e-5 of theirs), so equal tokens
# are a real check and the test is deterministic. Seed 14 gives margins of at least 0.019 in every
# family (of seeds 0-24, five give some family a margin under 1e-3).
GREEDY_LENGTHS, GREEDY_SEED, GREEDY_NEW = (3, 12, 7), 14, 6


def test_greedy_tokens_equal_transformers_and_padding_changes_nothing(family) -> None:
    _, directory, reference = family
    weights = open_model(str(directory)).weights
    model = load_resident(weights, None, [CPU], torch.float32)
    spec = weights.arch.generation()
    prompts = _random_ids(GREEDY_LENGTHS, GREEDY_SEED)
    stops = [set(spec.eos_tokens)] * len(prompts)
    config = GenerateConfig(max_new_tokens=GREEDY_NEW)
    together = generate_ids(model, prompts, stops, config)
    alone = [generate_ids(model, [p], stops[:1], config)[0] for p in prompts]
    assert together == alone
    for prompt, ours in zip(prompts, together):
        theirs, gap = _transformers_greedy(reference, prompt, GREEDY_NEW, spec.pad_token)
        assert gap > 1e-3, f"near-tie ({gap}): choose another GREEDY_SEED"
        end = next((i + 1 for i, t in enumerate(theirs) if t in spec.eos_tokens), len(theirs))
        assert ours == theirs[:end]


def test_a_prefill_in_chunks_generates_the_same_tokens(family, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long prompt batches are prefilled PREFILL_TOKENS at a time: one position per call (2 // 3
    prompts, at least 1) gives the tokens of one call over the whole batch."""
    from qmoe_cli.run import generate

    _, directory, _ = family
    weights = open_model(str(directory)).weights
    model = load_resident(weights, None, [CPU], torch.float32)
    prompts = _random_ids((4, 13, 8), seed=3)
    stops = [set(weights.arch.generation().eos_tokens)] * 3
    whole = generate_ids(model, prompts, stops, GenerateConfig(max_new_tokens=5))
    monkeypatch.setattr(generate, "PREFILL_TOKENS", 2)
    assert generate_ids(model, prompts, stops, GenerateConfig(max_new_tokens=5)) == whole


def test_cache_bytes_are_what_the_cache_holds_and_what_placement_plans(family) -> None:
    """`cache_bytes` (what placement reserves per block) equals the bytes the cache allocates
    for a prompt batch plus its new tokens; the plan counts the whole sequence's cache."""
    _, directory, _ = family
    weights = open_model(str(directory)).weights
    arch = weights.arch
    model = load_resident(weights, None, [CPU], torch.float32)
    prompts = _random_ids((5, 9), seed=2)
    cache, hidden = prefill(model, prompts, max_new_tokens=4)
    assert hidden.shape == (2, arch.d_model)
    for i in range(arch.num_blocks("decoder")):
        entry = cache.blocks[i]
        held = sum(t.numel() * t.element_size() for t in (entry.keys, entry.values) if t is not None)
        assert held == arch.cache_bytes("decoder", 2, 9 + 4, 0, torch.float32) > 0
    plan = plan_model(weights, {"cpu": 1 << 40}, torch.float32, 2, 4, 9)
    head = sum(weights.tensor(n, None, CPU).numel() for n in arch.head_tensors()) * 4
    blocks = sum(block_bytes(weights, "decoder", i, torch.float32) for i in range(arch.num_blocks("decoder")))
    assert plan.used["cpu"] == head + blocks + arch.num_blocks("decoder") * arch.cache_bytes(
        "decoder", 2, 13, 0, torch.float32)


def _cli(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    return result


def _generate_json(model: Path, *args: str) -> dict:
    out = _cli("generate", "--model", str(model), "--device", "cpu", "--json", *args).stdout
    assert len(out.strip().splitlines()) == 1  # exactly one JSON object
    return json.loads(out)


TEXTS = ("w1 w5 w9 w2", "w40 w3 w17 w17 w8 w30 w31 w32 w33 w34 w35", "w59")


def test_text_prompts_through_the_cli(family) -> None:
    """Plain text (no sentinels), tokenized by the model's tokenizer.json (with its <s>): the
    tokens the library generates from those ids, the text they decode to, no spans."""
    _, directory, _ = family
    args = [a for t in TEXTS for a in ("--prompt", t)]
    report = _generate_json(directory, *args, "--max-new-tokens", "5")
    assert set(report) == {"model", "kind", "outputs", "timing"} and report["kind"] == "original"
    opened = open_model(str(directory))
    tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    spec = opened.weights.arch.generation()
    model = load_resident(opened.weights, None, [CPU], torch.float32)
    ids = [tokenizer.encode(t).ids for t in TEXTS]
    assert all(i[0] == 1 for i in ids)
    expected = generate_ids(model, ids, [set(spec.eos_tokens)] * 3, GenerateConfig(max_new_tokens=5))
    for text, out, tokens in zip(TEXTS, report["outputs"], expected):
        assert list(out) == ["prompt", "text", "tokens"] and out["prompt"] == text and out["tokens"] == tokens
        shown = tokens[:-1] if tokens and tokens[-1] in spec.eos_tokens else tokens
        assert out["text"] == tokenizer.decode(shown, skip_special_tokens=False)
    plain = _cli("generate", "--model", str(directory), "--device", "cpu", "--prompt", TEXTS[0],
                 "--max-new-tokens", "5").stdout
    assert plain == f"[1] {TEXTS[0]}\n    -> {report['outputs'][0]['text']}\n"


def _error(model: Path, *args: str, code: int = 1) -> str:
    result = CliRunner().invoke(main, ["generate", "--model", str(model), "--device", "cpu", *args])
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_prompt_errors_name_the_prompt(tmp_path: Path) -> None:
    """Empty, longer than max_position_embeddings, and a model without tokenizer.json; sampling
    flags work as for Switch."""
    model = tmp_path / "model"
    save_hf_decoder(model, "mixtral")
    assert "no tokenizer.json" in _error(model, "--prompt", "w1 w2")
    write_causal_tokenizer_json(model, VOCAB)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8}))
    assert _error(model, "--prompt", "w1", "--prompt", "  ").endswith("--prompt 2: the prompt is empty")
    too_long = " ".join(f"w{i}" for i in range(8))  # 8 words + <s>
    assert _error(model, "--prompt", too_long).endswith("--prompt 1: 9 tokens, longer than the model's window of 8")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "w1 w2"}) + "\n" + json.dumps({"text": ""}) + "\n")
    assert _error(model, "--input", str(prompts)).endswith(f"{prompts}:2: the prompt is empty")
    # the prompt's 4 tokens and the new ones share the 8 positions
    assert ("--max-new-tokens 5: with the longest prompt's 4 tokens that is past the model's 8 positions; give at most "
        "4, or a shorter prompt") in _error(model, "--prompt", "w1 w2 w3", "--max-new-tokens", "5", code=2)
    args = ["--prompt", "w1 w2 w3", "--max-new-tokens", "4"]
    greedy = _generate_json(model, *args, "--greedy")["outputs"]
    assert _generate_json(model, *args, "--temperature", "1", "--top-p", "1e-6")["outputs"] == greedy
    sampled = _generate_json(model, *args, "--temperature", "3", "--seed", "4")["outputs"]
    assert _generate_json(model, *args, "--temperature", "3", "--seed", "4")["outputs"] == sampled


def test_generation_config_eos_ids_stop_a_sequence_too(tmp_path: Path) -> None:
    """transformers' `generate` stops at the eos ids of generation_config.json (chat models list
    more than config.json's): so does qmoe generate; a malformed list is a one-line error."""
    model = tmp_path / "model"
    save_hf_decoder(model, "mixtral")
    write_causal_tokenizer_json(model, VOCAB)
    args = ["--prompt", "w1 w2 w3", "--max-new-tokens", "6"]
    free = _generate_json(model, *args)["outputs"][0]["tokens"]
    assert len(free) == 6
    stop = free[2]
    first = free.index(stop)  # the first time the chosen token appears
    unused = next(i for i in range(VOCAB) if i not in free)  # in the vocabulary, never generated here
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [unused, stop]}))
    out = _generate_json(model, *args)["outputs"][0]
    assert out["tokens"] == free[:first + 1]
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [VOCAB + 10, stop]}))
    assert f"eos_token_id {VOCAB + 10} is outside the model's vocabulary of {VOCAB}" in _error(model, *args)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": ["x"]}))
    assert "generation_config.json: eos_token_id must be a token id or a list of ids >= 0" in _error(model, *args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_generation_equals_cpu(family) -> None:
    """Placed on a GPU (float32), the same greedy tokens as on the CPU."""
    _, directory, _ = family
    args = [a for t in TEXTS for a in ("--prompt", t)] + ["--max-new-tokens", "6"]
    cpu = _generate_json(directory, *args)["outputs"]
    result = _cli("generate", "--model", str(directory), "--device", "cuda:0", "--dtype", "float32", "--json", *args)
    blocks = json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    assert json.loads(result.stdout)["outputs"] == cpu and f"placement: cuda:0 holds {blocks} blocks" in result.stderr


@pytest.mark.slow
def test_quantized_and_packed_generate_the_same_tokens(family, tmp_path: Path) -> None:
    """The issue's "done when": one GPTQ ternary compression, quantized and packed, same greedy
    tokens for the same prompts (the packed experts decode inside the matmul)."""
    _, directory, _ = family
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in _random_ids((24, 17, 30) * 6, seed=2)))
    out = tmp_path / "tern"
    _cli("compress", "--model", str(directory), "--calib", str(calib), "--out", str(out), "--bits", "ternary",
         "--device", "cpu", "--pack", "--json")
    packed = out.with_name("tern-packed")
    assert (packed / "tokenizer.json").is_file()  # compress and pack carry the tokenizer
    args = [a for t in TEXTS for a in ("--prompt", t)] + ["--max-new-tokens", "8", "--batch-size", "2"]
    quantized_out, packed_out = _generate_json(out, *args), _generate_json(packed, *args)
    assert quantized_out["kind"] == "quantized" and packed_out["kind"] == "packed"
    assert quantized_out["outputs"] == packed_out["outputs"]
    assert all(len(o["tokens"]) >= 1 for o in packed_out["outputs"])
