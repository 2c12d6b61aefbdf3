"""DeepSeek-V2 (`deepseek_v2`) beyond the parametrized decoder-family tests (which run its tiny
checkpoint, DeepSeek-V2's features on: group-limited softmax routing times 16, two shared
experts, a dense first block, MLA with a low-rank query, YaRN with the softmax mscale, through
eval, compress, pack and generate): the real configs at their published sizes and presets, the
router against a token-by-token reference, V2-Lite's shape (no low-rank query, greedy routing),
refusals, 4-bit GPTQ, and the packed checkpoint on a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from family_checks import (
    assert_config_change_is_one_line_error,
    assert_eval_equals_transformers,
    assert_four_bit_gptq_packs_losslessly_and_beats_rtn,
    assert_greedy_equals_transformers,
    assert_packed_eval_on_the_gpu,
    four_bit_runs,
    parameter_count,
    with_config,
)
from hf_models import save_hf_decoder
from test_generate_decoder import _assert_cached_equals_streamed

from qmoe_cli.arch import architecture_from_config
from qmoe_cli.arch.decoder_only.config import DecoderConfig
from qmoe_cli.arch.decoder_only.router import Router
from qmoe_cli.arch.presets import load_preset

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# deepseek-ai/DeepSeek-V2's config.json (the fields the model reads); DeepSeek-V2-Lite differs
# where shown.
DEEPSEEK_V2 = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 5120, "intermediate_size": 12288,
    "moe_intermediate_size": 1536, "num_hidden_layers": 60, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "n_routed_experts": 160, "n_shared_experts": 2, "num_experts_per_tok": 6, "topk_method": "group_limited_greedy",
    "n_group": 8, "topk_group": 3, "norm_topk_prob": False, "scoring_func": "softmax", "routed_scaling_factor": 16.0,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "attention_bias": False, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001,
}
DEEPSEEK_V2_LITE = {**DEEPSEEK_V2, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                    "num_hidden_layers": 27, "n_routed_experts": 64, "topk_method": "greedy", "n_group": 1,
                    "topk_group": 1, "routed_scaling_factor": 1.0, "num_attention_heads": 16,
                    "num_key_value_heads": 16, "q_lora_rank": None}


@pytest.mark.parametrize("preset, raw, billions", [("deepseek-v2", DEEPSEEK_V2, 236),
                                                   ("deepseek-v2-lite", DEEPSEEK_V2_LITE, 15.7)])
def test_real_configs_have_the_published_sizes_and_presets(preset: str, raw: dict, billions: float) -> None:
    """Parsed, the real configs hold their published parameter counts (within 1%), their latent
    cache is kv_lora_rank + rope = 576 values per position, the softmax scale carries YaRN's
    mscale(40, 0.707)^2, and their presets say what the configs say."""
    arch = architecture_from_config(dict(raw))
    c = arch.config
    grouped = raw["topk_method"] == "group_limited_greedy"
    assert c.router == ("softmax_group" if grouped else "softmax_topk") and not c.norm_topk_prob
    assert (c.n_group, c.topk_group, c.routed_scaling_factor) == (raw["n_group"], raw["topk_group"],
                                                                 raw["routed_scaling_factor"])
    assert c.sparse_layers == tuple(range(1, raw["num_hidden_layers"])) and c.shared_expert_size == 2 * c.moe_intermediate_size
    assert c.attention == "mla" and c.rope_interleave and c.q_lora_rank == raw["q_lora_rank"]
    mscale = 0.1 * 0.707 * math.log(40) + 1
    assert c.softmax_scale == pytest.approx((128 + 64) ** -0.5 * mscale ** 2, rel=1e-12)
    assert arch.cache_bytes("decoder", 1, 1, 0, torch.bfloat16) == (512 + 64) * 2
    assert abs(parameter_count(dict(raw)) / (billions * 1e9) - 1) < 0.01
    found = load_preset(preset)
    assert found is not None and found.hub_id == f"deepseek-ai/{'DeepSeek-V2-Lite' if 'lite' in preset else 'DeepSeek-V2'}"
    assert f"top-{c.top_k} of {c.num_experts} + 2 shared" in found.description and f"~{billions}B" in found.description


def _router_reference(logits: torch.Tensor, c: DecoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """group_limited_greedy token by token, as DeepSeek-V2's paper states it: softmax; keep the
    topk_group groups with the highest single score; the top k experts among them; weights are
    their softmax scores times routed_scaling_factor -> a set of (expert, weight) per token."""
    size = c.num_experts // c.n_group
    out = []
    for row in torch.softmax(logits.double(), dim=-1):
        best = sorted(range(c.n_group), key=lambda g: -float(row[g * size:(g + 1) * size].max()))[:c.topk_group]
        candidates = [e for g in best for e in range(g * size, (g + 1) * size)]
        chosen = sorted(candidates, key=lambda e: -float(row[e]))[:c.top_k]
        out.append({e: float(row[e]) * c.routed_scaling_factor for e in chosen})
    return out


@pytest.mark.parametrize("experts, groups, topk_group, k, d", [(12, 4, 2, 3, 7), (16, 8, 3, 6, 5), (9, 3, 1, 2, 11),
                                                               (10, 5, 5, 4, 3)])
def test_group_limited_router_equals_a_token_by_token_reference(experts: int, groups: int, topk_group: int, k: int,
                                                                d: int) -> None:
    c = DecoderConfig(model_type="deepseek_v2", vocab_size=8, hidden_size=d, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=2, num_experts=experts, top_k=k, moe_intermediate_size=4,
                      sparse_layers=(0,), router="softmax_group", n_group=groups, topk_group=topk_group,
                      routed_scaling_factor=16.0)
    g = torch.Generator().manual_seed(experts * 100 + k)
    router = Router(c)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, d, generator=g))
    x = torch.randn(97, d, generator=g)
    with torch.no_grad():
        index, weight = router(x)
    expected = _router_reference(x @ router.weight.detach().T, c)
    assert index.shape == weight.shape == (97, k) and weight.dtype == torch.float32
    for t in range(97):
        got = {int(e): float(w) for e, w in zip(index[t], weight[t])}
        assert got.keys() == expected[t].keys()
        for e, w in got.items():
            assert w == pytest.approx(expected[t][e], rel=1e-6)  # fp32 softmax against fp64


# DeepSeek-V2-Lite's shape: one q_proj (no low-rank query), greedy top-k over all experts, no scale.
LITE = dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0)


def test_lite_equals_transformers(tmp_path: Path) -> None:
    """V2-Lite's shape: eval within 1e-5 of transformers, the latent cache equal to the streamed
    runner, greedy tokens equal to transformers'."""
    reference = save_hf_decoder(tmp_path / "model", "deepseek_v2", config_override=LITE)
    assert reference.config.q_lora_rank is None and reference.config.topk_method == "greedy"
    assert_eval_equals_transformers(tmp_path / "model", reference, tmp_path)
    _assert_cached_equals_streamed(tmp_path / "model", (37, 9, 20), (7, 8, 9, 19, 20, 36, 37))
    assert_greedy_equals_transformers(tmp_path / "model", reference)


