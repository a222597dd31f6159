#!/usr/bin/env bash
# GPU path check on a lent accelerator: loss fwd+bwd (fp32, bf16) and the training step by precision and
# memory format under torchrun with NCCL. Writes logs to ${OUT:-/tmp}.
set -uo pipefail
out=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 bench/loss.py --device cuda --rounds 20 2>&1 | tee "$out/loss_fp32.txt"
python3 bench/loss.py --device cuda --rounds 20 --bf16 2>&1 | tee "$out/loss_bf16.txt"
for norm in group batch; do
  python3 -m torch.distributed.run --standalone --nproc_per_node 1 bench/step.py --gpu --batch 16 --size 256 \
    --steps 30 --rounds 3 --norm $norm 2>&1 | tee "$out/step_$norm.txt"
done
