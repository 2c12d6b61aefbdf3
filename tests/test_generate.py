"""`qmoe generate`: the cached decoder against recomputation, the whole model and `transformers`;
quantized and packed checkpoints agree token for token; the CLI's output and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_WORDS, write_tiny_tokenizer_json
from hf_models import save_hf_switch

from qmoe_cli.arch.switch.model import SwitchModel
from qmoe_cli.cli import main
from qmoe_cli.data.tokenizer import load_tokenizer
from qmoe_cli.formats.open import open_model
from qmoe_cli.run.generate import GenerateConfig, Prompt, choose, encode_prompts, generate, parse_prompt
from qmoe_cli.run.resident import load_resident

CPU = torch.device("cpu")
PROMPTS = ("the hedgehog lives in <extra_id_0> garden. hedgehogs <extra_id_1> spines.",
           "a whale sleeps at <extra_id_0> and looks for food during the day.",
           "<extra_id_0> is a dim yellow star. belan has 2 <extra_id_1>. the planets of belan are rask and "
           "<extra_id_2> is a rocky planet.")


def _cli(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    return result


def _generate_json(*args: str) -> dict:
    out = _cli("generate", "--device", "cpu", "--json", *args).stdout
    assert len(out.strip().splitlines()) == 1  # exactly one JSON object
    return json.loads(out)


def _prompt_args(prompts=PROMPTS) -> list[str]:
    return [a for p in prompts for a in ("--prompt", p)]


def _whole_model(weights) -> SwitchModel:
    model = SwitchModel(weights.arch.config).eval()
    model.load_state_dict({n: weights.tensor(n, torch.float32, CPU) for n in model.state_dict()})
    return model


def test_cached_decoder_equals_recomputation_and_the_whole_model() -> None:
    """Step by step (in uneven chunks) with the cache, all at once without one, and the in-memory
    model over a padded batch of prompts of three lengths: the same logits."""
    opened = open_model("tiny-switch")
    model = load_resident(opened.weights, None, [CPU], torch.float32)
    tokenizer = load_tokenizer(opened.tokenizer_dir)
    prompts = [parse_prompt(p, tokenizer, "test", 256, 955, 1).ids for p in PROMPTS]
    memory, mask = encode_prompts(model, prompts)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(2, 955, (3, 11), generator=g)
    tokens[:, 0] = 0  # decoder start
    decoder = model.stacks["decoder"]

    def logits(cache, part: torch.Tensor) -> torch.Tensor:
        hidden = model.run_stack("decoder", model.embed("decoder", part), cache)
        return model.logits(hidden.reshape(-1, hidden.shape[-1])).view(*part.shape, -1)

    cache = decoder.new_cache(3, 11, memory=memory, memory_mask=mask)
    stepped = torch.cat([logits(cache, tokens[:, a:b]) for a, b in ((0, 1), (1, 3), (3, 4), (4, 9), (9, 11))], 1)
    assert cache.length(0) == 11
    recomputed = logits(decoder.new_cache(3, 11, memory=memory, memory_mask=mask), tokens)
    torch.testing.assert_close(stepped, recomputed, atol=2e-5, rtol=0)

    whole = _whole_model(opened.weights)
    ids = torch.zeros(mask.shape, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p) + 1] = torch.tensor([*p, 1])
    with torch.no_grad():
        torch.testing.assert_close(memory, whole.encode(ids, mask.long()), atol=2e-5, rtol=0)
        torch.testing.assert_close(stepped, whole(ids, tokens, mask.long()), atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> tuple[Path, Path]:
    """tiny-switch compressed to ternary with `--pack`: (quantized dir, packed dir)."""
    out = tmp_path_factory.mktemp("gen") / "tern"
    _cli("compress", "--calib-samples", "32", "--out", str(out), "--pack", "--device", "cpu", "--json")
    return out, out.with_name("tern-packed")


def test_quantized_and_packed_generate_the_same_tokens(compressed) -> None:
    quantized, packed = compressed
    q = _generate_json("--model", str(quantized), *_prompt_args(), "--max-new-tokens", "24", "--batch-size", "2")
    p = _generate_json("--model", str(packed), *_prompt_args(), "--max-new-tokens", "24", "--batch-size", "2")
    assert q["kind"] == "quantized" and p["kind"] == "packed" and p["model"] == str(packed)
    assert [o["tokens"] for o in q["outputs"]] == [o["tokens"] for o in p["outputs"]]
    assert q["outputs"] == p["outputs"]
    tokenizer = load_tokenizer(packed)
    for prompt, out in zip(PROMPTS, p["outputs"]):
        assert out["prompt"] == prompt and set(out) == {"prompt", "text", "spans", "tokens"}
        sentinels = prompt.count("<extra_id_")
        assert len(out["spans"]) == sentinels
        closing = tokenizer.sentinel_ids[sentinels]
        stops = [i for i, t in enumerate(out["tokens"]) if t in (1, closing)]
        assert stops in ([len(out["tokens"]) - 1], []) and (stops or len(out["tokens"]) == 24)


def test_batching_does_not_change_greedy_tokens() -> None:
    alone = [_generate_json(*_prompt_args([p]), "--max-new-tokens", "12")["outputs"][0] for p in PROMPTS]
    together = _generate_json(*_prompt_args(), "--max-new-tokens", "12")["outputs"]
    assert [o["tokens"] for o in alone] == [o["tokens"] for o in together]


def test_spans_and_text_follow_the_generated_tokens() -> None:
    out = _generate_json(*_prompt_args(PROMPTS[:1]), "--max-new-tokens", "30")["outputs"][0]
    tokenizer = load_tokenizer(open_model("tiny-switch").tokenizer_dir)
    s0, s1 = tokenizer.sentinel_ids[:2]
    tokens = out["tokens"]
    if s0 in tokens:  # the span between <extra_id_0> and the next sentinel, decoded
        start = tokens.index(s0) + 1
        end = next((i for i in range(start, len(tokens)) if tokens[i] in tokenizer.sentinel_ids or tokens[i] == 1),
                   len(tokens))
        assert out["spans"][0] == tokenizer.decode(tokens[start:end]).strip()
    else:
        assert out["spans"][0] is None
    assert out["text"] == tokenizer.decode([t for t in tokens if t not in (0, 1)]).strip()
    text = _cli("generate", "--device", "cpu", *_prompt_args(PROMPTS[:1]), "--max-new-tokens", "30").stdout
    assert "-> " + out["text"] in text and "filled: " in text


def test_sampling_is_seeded_and_a_tiny_nucleus_is_greedy() -> None:
    args = [*_prompt_args(PROMPTS[:2]), "--max-new-tokens", "10"]
    greedy = _generate_json(*args, "--greedy")["outputs"]
    nucleus = _generate_json(*args, "--temperature", "1.5", "--top-p", "1e-6")["outputs"]
    assert [o["tokens"] for o in nucleus] == [o["tokens"] for o in greedy]
    first = _generate_json(*args, "--temperature", "2", "--seed", "3")["outputs"]
    assert _generate_json(*args, "--temperature", "2", "--seed", "3")["outputs"] == first


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = GenerateConfig(temperature=1.0, top_p=0.75)
    g = torch.Generator().manual_seed(0)
    drawn = {int(choose(logits, cfg, g)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3


HF_CASES = {"sparse-every-2-tied": dict(sparse_step=2, tied=True),
            "every-layer-untied": dict(sparse_step=1, tied=False)}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_greedy_tokens_match_transformers_generate(case: str, tmp_path: Path) -> None:
    """A random Switch checkpoint from `transformers`: our tokens are theirs up to our stop (EOS
    or the sentinel closing the last span; they stop at EOS only), over a padded batch."""
    transformers = pytest.importorskip("transformers")
    checkpoint = save_hf_switch(tmp_path / "m", **HF_CASES[case])
    write_tiny_tokenizer_json(checkpoint)
    words = list(TINY_WORDS)
    prompts = [f"{words[0]} {words[3]} <extra_id_0> {words[5]}",
               f"<extra_id_0> {' '.join(words[2:12])} <extra_id_1> {words[1]}",
               f"{words[7]} <extra_id_0> {words[8]} <extra_id_1> {words[9]} {words[4]} <extra_id_2>"]
    ours = _generate_json("--model", str(checkpoint), *_prompt_args(prompts), "--max-new-tokens", "12")["outputs"]

    tokenizer = load_tokenizer(checkpoint)
    parsed = [parse_prompt(p, tokenizer, "test", 512, 96, 1) for p in prompts]
    length = max(len(p.ids) for p in parsed) + 1
    ids = torch.zeros(3, length, dtype=torch.long)
    mask = torch.zeros(3, length, dtype=torch.long)
    for b, p in enumerate(parsed):
        ids[b, :len(p.ids) + 1] = torch.tensor([*p.ids, 1])
        mask[b, :len(p.ids) + 1] = 1
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1,
                             decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)[:, 1:].tolist()
    for p, mine, reference in zip(parsed, ours, theirs):
        stops = {1, tokenizer.sentinel_ids[p.sentinels]}
        end = next((i + 1 for i, t in enumerate(reference) if t in stops), len(reference))
        assert mine["tokens"] == reference[:end]


def test_generate_library_call_on_a_packed_model(compressed) -> None:
    """The library path the CLI wraps: outputs per prompt, in order, over two batches."""
    _, packed = compressed
    opened = open_model(str(packed))
    tokenizer = load_tokenizer(packed)
    model = load_resident(opened.weights, None, [CPU], torch.float32)
    prompts = [parse_prompt(p, tokenizer, "t", 256, 955, 1) for p in PROMPTS]
    outputs = generate(model, prompts, tokenizer, GenerateConfig(max_new_tokens=6, batch_size=2))
    assert [o.prompt for o in outputs] == list(PROMPTS)
    assert all(1 <= len(o.tokens) <= 6 for o in outputs)
    assert isinstance(prompts[0], Prompt) and prompts[0].sentinels == 2


def _error(*args: str, code: int) -> str:
    result = CliRunner().invoke(main, ["generate", "--device", "cpu", *args])
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


@pytest.mark.parametrize("args,code,fragment", [
    ((), 2, "--prompt TEXT"),
    (("--prompt", "a <extra_id_0>", "--input", "x.jsonl"), 2, "not both"),
    (("--prompt", "the fox"), 1, "--prompt 1: no sentinel"),
    (("--prompt", "the <extra_id_0> fox", "--prompt", "  "), 1, "--prompt 2: the prompt is empty"),
    (("--prompt", "the <extra_id_1> fox"), 1, "<extra_id_1> where <extra_id_0> was expected"),
    (("--prompt", "a <extra_id_0> b <extra_id_0>"), 1, "<extra_id_0> where <extra_id_1> was expected"),
    (("--prompt", "the <extra_id_0> " + "fox " * 300), 1, "longer than the model's window of 256"),
    (("--prompt", "a <extra_id_0>", "--greedy", "--temperature", "1"), 2, "exclude each other"),
    (("--prompt", "a <extra_id_0>", "--top-p", "0.9"), 2, "give --temperature too"),
    (("--prompt", "a <extra_id_0>", "--temperature", "0"), 2, "'--temperature': 0.0 is not in the range x>0"),
    (("--prompt", "a <extra_id_0>", "--temperature", "1", "--top-p", "1.5"), 2,
     "'--top-p': 1.5 is not in the range 0<x<=1"),
    (("--prompt", "a <extra_id_0>", "--max-new-tokens", "0"), 2, "'--max-new-tokens': 0 is not in the range x>=1"),
    (("--prompt", "a <extra_id_0>", "--batch-size", "0"), 2, "'--batch-size': 0 is not in the range x>=1"),
    (("--prompt", "a <extra_id_0>", "--max-memory", "lots"), 2, "--max-memory 'lots'"),
    (("--prompt", "a <extra_id_0>", "--max-memory", "1GiB"), 2, "does not apply to --device cpu"),
    (("--prompt", "a <extra_id_0>", "--input", "nowhere.jsonl"), 2, "not both"),
    (("--input", "nowhere.jsonl"), 2, "--input nowhere.jsonl: no such file"),
])
def test_bad_prompts_and_flags_are_one_line_errors(args, code, fragment) -> None:
    assert fragment in _error(*args, code=code)


def test_bad_input_files_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a <extra_id_0> b"}) + "\n{oops\n")
    assert f"{path}:2: not valid JSON" in _error("--input", str(path), code=1)
    path.write_text(json.dumps({"prompt": "a <extra_id_0> b"}) + "\n" + json.dumps({"words": 3}) + "\n")
    assert f'{path}:2: expected an object with a "prompt"' in _error("--input", str(path), code=1)
    path.write_text(json.dumps({"text": "a fox"}) + "\n")
    assert f"{path}:1: no sentinel" in _error("--input", str(path), code=1)
    path.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n\n" + json.dumps({"text": PROMPTS[1]}) + "\n")
    outputs = _generate_json("--input", str(path), "--max-new-tokens", "4")["outputs"]
    assert [o["prompt"] for o in outputs] == list(PROMPTS[:2])


def test_cuda_without_a_gpu_is_a_usage_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = CliRunner().invoke(main, ["generate", "--device", "cuda", "--prompt", "a <extra_id_0>"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.stderr


def test_inference_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    """scripts/bench_inference.py at small sizes: one table row per batch and the sparse block."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, str(root / "scripts" / "bench_inference.py"), "--device", "cpu",
                           "--d-model", "32", "--d-ff", "64", "--experts", "4", "--blocks", "2", "--vocab", "128",
                           "--batches", "1,3", "--steps", "2", "--dictionary-size", "1024", "--warmup", "1",
                           "--out", str(out)],
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0:2] for r in rows[1:]] == [["| decoder step (per token)", "1"],
                                                      ["| decoder step (per token)", "3"], ["| one sparse block", "1"]]
    assert all(float(r.split(" | ")[2]) > 0 and float(r.split(" | ")[3]) > 0 for r in rows[1:])
    assert out.read_text() == done.stdout


