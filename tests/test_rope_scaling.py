"""Scaled rotary embeddings (linear, YaRN with DeepSeek's mscale, llama3) against `transformers`:
the rotary tables and MLA's softmax scale on random parameters, `qmoe eval` of checkpoints
transformers writes with long sequences, the manifest round trip, and refused types."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_models import DEEPSEEK_V3, causal_lm_loss, save_hf_decoder

from qmoe_cli.arch import architecture_from_config
from qmoe_cli.arch.decoder_only.config import DecoderConfig
from qmoe_cli.arch.decoder_only.layers import rotary_tables
from qmoe_cli.arch.decoder_only.rope import RopeScaling, inverse_frequencies, rope_fields
from qmoe_cli.cli import main
from qmoe_cli.errors import QmoeError
from qmoe_cli.formats.open import open_model

CPU = torch.device("cpu")
VOCAB = 64


def _random_rope(kind: str, g: torch.Generator) -> dict:
    """rope parameters of `kind` with random values over the ranges real configs use."""
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=g).item()

    def integer(low: int, high: int) -> int:
        return int(torch.randint(low, high, (), generator=g))

    if kind == "default":
        return {"rope_type": "default"}
    if kind == "linear":  # DeepSeek's attention reads mscale_all_dim whatever the type
        return {"rope_type": "linear", "factor": uniform(1.0, 40.0), "mscale_all_dim": uniform(0.5, 1.5)}
    if kind == "llama3":
        low = uniform(0.5, 2.0)
        return {"rope_type": "llama3", "factor": uniform(2.0, 32.0), "low_freq_factor": low,
                "high_freq_factor": low + uniform(0.5, 6.0), "original_max_position_embeddings": integer(16, 8192)}
    rope = {"rope_type": "yarn", "factor": uniform(1.5, 64.0), "original_max_position_embeddings": integer(8, 4096),
            "beta_fast": uniform(8.0, 64.0), "beta_slow": uniform(0.5, 4.0), "truncate": bool(integer(0, 2))}
    variant = integer(0, 3)  # attention factor: from factor alone, from DeepSeek's mscale pair, or given
    if variant == 1:
        rope.update(mscale=uniform(0.5, 1.5), mscale_all_dim=uniform(0.5, 1.5))
    elif variant == 2:
        rope["attention_factor"] = uniform(0.5, 2.0)
    return rope


KINDS = ("default", "linear", "yarn", "llama3")
HEAD_DIMS = (2, 6, 22, 130)


def _tables(rotary, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    return cos[0], sin[0]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_rotary_tables_equal_transformers(kind: str, head_dim: int, seed: int) -> None:
    """Bit for bit, as both compute the same fp32 operations; DeepSeek's softmax scale too."""
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    g = torch.Generator().manual_seed(1000 * seed + head_dim)
    rope = {**_random_rope(kind, g), "rope_theta": math.exp(7 + 7 * torch.rand((), generator=g).item())}
    length = 700
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  max_position_embeddings=5000)
    qwen = transformers.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=head_dim,
                                       rope_parameters=copy.deepcopy(rope))
    deepseek = transformers.DeepseekV3Config(**common, qk_rope_head_dim=head_dim, qk_nope_head_dim=6, v_head_dim=6,
                                             kv_lora_rank=8, q_lora_rank=12, rope_parameters=copy.deepcopy(rope))
    for hf_config, rotary in ((qwen, Qwen3MoeRotaryEmbedding(qwen)), (deepseek, DeepseekV3RotaryEmbedding(deepseek))):
        config = architecture_from_config(hf_config.to_dict()).config
        assert config.rope_scaling.rope_type == kind
        inv_freq, attention_factor = inverse_frequencies(config.rope_theta, config.head_dim, config.rope_scaling)
        assert torch.equal(inv_freq, rotary.inv_freq) and attention_factor == rotary.attention_scaling
        cos, sin = rotary_tables(config, length, CPU, torch.float32)
        expected_cos, expected_sin = _tables(rotary, length)
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    assert config.softmax_scale == DeepseekV3Attention(deepseek, 0).scaling


