"""Distributed `qmoe compress` on CPU (gloo ranks as real processes): the checkpoint one process
writes, shards and slices of any size, and a dead or hung rank failing the job with a message.

Ranks run with one thread each and so does the one-process reference: the thread count changes
how BLAS and LAPACK split their sums, which moves the last bits of reported GPTQ errors (never,
so far, a code); with equal threads the checkpoints come out byte-identical.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from click.testing import CliRunner
from hf_models import DECODER_FAMILIES, save_hf_decoder

from qmoe_cli.cli import main
from qmoe_cli.compress.distributed import (
    TORCHRUN_VARIABLES,
    Comm,
    DistConfig,
    process_group,
    shard_bounds,
    split_evenly,
)
from qmoe_cli.compress.wire import pack_codes, packed_bytes, unpack_codes
from qmoe_cli.errors import QmoeError
from qmoe_cli.formats.open import open_model
from qmoe_cli.quant.grids import QuantSpec

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
COMPRESS = ["-m", "qmoe_cli", "compress", "--device", "cpu", "--calib-samples", "64", "--json"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
SMALL_GROUPS = ["--group-size", "3", "--token-cap", "1.5"]  # several rounds; capped experts


def _one_process(out: Path, *flags: str) -> dict:
    """The reference run: in this process (one thread, like each rank), no torch start-up to pay."""
    done = CliRunner().invoke(main, [*COMPRESS[2:], "--threads", "1", "--out", str(out), *flags])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(world: int, out: Path, *flags: str) -> list[subprocess.Popen]:
    """Each rank its own process with torchrun's variables but no torchrun agent, so what a
    survivor does when a peer fails is up to our code alone."""
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, *COMPRESS, "--out", str(out), *flags], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for r in range(world)]


def _assert_same_checkpoint(reference: Path, other: Path) -> None:
    """The bar: expert files byte-identical to one process's, and the same statistics and
    calibration loss in the manifest (every expert's arithmetic runs on the tokens, rows and
    chunks one process gives it, whichever rank does it)."""
    files = sorted(p.relative_to(reference) for p in (reference / "experts").rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(other) for p in (other / "experts").rglob("*.safetensors"))
    for name in files:
        assert (reference / name).read_bytes() == (other / name).read_bytes(), name
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (reference, other))
    # A shared expert's Hessian is an fp64 sum over ranks (a + b, not one running sum), then cast
    # to fp32 for the solve: its codes come out the same, but the block's fp32 GPTQ error may move
    # by an ulp or two of fp32 (Llama 4: 5e-8 relative). Everything else must match exactly.
    assert ours["blocks"].keys() == theirs["blocks"].keys()
    for name in ours["blocks"]:
        a, b = ours["blocks"][name], theirs["blocks"][name]
        assert {k: v for k, v in a.items() if k != "error"} == {k: v for k, v in b.items() if k != "error"}, name
        assert a["error"] == pytest.approx(b["error"], rel=8 * torch.finfo(torch.float32).eps), name
    # Llama 4 scales each expert's input by its routing weight, so a rank's batch of an expert's
    # tokens is a different matrix than one process's; the loss then agrees to fp32 rounding (5e-10
    # relative seen), while every code is the same.
    assert ours["calibration_loss"] == pytest.approx(theirs["calibration_loss"], rel=8 * torch.finfo(torch.float32).eps)


def _wait_for_finished_block(partial: Path, procs: list, limit: float = 120) -> None:
    manifest, deadline = partial / "manifest.json", time.monotonic() + limit
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:
            if 1 <= len(json.loads(manifest.read_text())["finished"]) < 4:
                return
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.005)
    pytest.fail("no sparse block finished while every rank was running")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """One-process checkpoints of tiny-switch: default settings, small groups."""
    root = tmp_path_factory.mktemp("reference")
    _one_process(root / "default")
    _one_process(root / "small", *SMALL_GROUPS)
    return {name: root / name for name in ("default", "small")}


# --- helpers, in one process -------------------------------------------------------------


def test_shards_are_contiguous_non_empty_and_balanced():
    lengths = [5, 40, 3, 3, 9, 30, 1, 1, 7, 12, 2, 20]
    for parts in range(1, len(lengths) + 1):
        bounds = shard_bounds(lengths, parts)
        assert bounds[0] == 0 and bounds[-1] == len(lengths) and len(bounds) == parts + 1
        assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert shard_bounds([10] * 40, 4) == [0, 10, 20, 30, 40]  # equal tokens
    assert shard_bounds([90, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [0, 1, 11]
    assert [list(s) for s in split_evenly(range(8), 3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [list(s) for s in split_evenly(range(2), 3)] == [[0], [1], []]


@pytest.mark.parametrize("bits, per_code", [("ternary", 1.6), ("2", 2), ("3", 3), ("4", 4), ("8", 8)])
def test_codes_on_the_wire_round_trip_at_about_log2_levels_bits(bits: str, per_code: float):
    spec = QuantSpec(bits)
    g = torch.Generator().manual_seed(len(bits))
    for shape in [(1, 1, 1), (3, 97, 13), (2, 5, 1025)]:
        codes = torch.randint(0, spec.levels, shape, generator=g).to(torch.uint8)
        packed = pack_codes(codes, spec)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(codes.numel(), spec)
        assert torch.equal(unpack_codes(packed, spec, shape), codes)
    assert packed.numel() * 8 / codes.numel() <= per_code * 1.01
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_codes(packed[:-1], spec, shape)


def test_a_group_of_one_communicates_nothing():
    comm = Comm()
    x = torch.arange(6.0).view(2, 3)
    assert comm.reduce_sum(x, 0, "sum") is x
    assert torch.equal(comm.all_gather(x, "gather"), x[None])
    assert torch.equal(comm.gather_rows(x, [2], "rows"), x)
    assert comm.on_root(lambda: {"a": 1}, "root") == {"a": 1}
    assert comm.exchange([[x]], [[]], "exchange")[0][0] is x
    assert comm.traffic == {}


def test_distributed_flag_without_torchrun_is_an_error():
    with pytest.raises(QmoeError, match="--distributed: no torchrun environment"):
        with process_group(DistConfig(), torch.device("cpu"), required=True, environ={}):
            pass
    with pytest.raises(ValueError, match="--dist-timeout"):
        DistConfig(timeout_s=0)


@pytest.mark.parametrize("flags, code, fragment", [
    (["--distributed"], 1, "error: --distributed: no torchrun environment"),
    (["--dist-timeout", "-1"], 2, "--dist-timeout"),
])
def test_cli_rejects_bad_distributed_flags(tmp_path: Path, monkeypatch, flags: list[str], code: int, fragment: str):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, [*COMPRESS[2:], "--out", str(tmp_path / "q"), *flags])
    assert result.exit_code == code, result.output
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "q").exists()


# --- collectives between real gloo processes ----------------------------------------------


def _refuse() -> dict:
    raise QmoeError("--out x: already exists")


def _collectives(rank: int, world: int, port: int, failures) -> None:
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    try:
        with process_group(DistConfig(timeout_s=30), torch.device("cpu"), required=True, environ=env) as comm:
            # odd byte counts: later tensors of a bundle start at offsets no dtype aligns to
            own = [torch.arange(7, dtype=torch.uint8), torch.tensor([1.5, -2.0]), torch.tensor([True, False])]
            specs = [((7,), torch.uint8), ((2,), torch.float32), ((2,), torch.bool)]
            got = comm.broadcast_bundle(own if rank == 1 else None, specs, 1, "bundle")
            assert all(torch.equal(a, b) for a, b in zip(got, own))
            rows = comm.gather_rows(torch.full((rank + 1, 2), float(rank)), [1, 2], "rows")
            assert rows[:, 0].tolist() == [0, 1, 1]
            total = comm.reduce_sum(torch.ones(3, dtype=torch.float64) * (rank + 1), 1, "sum")
            if rank == 1:
                assert total.tolist() == [3.0, 3.0, 3.0]
            assert comm.broadcast_json({"r": [1, "x"]} if rank == 0 else None, 0, "json") == {"r": [1, "x"]}
            # uneven all-to-all: rank r sends rank s (r + 2s) rows of 3 bf16 values plus one int64
            send = [[torch.full((rank + 2 * s, 3), float(10 * rank + s), dtype=torch.bfloat16),
                     torch.tensor([rank * 7 + s])] for s in range(world)]
            specs = [[((r + 2 * rank, 3), torch.bfloat16), ((1,), torch.int64)] for r in range(world)]
            with comm.phase("exchange"):
                got = comm.exchange(send, specs, "exchange")
            assert got[rank][0] is send[rank][0]  # own bundle handed back, no copy
            for r, (rows, tag) in enumerate(got):
                assert rows.shape == (r + 2 * rank, 3) and bool((rows == 10 * r + rank).all())
                assert tag.tolist() == [r * 7 + rank]
            other = 1 - rank
            assert comm.traffic["exchange"] == (other + 2 * rank + rank + 2 * other) * 3 * 2 + 2 * 8
            with pytest.raises(QmoeError, match="--out x: already exists"):  # rank 0's error, on every rank
                comm.on_root(_refuse, "root")
            assert comm.traffic["setup"] > 0
    except BaseException as exc:  # reported to the parent: a child's assertion is not a test failure
        failures.put(f"rank {rank}: {exc!r}")


def test_collectives_between_gloo_processes():
    import torch.multiprocessing as mp

    failures = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_collectives, args=(2, _free_port(), failures), nprocs=2, start_method="spawn")
    messages = []
    while not failures.empty():
        messages.append(failures.get())
    assert not messages, messages


# --- whole runs ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_under_torchrun_write_what_one_process_writes(reference, tmp_path: Path):
    done = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", *COMPRESS, "--out", str(tmp_path / "q")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # rank 0 alone prints: exactly one JSON object
    assert summary["world_size"] == 2
    # Tokens travel to their experts' owners and back, codes to rank 0, so bytes follow tokens:
    # the encoder's blocks (~4x the decoder's tokens) send more, and the decoder's blocks less
    # than the fp64 Hessians alone of the reduction design, 8 x (128^2 + 112^2) x 8 bytes.
    sent = summary["communicated_bytes"]
    hessians = 8 * (128 ** 2 + 112 ** 2) * 8
    assert all(sent[f"encoder.{i}"] > 2 * sent[f"decoder.{i}"] for i in (1, 3))
    assert all(0 < sent[f"decoder.{i}"] < hessians / 2 for i in (1, 3))
    assert done.stderr.count("encoder.1: tokens/expert") == 1, "block lines come from rank 0 only"
    _assert_same_checkpoint(reference["default"], tmp_path / "q")


@pytest.mark.slow
def test_three_ranks_with_small_groups_write_what_one_process_writes(reference, tmp_path: Path):
    procs = _ranks(3, tmp_path / "q", *SMALL_GROUPS)
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outputs]
    assert [bool(out.strip()) for out, _ in outputs] == [True, False, False]
    _assert_same_checkpoint(reference["small"], tmp_path / "q")


# One process per rank compresses every family in turn (a process group per run, each on its own
# port): what a rank does is the same as under torchrun, without a torch start-up per family.
RANK_OF_EVERY_FAMILY = """
import json, os, sys
from click.testing import CliRunner
from qmoe_cli.cli import main
for job in json.loads(sys.argv[1]):
    os.environ["MASTER_PORT"] = str(job["port"])
    done = CliRunner().invoke(main, job["argv"])
    if done.exit_code:
        sys.exit(f"{job['family']}: exit {done.exit_code}: {done.output}")
    if done.stdout.strip():  # rank 0 alone prints its summary
        print(job["family"], json.loads(done.stdout)["world_size"])