class _Bank:
    """A bank of identity experts that may offer a grouped path."""

    def __init__(self, grouped: bool):
        self.num_experts, self.loaded = 5, []
        if grouped:
            self.routed = lambda device, dtype: (lambda x, index: x)

    def load(self, ids, device, dtype):
        self.loaded.extend(ids)
        return [torch.nn.Identity() for _ in ids]


def test_resident_bank_takes_the_grouped_path_where_the_bank_has_one() -> None:
    from qmoe_cli.run.resident import ResidentBank

    grouped = _Bank(grouped=True)
    bank = ResidentBank(grouped, CPU, torch.float32, group_size=2)
    assert bank.grouped and bank.modules == [] and grouped.loaded == []
    assert bank.routed(CPU, torch.float32) is not None
    streamed = ResidentBank(_Bank(grouped=True), CPU, torch.float32, group_size=2, grouped=False)
    assert not streamed.grouped and streamed.routed(CPU, torch.float32) is None and len(streamed.modules) == 5
    plain = _Bank(grouped=False)
    loaded = ResidentBank(plain, CPU, torch.float32, group_size=2)
    assert plain.loaded == [0, 1, 2, 3, 4] and loaded.load([3, 1], CPU, torch.float32) == [loaded.modules[3],
                                                                                          loaded.modules[1]]