# The same parameters in the spellings a config.json may hold; transformers 5 reads each.
_SPELLINGS = [
    {"rope_scaling": {"type": "linear", "factor": 3.0}, "rope_theta": 5000.0},  # transformers 4
    {"rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 5000.0}},  # transformers 5
    {"rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 5000.0}, "rope_theta": 9.0},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_scaling": {"rope_type": "yarn", "factor": 3.0}},
    {"rope_parameters": {"rope_type": "yarn", "factor": 3.0}, "max_position_embeddings": 96},
    {"rope_parameters": {"rope_type": "yarn", "factor": None}, "max_position_embeddings": 96,
     "original_max_position_embeddings": 24},  # factor from the two lengths
    {"rope_parameters": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 48,
                         "mscale": 0, "mscale_all_dim": 1.0, "beta_fast": None, "truncate": None},
     "original_max_position_embeddings": 24},
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1, "high_freq_factor": 4,
                         "original_max_position_embeddings": 32}},
]


@pytest.mark.parametrize("spelling", _SPELLINGS)
def test_config_spellings_read_as_transformers_reads_them(spelling: dict) -> None:
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    raw = {"model_type": "qwen3_moe", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 14, "num_experts": 4,
           "num_experts_per_tok": 2, "moe_intermediate_size": 8, "max_position_embeddings": 128, **spelling}
    config = architecture_from_config(copy.deepcopy(raw)).config
    rotary = Qwen3MoeRotaryEmbedding(transformers.Qwen3MoeConfig.from_dict(copy.deepcopy(raw)))
    cos, sin = rotary_tables(config, 200, CPU, torch.float32)
    expected_cos, expected_sin = _tables(rotary, 200)
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


def test_full_size_deepseek_v3_equals_transformers() -> None:
    """Its frequencies, attention factor and softmax scale (modules built on the meta device)."""
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    config = architecture_from_config(copy.deepcopy(DEEPSEEK_V3)).config
    hf_config = transformers.DeepseekV3Config.from_dict(copy.deepcopy(DEEPSEEK_V3))
    rotary = DeepseekV3RotaryEmbedding(hf_config)
    with torch.device("meta"):
        attention = DeepseekV3Attention(hf_config, 0)
    inv_freq, attention_factor = inverse_frequencies(config.rope_theta, config.head_dim, config.rope_scaling)
    assert torch.equal(inv_freq, rotary.inv_freq) and attention_factor == rotary.attention_scaling == 1.0
    assert config.softmax_scale == attention.scaling == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert not torch.equal(inv_freq, inverse_frequencies(config.rope_theta, config.head_dim, RopeScaling())[0])


def test_manifest_round_trip_keeps_the_scaling() -> None:
    config = architecture_from_config(copy.deepcopy(DEEPSEEK_V3)).config
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["rope_scaling"]["rope_type"] == "yarn"
    assert architecture_from_config(stored).config == config


@pytest.mark.parametrize("fields, message", [
    (dict(rope_type="ntk"), "rope_type must be one of"),
    (dict(rope_type="linear", factor=0.0), "factor must be > 0"),
    (dict(rope_type="yarn", factor=4.0), "original_max_position_embeddings must be a positive integer"),
    (dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=64, low_freq_factor=4.0,
          high_freq_factor=1.0), "0 < low_freq_factor <= high_freq_factor"),
])
def test_rope_scaling_validates(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RopeScaling(**fields)


def test_per_layer_and_partial_rope_are_refused() -> None:
    with pytest.raises(QmoeError, match="per-layer"):
        rope_fields({"rope_parameters": {"full_attention": {"rope_type": "default"}}})
    with pytest.raises(QmoeError, match="partial_rotary_factor"):
        rope_fields({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}})


