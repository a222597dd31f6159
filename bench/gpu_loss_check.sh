#!/usr/bin/env bash
# GPU check of the loss: fwd+bwd time/memory vs the plan and plain CE (fp32, bf16), and CUDA == CPU values
# (plain and partial-label batches). Writes logs to ${OUT:-/tmp}.
set -uo pipefail
out=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
python3 bench/loss.py --device cuda --rounds 30 2>&1 | tee "$out/loss_fp32.txt"
python3 bench/loss.py --device cuda --rounds 30 --bf16 2>&1 | tee "$out/loss_bf16.txt"
python3 - <<'PY' 2>&1 | tee "$out/loss_cuda_vs_cpu.txt"
import torch
from hierseg.labels import Hierarchy
from hierseg.losses import hierarchical_loss
g = torch.Generator().manual_seed(0)
lf, lc = torch.randn(4, 12, 64, 64, generator=g), torch.randn(4, 5, 64, 64, generator=g)
y = torch.randint(-1, 14, (4, 64, 64), generator=g)
sets = torch.zeros(2, 12, dtype=torch.bool); sets[0, [0, 5]] = True; sets[1, 2:5] = True
lut = Hierarchy.default().lut()
for name, kw, yy in (("plain", {}, y.clamp(max=11)), ("label sets", {"label_sets": sets}, y)):
    out = []
    for dev in ("cpu", "cuda"):
        a, b = lf.to(dev).detach().requires_grad_(True), lc.to(dev).detach().requires_grad_(True)
        t = hierarchical_loss(a, b, yy.to(dev), lut.to(dev), **{k: v.to(dev) for k, v in kw.items()})
        t.loss.backward()
        out.append((t.loss.item(), a.grad.cpu(), b.grad.cpu()))
    (l0, f0, c0), (l1, f1, c1) = out
    print(f"{name}: loss cpu {l0:.6f} cuda {l1:.6f}; max |grad diff| fine {(f0 - f1).abs().max():.2e} coarse {(c0 - c1).abs().max():.2e}")
PY
