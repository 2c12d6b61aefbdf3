"""The results table for a decoder-only family: `qmoe compress --pack` at each setting on a
random tiny checkpoint that `transformers` writes, then `qmoe eval` of the packed checkpoint.

    python scripts/demo_decoder.py --family mixtral      # needs `transformers` (the writer)

Random weights: the original's loss is no optimum, so the table also gives the mean squared
distance of each packed model's next-token logits from the original's on the validation data,
which is what GPTQ reduces. Prints a markdown table on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FAMILIES = {  # model_type -> (transformers config class, model class, family-specific settings)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, moe_intermediate_size=128, shared_expert_intermediate_size=256)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=8, moe_intermediate_size=128)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=8, moe_intermediate_size=128, n_shared_experts=1, first_k_dense_replace=1,
                         n_group=4, topk_group=2, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
                         qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)),
}
SETTINGS = [("gptq", "ternary"), ("rtn", "ternary"), ("gptq", "2"), ("rtn", "2"), ("gptq", "4"), ("rtn", "4")]


def write_model(directory: Path, family: str) -> None:
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, initializer_range=0.1)
    model = getattr(transformers, config_name)(**{**common, **extra})
    model = getattr(transformers, model_name)(model).eval()
    with torch.no_grad():  # spread the routers so that every expert gets tokens
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and ".experts." not in name and "shared_expert_gate" not in name:
                param.normal_(0, 1.0)
    model.save_pretrained(directory)


def write_data(path: Path, count: int, seed: int, length: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(0, 256, (length,), generator=g).tolist() for _ in range(count)]
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in sequences))
    return sequences


def qmoe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "qmoe_cli", *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"qmoe {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def logits(model: Path, sequences: list[list[int]]) -> torch.Tensor:
    from qmoe_cli.formats.open import open_model
    from qmoe_cli.run.stream import RunConfig, streamed_states

    weights = open_model(str(model)).weights
    run = RunConfig(torch.device("cpu"), torch.float32, progress=False)
    states = streamed_states(weights, weights.arch.stack_tokens(sequences, sequences), run)
    return weights.arch.head(weights.tensor, run.device, run.dtype)(states.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="mixtral")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_model(root / "model", args.family)
        write_data(root / "calib.jsonl", args.calib_samples, seed=1)
        validation = write_data(root / "val.jsonl", args.samples, seed=2)
        eval_args = ["--data", str(root / "val.jsonl"), "--device", "cpu", "--samples", str(args.samples)]
        reference = logits(root / "model", validation)
        original = qmoe("eval", "--model", str(root / "model"), *eval_args)["loss"]
        print(f"{args.family}: random tiny checkpoint (hidden 128, 8 experts of 128-256 wide, top-2, 4 blocks); "
              f"{args.calib_samples} calibration and {args.samples} validation sequences of 64 random tokens\n")
        print("| method | bits | validation loss (packed) | logits MSE vs original | bits/weight packed | all-in |")
        print("|---|---|---|---|---|---|")
        print(f"| original (fp32) | - | {original:.4f} | 0 | 32 | 32 |")
        for method, bits in SETTINGS:
            print(f"{method} {bits}...", file=sys.stderr)
            out = root / f"{method}-{bits}"
            summary = qmoe("compress", "--model", str(root / "model"), "--calib", str(root / "calib.jsonl"),
                           "--calib-samples", str(args.calib_samples), "--method", method, "--bits", bits,
                           "--out", str(out), "--device", "cpu", "--pack")
            packed = Path(f"{out}-packed")
            loss = qmoe("eval", "--model", str(packed), *eval_args)["loss"]
            mse = (logits(packed, validation) - reference).pow(2).mean().item()
            info = summary["packed"]
            print(f"| {method} | {bits} | {loss:.4f} | {mse:.4f} | {info['bits_per_weight_codes']:.3f} | "
                  f"{info['bits_per_weight_all_in']:.3f} |")


if __name__ == "__main__":
    main()