# Checkpoints with a short original context (16) and samples up to 3.5 times longer, so the
# scaled frequencies turn by different angles than unscaled ones would within a sample.
_LENGTHS = (56, 33, 48, 21, 40, 29)
_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}
EVAL_CASES = {
    # DeepSeek-V3's own YaRN: mscale = mscale_all_dim = 1, so cos and sin are unscaled and the
    # softmax scale grows by mscale(40)^2 = 1.87.
    "deepseek_v3-yarn": ("deepseek_v3", dict(qk_rope_head_dim=8, max_position_embeddings=640,
                                             rope_scaling={**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # Qwen3's YaRN: cos and sin times 1 + 0.1 ln 4.
    "qwen3_moe-yarn": ("qwen3_moe", dict(max_position_embeddings=64, rope_scaling={**_YARN, "factor": 4.0})),
    "qwen3_moe-linear": ("qwen3_moe", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mixtral-llama3": ("mixtral", dict(max_position_embeddings=128,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "olmoe-linear": ("olmoe", dict(rope_scaling={"type": "linear", "factor": 2.5})),
}


def _sequences(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in _LENGTHS]


def _jsonl(path: Path, sequences: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in sequences))
    return path


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def _eval_loss(model: Path, data: Path) -> float:
    code, out, err = _cli("eval", "--model", str(model), "--data", str(data), "--device", "cpu", "--json")
    assert code == 0, err
    return json.loads(out)["loss"]


def _with_rope(model, rope: dict | None):
    """The same weights under other rope parameters (None: unscaled RoPE)."""
    raw = model.config.to_dict()
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw["rope_parameters"]["rope_theta"],
                              **(rope or {})}
    other = type(model)(type(model.config).from_dict(raw)).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval_equals_transformers_with_scaled_rope(case: str, tmp_path: Path) -> None:
    family, override = EVAL_CASES[case]
    reference = save_hf_decoder(tmp_path / "model", family, config_override=override)
    assert reference.config.rope_parameters["rope_type"] != "default"
    sequences = _sequences(seed=len(case))
    expected = causal_lm_loss(reference, sequences)
    assert _eval_loss(tmp_path / "model", _jsonl(tmp_path / "data.jsonl", sequences)) == pytest.approx(expected,
                                                                                                      rel=1e-5)
    # The check can fail: with the scaling ignored the loss moves by far more than the tolerance.
    assert abs(causal_lm_loss(_with_rope(reference, None), sequences) - expected) > 1e-3 * expected
    if family == "deepseek_v3":  # and with only the softmax's mscale ignored (same cos, sin)
        rope = {k: v for k, v in reference.config.rope_parameters.items() if not k.startswith("mscale")}
        unscaled_softmax = _with_rope(reference, {**rope, "attention_factor": 1.0})
        assert abs(causal_lm_loss(unscaled_softmax, sequences) - expected) > 1e-3 * expected


def test_compressed_checkpoint_keeps_the_scaling(tmp_path: Path) -> None:
    """The quantized checkpoint's manifest carries the rope scaling to `qmoe eval`."""
    family, override = EVAL_CASES["deepseek_v3-yarn"]
    save_hf_decoder(tmp_path / "model", family, config_override=override)
    calib = _jsonl(tmp_path / "calib.jsonl", _sequences(seed=5))
    code, _, err = _cli("compress", "--model", str(tmp_path / "model"), "--calib", str(calib), "--out",
                        str(tmp_path / "rtn"), "--bits", "8", "--method", "rtn", "--device", "cpu")
    assert code == 0, err
    original = open_model(str(tmp_path / "model")).weights.arch.config
    quantized = open_model(str(tmp_path / "rtn")).weights.arch.config
    assert isinstance(quantized, DecoderConfig) and quantized == original
    assert quantized.rope_scaling.rope_type == "yarn" and quantized.rope_scaling.softmax_mscale > 1


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen3") / "model"
    save_hf_decoder(directory, "qwen3_moe")
    return directory


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope type 'dynamic' is not supported: dynamic NTK scaling"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6,
      "original_max_position_embeddings": 16}, "rope type 'longrope' is not supported: LongRoPE"),
    ({"rope_type": "ntk-by-parts"}, "rope type 'ntk-by-parts' is not supported (supported: default, linear"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}, "needs low_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16, "low_freq_factor": 4.0,
      "high_freq_factor": 1.0}, "0 < low_freq_factor <= high_freq_factor"),
])
def test_unsupported_rope_is_a_one_line_error(qwen3: Path, tmp_path: Path, rope: dict, message: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(qwen3, model)
    raw = json.loads((model / "config.json").read_text())
    raw["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    (model / "config.json").write_text(json.dumps(raw))
    data = _jsonl(tmp_path / "data.jsonl", _sequences(seed=0))
    code, _, err = _cli("eval", "--model", str(model), "--data", str(data), "--device", "cpu")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err


def test_default_scaling_is_plain_rope() -> None:
    """Unscaled frequencies are theta^(-2i/d), and the tables carry no factor."""
    inv_freq, factor = inverse_frequencies(500.0, 10, RopeScaling())
    expected = torch.tensor([500.0 ** (-2 * i / 10) for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert factor == 1.0
