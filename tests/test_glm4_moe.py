"""GLM-4.5 MoE (`glm4_moe`) beyond the parametrized decoder-family tests (which run its tiny
checkpoint, every feature of the real config on, through eval, compress, pack and generate): the
real configs at their published sizes and presets, partial RoPE under a scaled rope type and
with the other switches off, refusals, 4-bit GPTQ, and the packed checkpoint on a GPU."""

from __future__ import annotations

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
from qmoe_cli.arch.presets import load_preset

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# zai-org/GLM-4.5's config.json (the fields the model reads); GLM-4.5-Air differs where shown.
GLM_45 = {
    "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 5120, "intermediate_size": 12288,
    "moe_intermediate_size": 1536, "num_hidden_layers": 92, "first_k_dense_replace": 3, "n_routed_experts": 160,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
    "partial_rotary_factor": 0.5, "attention_bias": True, "use_qk_norm": True, "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "rope_theta": 1000000, "rope_scaling": None, "max_position_embeddings": 131072,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "eos_token_id": [151329, 151336, 151338],
    "pad_token_id": 151329,
}
GLM_45_AIR = {**GLM_45, "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
              "num_hidden_layers": 46, "first_k_dense_replace": 1, "n_routed_experts": 128,
              "routed_scaling_factor": 1.0, "use_qk_norm": False}


@pytest.mark.parametrize("preset, hub_id, raw, billions", [("glm-4.5", "zai-org/GLM-4.5", GLM_45, 355),
                                                           ("glm-4.5-air", "zai-org/GLM-4.5-Air", GLM_45_AIR, 106)])
def test_real_configs_have_the_published_sizes_and_presets(preset: str, hub_id: str, raw: dict, billions: int) -> None:
    """Parsed, the real configs hold their published parameter counts (within 1%, without the
    multi-token-prediction block) and their presets say what the configs say."""
    c = architecture_from_config(dict(raw)).config
    assert (c.head_dim, c.rotary_width, c.num_heads, c.num_kv_heads) == (128, 64, 96, 8)
    assert c.sparse_layers == tuple(range(raw["first_k_dense_replace"], raw["num_hidden_layers"]))
    assert c.router == "sigmoid_group" and c.shared_expert_size == raw["moe_intermediate_size"]
    assert c.qk_norm == ("head" if raw["use_qk_norm"] else "none") and c.attention_bias
    assert c.softmax_scale == 128 ** -0.5 and c.eos_token_ids == (151329, 151336, 151338)
    assert abs(parameter_count(dict(raw)) / (billions * 1e9) - 1) < 0.01
    found = load_preset(preset)
    assert found is not None and found.hub_id == hub_id
    assert f"top-{c.top_k} of {c.num_experts} + shared" in found.description
    assert f"~{billions}B" in found.description


# Partial RoPE on a quarter of 16-wide heads under YaRN (scaled frequencies of the rotated width,
# as transformers computes them), with the other switches of the real config off.
VARIANTS = {
    "partial-yarn": dict(head_dim=16, partial_rotary_factor=0.25, max_position_embeddings=64,
                         rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                          "rope_theta": 10000.0}),
    "plain": dict(use_qk_norm=False, attention_bias=False, n_group=1, topk_group=1, norm_topk_prob=False,
                  routed_scaling_factor=1.0, first_k_dense_replace=0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_equal_transformers(variant: str, tmp_path: Path) -> None:
    """Eval loss within 1e-5 of transformers (and, for partial RoPE, far from rotating whole
    heads), the cached decoder equal to the streamed runner, greedy tokens equal."""
    reference = save_hf_decoder(tmp_path / "model", "glm4_moe", config_override=VARIANTS[variant])
    whole_heads = None
    if variant == "partial-yarn":
        assert architecture_from_config(reference.config.to_dict()).config.rotary_width == 4
        whole_heads = with_config(reference, rope_parameters={**reference.config.rope_parameters,
                                                              "partial_rotary_factor": 1.0})
    assert_eval_equals_transformers(tmp_path / "model", reference, tmp_path, insensitive=whole_heads)
    _assert_cached_equals_streamed(tmp_path / "model", (21, 6, 14), (4, 5, 12, 13, 14, 21))
    assert_greedy_equals_transformers(tmp_path / "model", reference)


@pytest.fixture(scope="module")
def glm(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("glm") / "model"
    save_hf_decoder(directory, "glm4_moe")
    return directory


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported (glm4_moe runs silu)"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'dynamic'"),
    ({"partial_rotary_factor": 0.3, "rope_parameters": None}, "rotary_dim must be an even width"),
])
def test_unsupported_config_is_a_one_line_error(glm: Path, tmp_path: Path, change: dict, message: str) -> None:
    assert_config_change_is_one_line_error(glm, tmp_path, change, message)


@pytest.fixture(scope="module")
def four_bit(glm: Path, tmp_path_factory) -> dict:
    """The tiny GLM compressed to 4 bits with GPTQ (then packed) and with RTN."""
    return four_bit_runs(glm, tmp_path_factory.mktemp("glm-4bit"))


@pytest.mark.slow
def test_four_bit_gptq_packs_losslessly_and_beats_rtn(glm: Path, four_bit: dict) -> None:
    assert_four_bit_gptq_packs_losslessly_and_beats_rtn(glm, four_bit)


@needs_gpu
def test_packed_glm_eval_on_the_gpu(four_bit: dict) -> None:
    root = four_bit["root"]
    assert_packed_eval_on_the_gpu(root / "gptq", root / "gptq-packed", four_bit["data"])
