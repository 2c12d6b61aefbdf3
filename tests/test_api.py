"""The public Python API (`qmoe_cli.load` and friends): logits and losses equal transformers' for
every family, packed equal quantized, `model.generate` equal `qmoe generate` and transformers'
greedy `generate` (repetition penalty included), stop strings, streamers, the tokenizer and its
chat template, and a cheap `import qmoe_cli`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_WORDS, write_tiny_tokenizer_json
from hf_models import DECODER_FAMILIES, save_hf_decoder, save_hf_switch, write_causal_tokenizer_json

import qmoe_cli as qmoe
from qmoe_cli.cli import main
from qmoe_cli.resources import package_dir

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
CPU = "cpu"
VOCAB = 64


def _ids(shape: tuple[int, int], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(2, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_import_is_cheap_and_the_api_is_lazy() -> None:
    """`import qmoe_cli` (what `qmoe --version` pays) imports no torch; the API names load on use."""
    # The compress subpackage imported first (Python binds it on the package) still leaves
    # `qmoe_cli.compress` the API function.
    code = ("import sys, qmoe_cli.compress; assert 'torch' not in sys.modules; qmoe_cli.load; "
            "assert 'torch' in sys.modules; from qmoe_cli.api.ops import compress; assert qmoe_cli.compress is compress")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        qmoe.nothing  # noqa: B018


def test_compress_is_the_function_and_the_subpackage_stays_importable() -> None:
    """Whatever binds `qmoe_cli.compress` (the import system does `setattr(package, "compress",
    subpackage)` when it first imports it), the name stays the API function; the subpackage's
    modules stay importable by their full names."""
    import importlib

    from qmoe_cli.api.ops import compress
    from qmoe_cli.compress.pack import PackConfig

    qmoe.compress = sys.modules["qmoe_cli.compress"]  # what importing the subpackage does
    assert qmoe.compress is compress and "compress" in dir(qmoe)
    from qmoe_cli import compress as imported

    assert imported is compress
    assert importlib.import_module("qmoe_cli.compress.pack").PackConfig is PackConfig


@pytest.mark.parametrize("tied", [True, False])
def test_switch_logits_and_loss_equal_transformers(tied: bool, tmp_path: Path) -> None:
    """A padded encoder batch (right padding, as T5 tokenizers pad), decoder inputs from labels:
    logits within test_model.py's whole-model tolerance (1e-5), the loss likewise."""
    checkpoint = save_hf_switch(tmp_path / "m", sparse_step=2, tied=tied)
    ids, labels = _ids((3, 13), 96, seed=1), _ids((3, 6), 96, seed=2)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask, labels=labels)
    model = qmoe.load(checkpoint, device=CPU)
    assert isinstance(model, torch.nn.Module) and not model.training and model.tokenizer is None
    out = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=0)
    assert out.loss.item() == pytest.approx(reference.loss.item(), abs=1e-5)
    decoder_ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    torch.testing.assert_close(model(ids, mask, decoder_input_ids=decoder_ids)["logits"], out.logits)
    with pytest.raises(ValueError, match="needs decoder_input_ids or labels"):
        model(ids)


@pytest.mark.parametrize("family", sorted(DECODER_FAMILIES))
def test_decoder_logits_and_loss_equal_transformers(family: str, tmp_path: Path) -> None:
    """Unpadded, the logits of every position within 2e-5 of transformers' (the tolerance of the
    cached decoder against the streamed runner, test_generate_decoder.py) and the loss within
    rel 1e-5 (test_decoder_families.py's); a left-padded row computes as it does alone."""
    reference = save_hf_decoder(tmp_path / "m", family)
    ids = _ids((2, 12), VOCAB, seed=3)
    with torch.no_grad():
        expected = reference(input_ids=ids, labels=ids)
    model = qmoe.load(tmp_path / "m", device=CPU)
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits, atol=2e-5, rtol=0)
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids[1:, :8]], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(torch.cat([ids[:1], padded]), torch.cat([torch.ones(1, 12).long(), mask])
                                     ).logits[1, 4:], out.logits[1, :8], atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_mixtral_compressed(tmp_path_factory) -> tuple[Path, Path]:
    """tiny-mixtral, ternary RTN, through the API: (quantized dir, packed dir)."""
    out = tmp_path_factory.mktemp("api") / "tern"
    result = qmoe.compress("tiny-mixtral", qmoe.CompressConfig(bits="ternary", method="rtn"), calib_samples=8,
                           out=out, then_pack=True, device=CPU)
    assert result.out == out and result.manifest["kind"] == "quantized" and result.packed == out.with_name("tern-packed")
    return out, result.packed