@pytest.fixture(scope="module")
def v2(tmp_path_factory) -> tuple[Path, object]:
    directory = tmp_path_factory.mktemp("deepseek-v2") / "model"
    return directory, save_hf_decoder(directory, "deepseek_v2")


@pytest.mark.parametrize("change", [dict(topk_method="greedy"), dict(routed_scaling_factor=1.0)],
                         ids=["greedy", "unscaled"])
def test_routing_changes_move_transformers_loss(v2, tmp_path: Path, change: dict) -> None:
    """The parity test can fail: group-limited choice and the scale each move transformers' loss
    by more than 1e-4 on the tiny checkpoint, which qmoe matches within 1e-5."""
    directory, reference = v2
    assert_eval_equals_transformers(directory, reference, tmp_path, insensitive=with_config(reference, **change))


@pytest.mark.parametrize("change, message", [
    ({"topk_method": "noaux_tc"}, "topk_method 'noaux_tc' is not supported for deepseek_v2"),
    ({"norm_topk_prob": True}, "norm_topk_prob True is not supported for deepseek_v2: transformers ignores it"),
    ({"moe_layer_freq": 2}, "moe_layer_freq 2 is not supported"),
    ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid' is not supported"),
    ({"mlp_bias": True}, "mlp_bias (biases on the dense and shared MLPs) is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
])
def test_unsupported_config_is_a_one_line_error(v2, tmp_path: Path, change: dict, message: str) -> None:
    assert_config_change_is_one_line_error(v2[0], tmp_path, change, message)


@pytest.fixture(scope="module")
def four_bit(v2, tmp_path_factory) -> dict:
    """The tiny DeepSeek-V2 compressed to 4 bits with GPTQ (then packed) and with RTN."""
    return four_bit_runs(v2[0], tmp_path_factory.mktemp("deepseek-v2-4bit"))


@pytest.mark.slow
def test_four_bit_gptq_packs_losslessly_and_beats_rtn(v2, four_bit: dict) -> None:
    assert_four_bit_gptq_packs_losslessly_and_beats_rtn(v2[0], four_bit)


@needs_gpu
def test_packed_deepseek_v2_eval_on_the_gpu(four_bit: dict) -> None:
    root = four_bit["root"]
    assert_packed_eval_on_the_gpu(root / "gptq", root / "gptq-packed", four_bit["data"])
