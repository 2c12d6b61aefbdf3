#!/bin/bash
# Distributed `qmoe compress` on a Slurm cluster: one torchrun per node, one rank per GPU.
#
#   sbatch scripts/slurm_compress.sh                       # switch-c2048, 8 nodes x 8 GPUs
#   sbatch --nodes 2 scripts/slurm_compress.sh switch-base-128 sb128-ternary
#
# Every rank reads the model lazily (only its own experts and the blocks' dense weights), so put
# the checkpoint on storage all nodes share and pass its directory as MODEL, rather than have each
# node download 3.2 TB. Rank 0 (on the first node) alone writes OUT; every rank reads the same
# calibration data (c4 is streamed by each, a file must be readable from every node).
# --resume makes the job requeue-safe: a restart continues from the last finished sparse block
# (with any number of nodes), and with nothing to resume it starts afresh.
#
#SBATCH --job-name=qmoe-compress
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.log

set -euo pipefail

MODEL=${1:-switch-c2048}
OUT=${2:-${MODEL}-gptq-ternary}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# Ranks wait at most this long for each other in one collective; it must exceed the slowest step
# between two collectives (rank 0 copying the non-expert weights, one slice of GPTQ).
DIST_TIMEOUT=${DIST_TIMEOUT:-1800}
# Each torchrun node agent splits the node's cores between its ranks.
export OMP_NUM_THREADS=$((SLURM_CPUS_PER_TASK / GPUS_PER_NODE))

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD_NODE:29500" \
    --log-dir "logs/$SLURM_JOB_ID" --tee 2 \
    -m qmoe_cli compress \
        --model "$MODEL" --bits ternary --calib c4 --calib-samples 128 \
        --out "$OUT" --resume --dist-timeout "$DIST_TIMEOUT"