"""


@pytest.fixture(scope="module")
def every_family_on_two_ranks(tmp_path_factory) -> Path:
    """ROOT/FAMILY/{model,one,two}: each decoder family's checkpoint compressed by one process and
    by two ranks (ternary, one expert per group, so rounds of 2 vs 1 experts)."""
    root = tmp_path_factory.mktemp("families")
    jobs = []
    for family in sorted(DECODER_FAMILIES):
        model = root / family / "model"
        save_hf_decoder(model, family)
        g = torch.Generator().manual_seed(5)
        calib = root / family / "calib.jsonl"
        calib.write_text("".join(json.dumps({"input_ids": torch.randint(0, 64, (n,), generator=g).tolist()}) + "\n"
                                 for n in (24, 17, 30, 9) * 4))
        flags = ["--model", str(model), "--calib", str(calib), "--bits", "ternary", "--group-size", "1"]
        _one_process(root / family / "one", *flags)
        jobs.append({"family": family, "port": _free_port(),
                     "argv": [*COMPRESS[2:], "--out", str(root / family / "two"), *flags]})
    procs = [subprocess.Popen([sys.executable, "-c", RANK_OF_EVERY_FAMILY, json.dumps(jobs)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r),
                                                                     "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
             for r in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    assert [out.split() for out, _ in outputs] == [[w for job in jobs for w in (job["family"], "2")], []]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(DECODER_FAMILIES))
def test_two_ranks_compress_every_decoder_family_as_one_process_does(family: str, every_family_on_two_ranks: Path):
    """Each decoder family (top-2 SwiGLU experts; Qwen2-MoE's gated shared expert and dense
    block, DeepSeek-V3's dense first block, shared expert and sigmoid router with correction
    bias over 8 grouped experts): a token goes to both its experts' owners and their weighted
    outputs add up on its rank, gate and up are quantized stacked, and the bytes match one
    process's; shared experts quantized on rank 0 from both ranks' Hessian sums."""
    root = every_family_on_two_ranks / family
    shared = sorted((root / "one/experts").glob("*/shared.safetensors"))  # quantized: its Hessians reduced
    has_shared = open_model(str(root / "model")).weights.arch.shared_expert is not None  # Qwen2-MoE, DeepSeek, GLM
    assert bool(shared) == has_shared, shared
    _assert_same_checkpoint(root / "one", root / "two")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_dead_or_hung_rank_fails_the_job_with_a_message(tmp_path: Path, sig: signal.Signals):
    timeout = 10  # --dist-timeout: longer than a collective waits on a heavily loaded 2-core machine
    procs = _ranks(2, tmp_path / "q", "--dist-timeout", str(timeout))
    try:
        _wait_for_finished_block(tmp_path / ".q.partial", procs)
        procs[1].send_signal(sig)
        started = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 30)
        assert time.monotonic() - started < timeout + 10
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1
    assert "error: rank 0: " in err and "a peer rank died or hung" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_a_killed_torchrun_worker_fails_the_job_and_resume_finishes_it(reference, tmp_path: Path):
    out = tmp_path / "q"
    job = subprocess.Popen([*TORCHRUN, "--nproc-per-node", "2", *COMPRESS, "--out", str(out), "--dist-timeout", "30"],
                           env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        workers = []
        _wait_for_finished_block(tmp_path / ".q.partial", [job])
        workers = [p for p in psutil.Process(job.pid).children() if p.environ().get("RANK") == "1"]
        assert len(workers) == 1
        workers[0].kill()
        started = time.monotonic()
        _, err = job.communicate(timeout=60)
        assert time.monotonic() - started < 30
    finally:
        job.kill()
        job.wait()
    assert job.returncode != 0 and "rank" in err and not out.exists()
    # Resume with another world size: three ranks continue what two began, replaying the
    # finished blocks from codes rank 0 reads and broadcasts.
    procs = _ranks(3, out, "--resume")
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outputs]
    assert "resuming" in outputs[0][1]
    _assert_same_checkpoint(reference["default"], out)
