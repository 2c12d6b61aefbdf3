"""Placement of blocks on GPUs and host memory: a pure function of sizes and budgets (CPU tests),
plus GPU runs (skipped without one) that place, stream and split the packed tiny-switch."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from qmoe_cli.cli import main
from qmoe_cli.data.tokenizer import load_tokenizer
from qmoe_cli.errors import QmoeError
from qmoe_cli.formats.open import open_model
from qmoe_cli.run.generate import parse_prompt
from qmoe_cli.run.placement import (
    HOST,
    BlockNeed,
    Placement,
    block_bytes,
    format_bytes,
    parse_bytes,
    plan_model,
    plan_placement,
)

MB = 1 << 20


def _needs(encoder: int = 4, decoder: int = 4, size: int = 10 * MB, cache: int = MB) -> list[BlockNeed]:
    return ([BlockNeed(f"encoder.{i}", size, 0, 1) for i in range(encoder)]
            + [BlockNeed(f"decoder.{i}", size, cache, 32) for i in range(decoder)])


def test_everything_fits_on_one_device() -> None:
    plan = plan_placement(_needs(), {"cuda:0": 100 * MB})
    assert set(plan.home.values()) == {"cuda:0"} and not plan.streamed and plan.stream_device is None
    assert plan.used["cuda:0"] == 8 * 10 * MB + 4 * MB


def test_decoder_blocks_take_the_gpus_first_and_spill_to_the_second() -> None:
    plan = plan_placement(_needs(), {"cuda:0": 50 * MB, "cuda:1": 50 * MB})
    assert [plan.home[f"decoder.{i}"] for i in range(4)] == ["cuda:0"] * 4
    assert [plan.home[f"encoder.{i}"] for i in range(4)] == ["cuda:1"] * 4
    assert not plan.streamed
    assert all(plan.used[d] <= 50 * MB for d in plan.used)


def test_what_does_not_fit_streams_encoder_blocks_first_with_two_staging_slots() -> None:
    plan = plan_placement(_needs(), {"cuda:0": 80 * MB})
    # 4 decoder blocks (44 MB) stay; staging two 10 MB slots leaves room for one encoder block.
    assert [plan.home[f"decoder.{i}"] for i in range(4)] == ["cuda:0"] * 4
    assert plan.streamed == ["encoder.1", "encoder.2", "encoder.3"]
    assert plan.home["encoder.0"] == "cuda:0" and plan.stream_device == "cuda:0"
    assert plan.staging_bytes == 20 * MB and plan.used["cuda:0"] == 44 * MB + 10 * MB + 20 * MB
    lines = plan.describe()
    assert "decoder.0-3" in lines[0] and "encoder.1-3" in lines[-1] and "one block ahead" in lines[-1]


def test_streaming_evicts_resident_blocks_until_staging_fits() -> None:
    # 45 MB: four decoder blocks (44 MB) would fit, but then nothing is left to stage the encoder.
    plan = plan_placement(_needs(), {"cuda:0": 45 * MB})
    assert plan.used["cuda:0"] <= 45 * MB
    assert all(home == HOST for name, home in plan.home.items() if name.startswith("encoder"))
    resident = [n for n, h in plan.home.items() if h == "cuda:0"]
    assert resident and all(n.startswith("decoder") for n in resident)
    streamed_caches = sum(MB for n in plan.streamed if n.startswith("decoder"))
    assert plan.used["cuda:0"] == len(resident) * 11 * MB + 20 * MB + streamed_caches


def test_a_device_too_small_to_stage_one_block_is_an_error() -> None:
    with pytest.raises(QmoeError, match="two copies of"):
        plan_placement(_needs(), {"cuda:0": 15 * MB})


def test_uneven_blocks_and_budgets_never_overfill() -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(50):
        n = int(torch.randint(1, 12, (1,), generator=g))
        sizes = torch.randint(1, 40, (n,), generator=g).tolist()
        needs = [BlockNeed(f"decoder.{i}", s * MB, MB, 8) for i, s in enumerate(sizes)]
        budgets = {f"cuda:{d}": int(b) * MB for d, b in enumerate(torch.randint(90, 200, (2,), generator=g))}
        plan = plan_placement(needs, budgets)
        assert all(plan.used[d] <= budgets[d] for d in budgets)
        planned = {d: sum(n.weight_bytes + n.cache_bytes for n in needs if plan.home[n.name] == d) for d in budgets}
        if plan.streamed:
            planned["cuda:0"] += plan.staging_bytes + sum(n.cache_bytes for n in needs if n.name in plan.streamed)
            assert plan.staging_bytes == 2 * max(n.weight_bytes for n in needs if n.name in plan.streamed)
        assert planned == dict(plan.used)


def test_parse_and_format_bytes() -> None:
    assert parse_bytes("70GiB") == 70 << 30 and parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512mib") == 512 << 20 and parse_bytes("1.5TiB") == int(1.5 * (1 << 40))
    assert parse_bytes("1234") == 1234
    for bad in ("", "GiB", "12 parsecs", "-3GB"):
        with pytest.raises(ValueError, match="--max-memory"):
            parse_bytes(bad)
    assert format_bytes(3 << 30) == "3.00 GiB" and format_bytes(5 << 20) == "5.0 MiB"


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("place") / "tern"
    result = CliRunner().invoke(main, ["compress", "--calib-samples", "32", "--out", str(out), "--pack", "--device",
                                       "cpu", "--json"])
    assert result.exit_code == 0, result.output
    return out.with_name("tern-packed")


def test_block_bytes_of_original_and_packed_checkpoints(packed_dir) -> None:
    opened = open_model("tiny-switch")
    c = opened.weights.arch.config
    dense = block_bytes(opened.weights, "encoder", 2, torch.float32)
    sparse = block_bytes(opened.weights, "encoder", 3, torch.float32)
    attention = (4 * c.d_model * c.num_heads * c.d_kv + 2 * c.d_model) * 4
    assert dense == attention + 2 * c.d_model * c.d_ff * 4
    assert sparse == attention + (c.num_experts * (2 * c.d_model * c.d_ff + c.d_model)) * 4
    assert block_bytes(opened.weights, "encoder", 3, torch.bfloat16) * 2 == sparse
    packed = open_model(str(packed_dir)).weights
    files = sum(p.stat().st_size for p in (packed_dir / "experts" / "encoder-003").iterdir())
    assert block_bytes(packed, "encoder", 3, torch.float32) == attention + c.num_experts * c.d_model * 4 + files
    assert files < c.num_experts * 2 * c.d_model * c.d_ff


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


GEN_PROMPTS = ("the hedgehog lives in <extra_id_0> garden.", "a whale <extra_id_0> at night and <extra_id_1> food.")


def _gen(*args: str) -> tuple[list, str]:
    prompts = [a for p in GEN_PROMPTS for a in ("--prompt", p)]
    result = CliRunner().invoke(main, ["generate", "--json", "--max-new-tokens", "16", "--dtype", "float32",
                                       *prompts, *args])
    assert result.exit_code == 0, result.output
    return [o["tokens"] for o in json.loads(result.stdout)["outputs"]], result.stderr


def _cap(packed_dir, devices: int, wanted) -> tuple[int, Placement]:
    """The largest per-GPU cap (64 KiB steps) at which `qmoe generate` with GEN_PROMPTS plans a
    placement satisfying `wanted`: what makes the GPU tests stream or split for sure."""
    opened = open_model(str(packed_dir))
    tokenizer = load_tokenizer(packed_dir)
    longest = max(len(parse_prompt(p, tokenizer, "t", 256, 955, 1).ids) for p in GEN_PROMPTS) + 1
    total = sum(block_bytes(opened.weights, s, i, torch.float32) for s in ("encoder", "decoder") for i in range(4))
    for cap in range(total + (4 << 20), 0, -(64 << 10)):
        try:
            plan = plan_model(opened.weights, {f"cuda:{d}": cap for d in range(devices)}, torch.float32, 2, 16, longest)
        except QmoeError:
            continue
        if wanted(plan):
            return cap, plan
    raise AssertionError("no cap gives the wanted placement")


def _streams_encoder(plan: Placement) -> bool:
    return bool(plan.streamed) and all(plan.home[f"decoder.{i}"] == "cuda:0" for i in range(4))


def _splits(plan: Placement) -> bool:
    return not plan.streamed and {"cuda:0", "cuda:1"} <= set(plan.home.values())


def test_whole_model_plans_stream_the_encoder_first_and_split_over_two_gpus(packed_dir) -> None:
    _, plan = _cap(packed_dir, 1, _streams_encoder)
    assert plan.streamed and all(name.startswith("encoder") for name in plan.streamed)
    assert plan.used["cuda:0"] <= plan.budgets["cuda:0"]
    _, split = _cap(packed_dir, 2, _splits)
    assert all(split.home[f"decoder.{i}"] == "cuda:0" for i in range(4))


@GPU
def test_gpu_generation_equals_cpu_resident_and_streamed(packed_dir) -> None:
    cpu, _ = _gen("--model", str(packed_dir), "--device", "cpu")
    gpu, placed = _gen("--model", str(packed_dir), "--device", "cuda:0")
    assert gpu == cpu and "placement: cuda:0 holds 8 blocks" in placed
    cap, _ = _cap(packed_dir, 1, _streams_encoder)
    streamed, placed = _gen("--model", str(packed_dir), "--device", "cuda:0", "--max-memory", str(cap))
    assert streamed == cpu and "host memory streams" in placed


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_split_the_model(packed_dir) -> None:
    cpu, _ = _gen("--model", str(packed_dir), "--device", "cpu")
    cap, _ = _cap(packed_dir, 2, _splits)
    split, placed = _gen("--model", str(packed_dir), "--device", "cuda:0", "--device", "cuda:1",
                         "--max-memory", str(cap))
    assert split == cpu and "placement: cuda:1 holds" in placed and "host memory" not in placed


def test_device_budgets_subtract_the_workspace_and_apply_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    from qmoe_cli.run import placement

    free = {0: 80 << 30, 1: 40 << 30}
    monkeypatch.setattr(placement.torch.cuda, "mem_get_info", lambda device: (free[device.index], 80 << 30))
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    work = placement.WORKSPACE_BYTES
    assert placement.device_budgets(devices, []) == {"cuda:0": (80 << 30) - work, "cuda:1": (40 << 30) - work}
    assert placement.device_budgets(devices, [70 << 30]) == {"cuda:0": 70 << 30, "cuda:1": (40 << 30) - work}
    assert placement.device_budgets(devices, [10 << 30, 20 << 30]) == {"cuda:0": 10 << 30, "cuda:1": 20 << 30}
    with pytest.raises(ValueError, match="one size for all GPUs or one per GPU"):
        placement.device_budgets(devices, [1, 2, 3])


def test_a_planned_model_generates_what_an_unplanned_one_does() -> None:
    """load_resident through a placement (every block on the CPU 'device') equals no placement."""
    from qmoe_cli.run.generate import GenerateConfig, generate_ids
    from qmoe_cli.run.resident import load_resident

    opened = open_model("tiny-switch")
    tokenizer = load_tokenizer(opened.tokenizer_dir)
    prompts = [parse_prompt(p, tokenizer, "t", 256, 955, 1).ids for p in GEN_PROMPTS]
    cpu = torch.device("cpu")
    plan = plan_model(opened.weights, {"cpu": 1 << 40}, torch.float32, 2, 8, 16)
    assert set(plan.home.values()) == {"cpu"}
    stops = [{1}, {1}]
    planned = generate_ids(load_resident(opened.weights, plan, [cpu], torch.float32), prompts, stops,
                           GenerateConfig(max_new_tokens=8))
    plain = generate_ids(load_resident(opened.weights, None, [cpu], torch.float32), prompts, stops,
                         GenerateConfig(max_new_tokens=8))
    assert planned == plain and all(len(t) >= 1 for t in planned)
