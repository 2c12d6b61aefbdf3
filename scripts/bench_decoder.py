"""Benchmark decoder-only generation: a random checkpoint against its packed ternary form.

`transformers` writes a random checkpoint of --family at the given sizes (as
scripts/demo_decoder.py does, routers spread so every expert gets tokens); `qmoe compress
--method rtn --bits ternary --pack` makes its packed form (RTN: the codes' values do not change
the decode time, and it is fast). Both are loaded with `qmoe generate`'s resident model
(`qmoe_cli.run.resident.load_resident`, the original's experts dense in the compute dtype) and
run through `qmoe_cli.run.generate.prefill` and the cached output stack, in this one process.
Reported, medians after a warm-up (CUDA synchronized around each timed call): the prefill of
--prompt-tokens tokens per sequence, and one decoder step (every block, head, argmax) per
generated token, at each batch size; the bytes the routed and shared experts take in each form
(dense: weights x compute dtype size; packed: codes, offsets and grids, from the manifest).

    python scripts/bench_decoder.py --family mixtral --device cpu          # tiny, CPU
    python scripts/bench_decoder.py --family qwen3_moe --hidden 2048 --expert-width 768 \
        --experts 64 --top-k 8 --layers 4 --heads 16 --kv-heads 4 --vocab 32000   # GPU, Qwen3-30B-A3B-like
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import dtype_bytes, emit_table, sync  # noqa: E402
from demo_decoder import FAMILIES  # noqa: E402

from qmoe_cli.formats.open import open_model  # noqa: E402
from qmoe_cli.run.generate import prefill  # noqa: E402
from qmoe_cli.run.resident import ResidentModel, load_resident  # noqa: E402

# The config key that holds the routed experts' width (the others use intermediate_size).
EXPERT_WIDTH_KEY = {"qwen2_moe": "moe_intermediate_size", "qwen3_moe": "moe_intermediate_size",
                    "deepseek_v3": "moe_intermediate_size"}
EXPERT_COUNT_KEY = {"mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts"}


def model_config(args: argparse.Namespace) -> dict:
    """The transformers config keywords for --family at the flags' sizes (family extras from
    demo_decoder, the expert count and width replaced)."""
    _, _, extra = FAMILIES[args.family]
    width_key = EXPERT_WIDTH_KEY.get(args.family, "intermediate_size")
    config = {**extra, "vocab_size": args.vocab, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
              "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
              "num_experts_per_tok": args.top_k, "initializer_range": 0.02,
              "intermediate_size": 2 * args.expert_width,  # the dense blocks' MLP (DeepSeek's first)
              EXPERT_COUNT_KEY.get(args.family, "num_experts"): args.experts, width_key: args.expert_width}
    if args.family == "qwen2_moe":
        config["shared_expert_intermediate_size"] = 2 * args.expert_width
    if args.family == "deepseek_v3":
        config["num_key_value_heads"] = args.heads  # MLA: no grouped key/value heads
    return config


def write_model(directory: Path, args: argparse.Namespace) -> None:
    import transformers

    config_name, model_name, _ = FAMILIES[args.family]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**model_config(args))).eval()
    with torch.no_grad():  # spread the routers so that every expert gets tokens
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and ".experts." not in name and "shared_expert_gate" not in name:
                param.normal_(0, 1.0)
    model.save_pretrained(directory)


def compress(model: Path, root: Path, vocab: int, device: str) -> tuple[Path, dict]:
    """`qmoe compress --method rtn --bits ternary --pack` -> the packed directory and its manifest."""
    ids = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(1)).tolist()
    (root / "calib.jsonl").write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids))
    out = root / "rtn-ternary"
    done = subprocess.run([sys.executable, "-m", "qmoe_cli", "compress", "--model", str(model), "--calib",
                           str(root / "calib.jsonl"), "--calib-samples", "4", "--method", "rtn", "--bits", "ternary",
                           "--out", str(out), "--device", device, "--pack", "--json"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"qmoe compress failed:\n{done.stderr}")
    packed = out.with_name(out.name + "-packed")
    return packed, json.loads((packed / "manifest.json").read_text())


def timed(call, device: torch.device) -> float:
    """ms of `call()`, the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return (time.perf_counter() - start) * 1e3