def test_packed_logits_equal_quantized(tiny_mixtral_compressed) -> None:
    """Packing is lossless: logits within 1e-5 (fp32 sums in another order inside the
    decode-matmul) and the loss within rel 1e-6, as the packed-vs-quantized eval tests demand."""
    quantized, packed = (qmoe.load(d, device=CPU) for d in tiny_mixtral_compressed)
    assert (quantized.kind, packed.kind) == ("quantized", "packed")
    ids = quantized.tokenizer(["the cat sat on the mat", "a dog"])
    q = quantized(ids["input_ids"], ids["attention_mask"], labels=ids["input_ids"])
    p = packed(ids["input_ids"], ids["attention_mask"], labels=ids["input_ids"])
    torch.testing.assert_close(p.logits, q.logits, atol=1e-5, rtol=0)
    assert p.loss.item() == pytest.approx(q.loss.item(), rel=1e-6)
    assert q.logits.std() > 0.5  # not a degenerate model


def test_evaluate_and_pack_are_the_cli_commands(tiny_mixtral_compressed, tmp_path: Path) -> None:
    quantized, _ = tiny_mixtral_compressed
    data = str(package_dir() / "assets" / "tiny-mixtral" / "validation.jsonl")
    result = qmoe.evaluate(quantized, [data], samples=8, device=CPU)
    cli = CliRunner().invoke(main, ["eval", "--model", str(quantized), "--data", data, "--samples", "8",
                                    "--device", "cpu", "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["loss"] == result.report.overall.loss and result.kind == "quantized"
    out, packed = qmoe.pack(quantized, tmp_path / "again")
    assert out == tmp_path / "again" and (out / "manifest.json").is_file() and packed.throughput()


def _cli_json(*args: str) -> dict:
    result = CliRunner().invoke(main, ["generate", "--device", "cpu", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("name, prompts", [
    ("tiny-mixtral", ["the cat sat", "a small dog ran to the"]),
    ("tiny-switch", ["the hedgehog lives in <extra_id_0> garden.", "a whale <extra_id_0> at night <extra_id_1>."]),
])
def test_model_generate_equals_the_cli(name: str, prompts: list[str]) -> None:
    """Greedy and with a repetition penalty: the tokens `qmoe generate` prints are those
    `model.generate` appends (padding after a stop aside), and `generate_text` gives its outputs."""
    model = qmoe.load(name, device=CPU)
    batch = model.tokenizer(prompts)
    for extra, kwargs in (([], {}), (["--repetition-penalty", "1.5"], {"repetition_penalty": 1.5})):
        cli = _cli_json("--model", name, *[a for p in prompts for a in ("--prompt", p)], "--max-new-tokens", "10",
                        *extra)
        ids = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10, **kwargs)
        start = 1 if model.encoder_decoder else batch["input_ids"].shape[1]
        for row, out in zip(ids, cli["outputs"]):
            assert row[start:start + len(out["tokens"])].tolist() == out["tokens"]
            assert (row[start + len(out["tokens"]):] == model.spec.pad_token).all()
        config = qmoe.GenerateConfig(max_new_tokens=10, **kwargs)
        assert [o.to_json() for o in model.generate_text(prompts, config)] == cli["outputs"]
    assert set(cli["timing"]) >= {"prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s",
                                  "peak_rss_bytes"}
    assert cli["timing"]["prompt_tokens"] == int(batch["attention_mask"].sum())


def test_greedy_with_a_repetition_penalty_equals_transformers(tmp_path: Path) -> None:
    """transformers' `generate` with repetition_penalty=1.8 (over prompt and output): the same
    tokens, where its processed scores leave every step a margin over 1e-3 (a real check)."""
    reference = save_hf_decoder(tmp_path / "m", "mixtral")
    model = qmoe.load(tmp_path / "m", device=CPU)
    prompt = _ids((1, 7), VOCAB, seed=14)
    with torch.no_grad():
        theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                    do_sample=False, repetition_penalty=1.8, pad_token_id=0,
                                    output_scores=True, return_dict_in_generate=True)
    margins = [float(s[0].topk(2).values.diff().abs()) for s in theirs.scores]
    assert min(margins) > 1e-3
    ours = model.generate(prompt, max_new_tokens=12, repetition_penalty=1.8)
    eos = set(model.spec.eos_tokens)
    end = next((i + 1 for i, t in enumerate(theirs.sequences[0, 7:].tolist()) if t in eos), 12)
    assert ours[0, :7 + end].tolist() == theirs.sequences[0, :7 + end].tolist()
    plain = model.generate(prompt, max_new_tokens=12)
    assert plain[0].tolist() != ours[0].tolist()  # the penalty changed something


def test_stop_strings_cut_the_text_and_end_the_sequence() -> None:
    model = qmoe.load("tiny-mixtral", device=CPU)
    free = model.generate_text(["the cat sat"], qmoe.GenerateConfig(max_new_tokens=12))[0]
    words = free.text.split()
    assert len(words) >= 3, free.text
    stop = f" {words[2]}"
    cut = free.text[:free.text.index(stop)]
    out = model.generate_text(["the cat sat"], qmoe.GenerateConfig(max_new_tokens=12, stop=(stop, "never there")))[0]
    assert out.text == cut and len(out.tokens) < len(free.tokens)
    assert stop in model.tokenizer.decode(out.tokens) and stop not in model.tokenizer.decode(out.tokens[:-1])
    ids = model.generate(model.tokenizer("the cat sat")["input_ids"], max_new_tokens=12, stop=[stop])
    assert ids[0, -len(out.tokens):].tolist() == out.tokens
    cli = _cli_json("--model", "tiny-mixtral", "--prompt", "the cat sat", "--max-new-tokens", "12", "--stop", stop)
    assert cli["outputs"][0]["text"] == cut


class _Recorder:
    """A streamer in transformers' interface that keeps what it is given."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended = True


def test_streamers_get_the_prompt_then_each_step(tmp_path: Path) -> None:
    model = qmoe.load("tiny-mixtral", device=CPU)
    batch = model.tokenizer(["the cat sat", "a dog"])
    recorder = _Recorder()
    ids = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, streamer=recorder)
    assert recorder.ended and torch.equal(recorder.puts[0], batch["input_ids"])
    assert torch.equal(torch.stack(recorder.puts[1:], dim=1), ids[:, batch["input_ids"].shape[1]:])
    streamer = transformers.TextIteratorStreamer(model.tokenizer, skip_prompt=True)
    ids = model.generate(batch["input_ids"][:1], max_new_tokens=6, streamer=streamer)
    assert "".join(streamer) == model.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:])


def test_the_cli_streams_the_text_it_would_print_whole() -> None:
    """Without --json the text comes as it is generated, prompt by prompt, ending as the final
    outputs read; timing on stderr."""
    prompts = ["the cat sat", "a small dog ran to the"]
    args = ["--model", "tiny-mixtral", "--max-new-tokens", "8", "--batch-size", "2",
            *[a for p in prompts for a in ("--prompt", p)]]
    outputs = _cli_json(*args)["outputs"]
    result = CliRunner().invoke(main, ["generate", "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(f"[{i + 1}] {p}\n    -> {o['text']}\n" for i, (p, o) in
                                    enumerate(zip(prompts, outputs)))
    assert "timing: prefill" in result.stderr and "tokens/s" in result.stderr and "peak RSS" in result.stderr


class _Lines:
    def __init__(self):
        self.seen = []

    def on_text(self, index, text):
        self.seen.append((index, text))

    def on_output(self, index, output):
        self.seen.append((index, output))


def test_generate_text_streams_growing_text() -> None:
    model = qmoe.load("tiny-switch", device=CPU)
    listener = _Lines()
    outputs = model.generate_text(["the hedgehog lives in <extra_id_0> garden."], qmoe.GenerateConfig(max_new_tokens=8),
                                  streamer=listener)
    texts = [t for i, t in listener.seen if isinstance(t, str)]
    assert len(texts) == len(outputs[0].tokens) and listener.seen[-1] == (0, outputs[0])
    assert texts[-1] == outputs[0].text


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}w1 {{ m['content'] }} w2"
                 "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %} w3{% endif %}")


def test_chat_template_as_transformers_renders_it(tmp_path: Path) -> None:
    """A tokenizer with a chat template (tokenizer_config.json): the ids `apply_chat_template`
    gives are transformers'; `qmoe generate --chat` generates from them; models without a
    template, and Switch, refuse --chat in one line, exit 2."""
    directory = tmp_path / "chat"
    shutil.copytree(package_dir() / "assets" / "tiny-mixtral", directory)
    config = {"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"},
                {"role": "user", "content": "a dog"}]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token="<s>",
                                              eos_token="</s>", chat_template=CHAT_TEMPLATE)
    model = qmoe.load(directory, device=CPU)
    for add in (True, False):
        expected = hf.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
        assert model.tokenizer.apply_chat_template(messages, add_generation_prompt=add, tokenize=False) == expected
        assert model.tokenizer.apply_chat_template(messages, add) == hf(expected, add_special_tokens=False)["input_ids"]
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "the cat"}])
    cli = _cli_json("--model", str(directory), "--prompt", "the cat", "--chat", "--max-new-tokens", "6")
    assert model.generate(torch.tensor([ids]), max_new_tokens=6)[0, len(ids):].tolist()[:len(cli["outputs"][0]["tokens"])] \
        == cli["outputs"][0]["tokens"]
    for name, fragment in (("tiny-mixtral", "has no chat template"), ("tiny-switch", "fills spans")):
        result = CliRunner().invoke(main, ["generate", "--model", name, "--device", "cpu", "--prompt", "a <extra_id_0>",
                                           "--chat"])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in result.stderr


def test_switch_tokenizer_writes_sentinels_and_eos(tmp_path: Path) -> None:
    """`model.tokenizer` gives Switch the ids transformers' T5 tokenizers give: sentinels as
    written, </s> at the end; right-padded batches."""
    checkpoint = save_hf_switch(tmp_path / "m", sparse_step=2)
    write_tiny_tokenizer_json(checkpoint)
    model = qmoe.load(checkpoint, device=CPU)
    tok = model.tokenizer
    words = list(TINY_WORDS)
    ids = tok.encode(f"{words[0]} <extra_id_0> {words[1]}")
    assert ids[1] == tok.sentinel_ids[0] and ids[-1] == 1 and len(ids) == 4
    batch = tok([f"{words[0]} <extra_id_0>", words[2]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]] and batch["input_ids"][1, 2] == 0


def test_bad_arguments_are_one_line_value_errors(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    save_hf_decoder(directory, "mixtral")
    write_causal_tokenizer_json(directory, VOCAB)
    model = qmoe.load(directory, device=CPU)
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="--top-k must be an integer >= 1, got 0"):
        model.generate(ids, do_sample=True, top_k=0)
    with pytest.raises(ValueError, match="--repetition-penalty must be > 0"):
        model.generate(ids, repetition_penalty=0.0)
    with pytest.raises(ValueError, match=r"token ids must be an integer tensor \[batch, length\]"):
        model(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="decoder-only"):
        model(ids, decoder_input_ids=ids)
    with pytest.raises(RuntimeError, match="load it again"):
        model.to(torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_packed_model_on_a_gpu_equals_the_cpu(tiny_mixtral_compressed) -> None:
    """float32 on the GPU (packed experts through the CUDA decode-matmul): the CPU's greedy tokens,
    and logits within 1e-4 (fp32 sums of a few hundred terms in other orders, logits of size ~10)."""
    _, packed = tiny_mixtral_compressed
    cpu, gpu = qmoe.load(packed, device="cpu"), qmoe.load(packed, device="cuda:0", dtype="float32")
    assert gpu.device.type == "cuda"
    batch = cpu.tokenizer(["the cat sat", "a small dog ran to the"])
    torch.testing.assert_close(gpu(**batch).logits.cpu(), cpu(**batch).logits, atol=1e-4, rtol=0)
    assert torch.equal(gpu.generate(**batch, max_new_tokens=8), cpu.generate(**batch, max_new_tokens=8))