def test_swapping_a_block_to_other_tensors_and_back() -> None:
    """What the streamer does around a host-held block (on the CPU here: the copies are clones):
    the block computes with the copies, then with its own tensors again, parameters unchanged."""
    from qmoe_cli.run.resident import PlacedBlock, swap_in, swap_out
    from qmoe_cli.run.stream import RunConfig

    block = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    expert = torch.nn.Linear(3, 2)
    bank = type("Bank", (), {"modules": [expert]})()
    placed = PlacedBlock("decoder.0", block, bank, RunConfig(device=CPU, dtype=torch.float32), streamed=True)
    params = [p for _, _, _, p in placed.tensors()]
    originals = [t.detach().clone() for t in params]
    x = torch.randn(5, 4)
    before = expert(block(x))
    saved = swap_in(placed, [t.detach() * 2 for t in params])
    assert not torch.allclose(expert(block(x)), before)
    assert all(torch.equal(p, 2 * o) for p, o in zip((t for *_, t in placed.tensors()), originals))
    swap_out(saved)
    torch.testing.assert_close(expert(block(x)), before)
    assert all(a is b for (*_, a), b in zip(placed.tensors(), params) if isinstance(b, torch.nn.Parameter))
    assert all(torch.equal(t, o) for (*_, t), o in zip(placed.tensors(), originals))


def test_a_streamed_block_swaps_its_quantized_experts_weights_too() -> None:
    """A host-held block's dequantized experts (`GridLinear`) are among the tensors the streamer
    copies to the GPU and swaps in; a weight kept as a plain attribute would stay on the host."""
    from qmoe_cli.execute.linear import GridLinear
    from qmoe_cli.run.resident import PlacedBlock, swap_in, swap_out
    from qmoe_cli.run.stream import RunConfig

    expert = GridLinear(torch.randn(2, 3))
    bank = type("Bank", (), {"modules": [expert]})()
    placed = PlacedBlock("decoder.0", torch.nn.Linear(4, 3), bank, RunConfig(device=CPU, dtype=torch.float32),
                         streamed=True)
    assert any(t is expert.weight for *_, t in placed.tensors())
    x = torch.randn(5, 3)
    before = expert(x)
    saved = swap_in(placed, [t.detach() * 2 for *_, t in placed.tensors()])
    torch.testing.assert_close(expert(x), 2 * before)
    swap_out(saved)
    torch.testing.assert_close(expert(x), before)
