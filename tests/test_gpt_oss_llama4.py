"""GPT-OSS and Llama 4 text beyond the parametrized family tests (tests/test_decoder_families.py,
tests/test_generate_decoder.py run both end to end against transformers): their new shared
layers against transformers' own functions on odd shapes, the published configs, and the
config features qmoe refuses with one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from hf_models import causal_lm_loss, save_hf_decoder

from qmoe_cli.arch import architecture_from_config
from qmoe_cli.arch.decoder_only.config import DecoderConfig
from qmoe_cli.arch.decoder_only.incremental import DecoderIncrementalStack
from qmoe_cli.arch.decoder_only.layers import causal_bias, scaled_attention
from qmoe_cli.arch.decoder_only.router import Router
from qmoe_cli.cli import main

# openai/gpt-oss-120b's config.json (transformers 4 spelling; the fields the model reads)
GPT_OSS_120B = {
    "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
    "num_hidden_layers": 36, "num_local_experts": 128, "num_experts_per_tok": 4, "experts_per_token": 4,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 18, "attention_bias": True, "swiglu_limit": 7.0,
    "rms_norm_eps": 1e-05, "rope_theta": 150000, "max_position_embeddings": 131072, "initial_context_length": 4096,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "eos_token_id": 200002, "pad_token_id": 199999, "tie_word_embeddings": False,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}
GPT_OSS_20B = {**GPT_OSS_120B, "num_hidden_layers": 24, "num_local_experts": 32,
               "layer_types": ["sliding_attention", "full_attention"] * 12}
# meta-llama/Llama-4-Scout-17B-16E's text_config (model_type llama4_text inside the multimodal config)
LLAMA4_SCOUT = {
    "model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
    "head_dim": 128, "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
    "use_qk_norm": True, "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192,
    "attn_scale": 0.1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 10485760,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018, "bos_token_id": 200000,
}


def test_published_configs_parse_to_their_shapes() -> None:
    arch = architecture_from_config(GPT_OSS_120B)
    c = arch.config
    assert (arch.num_experts, c.top_k, len(arch.sparse_blocks())) == (128, 4, 36)
    assert arch.expert.shapes == {"gate_proj": (2880, 2880), "up_proj": (2880, 2880), "down_proj": (2880, 2880)}
    assert c.layer_span(0) == (128, None) and c.layer_span(1) == (None, None)
    assert c.rope_scaling.rope_type == "yarn" and not c.rope_scaling.truncate and c.attention_sinks
    assert architecture_from_config(GPT_OSS_20B).num_experts == 32

    arch = architecture_from_config(LLAMA4_SCOUT)
    c = arch.config
    assert (arch.num_experts, c.top_k, len(arch.sparse_blocks())) == (16, 1, 48)
    assert arch.expert.shapes["down_proj"] == (5120, 8192) and arch.shared_expert.shapes["up_proj"] == (8192, 5120)
    assert c.nope_layers == tuple(range(3, 48, 4)) and c.layer_span(3) == (None, None)
    assert c.layer_span(0) == (None, 8192) and c.qk_norm == "l2" and c.attn_temperature == (8192.0, 0.1)
    assert c.routing_on_input and c.eos_token_ids == (200001, 200007, 200008)
    wrapped = architecture_from_config({"model_type": "llama4", "text_config": LLAMA4_SCOUT}).config
    assert wrapped.tensor_prefix == "language_model." and wrapped.nope_layers == c.nope_layers
    maverick = architecture_from_config({**LLAMA4_SCOUT, "num_local_experts": 128, "interleave_moe_layer_step": 2})
    assert [i for _, i in maverick.sparse_blocks()] == list(range(1, 48, 2))
    assert maverick.config.intermediate_size == 16384


@pytest.mark.parametrize("raw, message", [
    ({**GPT_OSS_20B, "layer_types": ["chunked_attention"] * 24}, "layer_types 'chunked_attention' is not supported"),
    ({**LLAMA4_SCOUT, "layer_types": ["sliding_attention"] * 48}, "layer_types 'sliding_attention' is not supported"),
    ({**LLAMA4_SCOUT, "hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({**LLAMA4_SCOUT, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
    ({"model_type": "llama4", "text_config": {**LLAMA4_SCOUT, "hidden_act": "gelu"}}, "hidden_act 'gelu'"),
    ({**GPT_OSS_20B, "model_type": "gpt_oss_vision"}, "model_type 'gpt_oss_vision' is not supported"),
])
def test_unsupported_features_are_refused_by_name(raw: dict, message: str) -> None:
    from qmoe_cli.errors import QmoeError

    with pytest.raises(QmoeError, match=message):
        architecture_from_config(raw)


def test_an_unsupported_feature_is_a_one_line_cli_error(tmp_path: Path) -> None:
    model = tmp_path / "model"
    save_hf_decoder(model, "llama4_text")
    raw = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**raw, "layer_types": ["sliding_attention"] * 4}))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    result = CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(data), "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "layer_types 'sliding_attention' is not supported" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("batch, heads, kv, t, hd, window", [(2, 6, 3, 7, 5, 3), (1, 4, 1, 13, 8, None),
                                                            (3, 2, 2, 1, 3, None)])
def test_attention_with_sinks_equals_transformers(batch: int, heads: int, kv: int, t: int, hd: int,
                                                  window: int | None) -> None:
    """`scaled_attention` with sinks against GPT-OSS's eager attention (fp32: a softmax over t + 1
    logits and a t-term sum: a few eps)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    g = torch.Generator().manual_seed(t * heads)
    q, k, v = (torch.randn(batch, h, t, hd, generator=g) for h in (heads, kv, kv))
    sinks = torch.randn(heads, generator=g) * 2
    bias = causal_bias(t, window, torch.device("cpu"))
    module = SimpleNamespace(num_key_value_groups=heads // kv, sinks=sinks, training=False)
    theirs, _ = eager_attention_forward(module, q, k, v, bias[None, None], scaling=hd ** -0.5)
    ours = scaled_attention(q, k, v, bias, hd ** -0.5, sinks)
    torch.testing.assert_close(ours, theirs.reshape(batch, t, heads * hd), rtol=0, atol=8 * t * 1.2e-7)


@pytest.mark.parametrize("chunk, lengths", [(3, (11, 5, 1)), (4, (9, 9)), (1, (6, 2))])
def test_chunked_cache_mask_equals_transformers(chunk: int, lengths: tuple[int, ...]) -> None:
    """A left-padded batch's chunked mask in the decoding cache (chunks from each sequence's first
    token) against transformers' `chunked_causal_mask_function` with the same left padding."""
    from transformers.masking_utils import chunked_causal_mask_function

    config = DecoderConfig(model_type="llama4_text", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=4, num_experts=2, top_k=1, moe_intermediate_size=4,
                           sparse_layers=(0,), layer_types=("chunked",), attention_chunk_size=chunk)
    longest = max(lengths)
    mask = torch.tensor([[False] * (longest - n) + [True] * n for n in lengths])
    cache = DecoderIncrementalStack(config, torch.device("cpu"), torch.float32).new_cache(len(lengths), longest, mask)
    _, _, bias = cache.step(0, longest, torch.device("cpu"), config.layer_span(0))
    allowed = bias[:, 0] == 0  # [B, t, S]
    function = chunked_causal_mask_function(chunk, torch.tensor([longest - n for n in lengths]))
    for b in range(len(lengths)):
        for q in range(longest - lengths[b], longest):  # real queries (padding rows are never read)
            expected = [bool(function(torch.tensor(b), 0, torch.tensor(q), torch.tensor(kv))) and bool(mask[b, kv])
                        for kv in range(longest)]
            assert allowed[b, q].tolist() == expected, (b, q)


@pytest.mark.parametrize("router, kind", [("softmax_selected", "GptOssTopKRouter"), ("sigmoid_topk", "Llama4Router")])
def test_routers_equal_transformers(router: str, kind: str) -> None:
    """Indices exactly; weights within fp32 rounding of a k-term softmax / a sigmoid."""
    import transformers.models.gpt_oss.modeling_gpt_oss as gpt_oss
    import transformers.models.llama4.modeling_llama4 as llama4

    experts, k, d = 7, 3 if router == "softmax_selected" else 1, 11
    hf_config = SimpleNamespace(num_experts_per_tok=k, num_local_experts=experts, hidden_size=d)
    config = DecoderConfig(model_type="x", vocab_size=8, hidden_size=d, num_layers=1, num_heads=1, num_kv_heads=1,
                           head_dim=2, num_experts=experts, top_k=k, moe_intermediate_size=4, sparse_layers=(0,),
                           router=router, router_bias=router == "softmax_selected")
    ours = Router(config)
    theirs = (gpt_oss.GptOssTopKRouter if kind == "GptOssTopKRouter" else llama4.Llama4Router)(hf_config)
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            param.copy_(torch.randn(param.shape, generator=g))
            getattr(ours, name).copy_(param)
    x = torch.randn(97, d, generator=g)
    index, weight = ours(x)
    if kind == "GptOssTopKRouter":
        _, scores, hf_index = theirs(x)
    else:
        dense, _ = theirs(x)
        scores, hf_index = dense.topk(k, dim=-1)
    assert torch.equal(index, hf_index)
    torch.testing.assert_close(weight, scores, rtol=4 * 1.2e-7, atol=0)


def test_llama4_scout_rope_with_equal_frequency_factors_equals_transformers(tmp_path: Path) -> None:
    """Scout's llama3 rope has low_freq_factor == high_freq_factor (a hard switch, no medium band),
    which transformers only warns about: the tiny Llama 4 with it, evaluated against transformers."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
            "high_freq_factor": 1.0, "original_max_position_embeddings": 8}
    model = tmp_path / "model"
    reference = save_hf_decoder(model, "llama4_text", config_override={"rope_parameters": rope})
    g = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (19, 7, 12)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in sequences))
    result = CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(data), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loss"] == pytest.approx(causal_lm_loss(reference, sequences), rel=1e-5)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_packed_eval_on_the_gpu_equals_the_cpu(family: str, tmp_path: Path) -> None:
    """`qmoe eval --device cuda` of a packed checkpoint (fp32): Llama 4's experts through the
    grouped kernels (each routing slot's input weighted), GPT-OSS's clamped SwiGLU through the CPU
    decode (no grouped kernel runs it, with a warning), both what the CPU computes."""
    model = tmp_path / "model"
    save_hf_decoder(model, family)
    g = torch.Generator().manual_seed(5)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input_ids": torch.randint(0, 64, (n,), generator=g).tolist()}) + "\n"
                            for n in (24, 17, 30, 9)))
    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(data), "--out", str(out),
                                       "--bits", "ternary", "--device", "cpu", "--pack"])
    assert result.exit_code == 0, result.output
    losses = []
    for device in ("cuda", "cpu"):
        result = CliRunner().invoke(main, ["eval", "--model", f"{out}-packed", "--data", str(data), "--device", device,
                                           "--dtype", "float32", "--json"])
        assert result.exit_code == 0, result.output
        losses.append(json.loads(result.stdout)["loss"])
    assert abs(losses[0] - losses[1]) <= 1e-5 * losses[1], losses


def test_fixtures_cover_every_feature() -> None:
    """The tiny checkpoints the parity tests use turn each feature on (a feature left at its
    neutral value would pass any implementation)."""
    import transformers
    from hf_models import _COMMON, DECODER_FAMILIES

    for family in ("gpt_oss", "llama4_text"):
        name, _, extra = DECODER_FAMILIES[family]
        config = getattr(transformers, name)(**{**_COMMON, **extra})
        arch = architecture_from_config(json.loads(config.to_json_string()))
        c = arch.config
        if family == "gpt_oss":
            assert set(c.layer_types) == {"sliding", "full"} and c.sliding_window < 21 and c.swiglu_limit < 2
            assert c.rope_scaling.rope_type == "yarn" and c.attention_sinks and c.expert_bias and c.output_bias
        else:
            assert c.nope_layers and c.attn_temperature[0] < 20 and c.attention_chunk_size < 21
            assert c.sparse_layers == (1, 3) and c.intermediate_size != c.moe_intermediate_size
            assert c.rope_scaling.rope_type == "llama3" and c.qk_norm == "l2" and c.shared_expert_size


def test_multimodal_llama4_checkpoint_reads_its_text_model(tmp_path: Path) -> None:
    """model_type llama4 (Meta's published layout): the text model under `language_model.`, the
    vision tower beside it unread; eval equals transformers' text model, and the compressed and
    packed checkpoints evaluate alike."""
    import transformers
    from hf_models import _COMMON, DECODER_FAMILIES

    text = {**_COMMON, **DECODER_FAMILIES["llama4_text"][2]}
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=28,
                  patch_size=14, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16)
    torch.manual_seed(0)
    model = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(text_config=text,
                                                                                  vision_config=vision)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.normal_(0, 1.0)
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    g = torch.Generator().manual_seed(2)
    sequences = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (19, 7, 12, 24)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in sequences))

    def loss(path: Path) -> float:
        result = CliRunner().invoke(main, ["eval", "--model", str(path), "--data", str(data), "--device", "cpu",
                                           "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["loss"]

    assert loss(directory) == pytest.approx(causal_lm_loss(model.language_model, sequences), rel=1e-5)
    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["compress", "--model", str(directory), "--calib", str(data), "--out", str(out),
                                       "--bits", "ternary", "--device", "cpu", "--pack"])
    assert result.exit_code == 0, result.output
    assert loss(Path(f"{out}-packed")) == pytest.approx(loss(out), rel=1e-6)