@torch.no_grad()
def batch_ms(model: ResidentModel, batch: int, args: argparse.Namespace) -> tuple[float, float]:
    """(median prefill ms, median ms per decoder step) for `batch` random prompts."""
    device, output = model.first_device, model.weights.arch.generation().output_stack
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, args.vocab, (batch, args.prompt_tokens), generator=gen).tolist()
    steps = args.warmup + args.steps
    prefills = [timed(lambda: prefill(model, prompts, steps), device) for _ in range(args.warmup + args.prefills)]
    cache, hidden = prefill(model, prompts, steps)

    def step() -> None:
        nonlocal hidden
        last = model.logits(hidden).argmax(-1, keepdim=True).cpu()  # [B, 1] int64, as generate's greedy
        hidden = model.run_stack(output, model.embed(output, last), cache)[:, -1]  # [B, d]

    times = [timed(step, device) for _ in range(steps)]
    model.finish()
    return statistics.median(prefills[args.warmup:]), statistics.median(times[args.warmup:])


def measure(path: Path, args: argparse.Namespace, batches: list[int]) -> dict[int, tuple[float, float]]:
    device = torch.device(args.device)
    model = load_resident(open_model(str(path)).weights, None, [device], args.dtype)
    result = {b: batch_ms(model, b, args) for b in batches}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="mixtral")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-width", dest="expert_width", type=int, default=512,
                        help="Each routed expert's intermediate width")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", dest="top_k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", dest="kv_heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="Timed decoder steps per batch size")
    parser.add_argument("--prefills", type=int, default=3, help="Timed prefills per batch size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="Compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="Also write the markdown table here.")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    args.batches = [int(b) for b in args.batches.split(",")]
    for flag in ("hidden", "expert_width", "experts", "top_k", "layers", "heads", "kv_heads", "vocab",
                 "prompt_tokens", "steps", "prefills"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    if args.heads % args.kv_heads:
        parser.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    groups = FAMILIES["deepseek_v3"][2]["n_group"]
    if args.family == "deepseek_v3" and args.experts % groups:
        parser.error(f"deepseek_v3 routes within {groups} expert groups: --experts must be a multiple of {groups}, "
                     f"got {args.experts}")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"writing a random {args.family} checkpoint", file=sys.stderr)
        write_model(root / "model", args)
        print("compressing it (rtn ternary, packed)", file=sys.stderr)
        compress_device = "cuda" if args.device.startswith("cuda") else "cpu"
        packed, manifest = compress(root / "model", root, args.vocab, compress_device)
        print("timing the packed model", file=sys.stderr)
        p = measure(packed, args, args.batches)
        print("timing the original model", file=sys.stderr)
        d = measure(root / "model", args, args.batches)
    totals, name = manifest["totals"], str(args.dtype).removeprefix("torch.")
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} threads")
    memory = f"{totals['weights'] * dtype_bytes(args.dtype) / 1e6:.2f} | {totals['all_in_bytes'] / 1e6:.2f}"
    lines = [f"# {args.family} generation, packed (rtn ternary) vs {name} experts on {where}: hidden {args.hidden}, "
             f"{args.experts} experts of width {args.expert_width}, top-{args.top_k}, {args.layers} layers, "
             f"{args.heads} heads / {args.kv_heads} kv, vocab {args.vocab}, {args.prompt_tokens}-token prompts, "
             f"median of {args.prefills} prefills / {args.steps} steps", "",
             f"| what | batch | {name} ms | packed ms | packed / {name} | expert MB {name} | expert MB packed |",
             "|---|---|---|---|---|---|---|"]
    for what, k in (("prefill", 0), ("decoder step (per token)", 1)):
        for b in args.batches:
            lines.append(f"| {what} | {b} | {d[b][k]:.2f} | {p[b][k]:.2f} | {p[b][k] / d[b][k]:.2f} | {memory} |")
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
