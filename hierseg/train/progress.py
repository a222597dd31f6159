"""Progress lines on the owning rank (Ray forwards them to the driver console); silence elsewhere."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

from hierseg.losses import LossTerms
from hierseg.spec import JobSpec
from hierseg.train.context import DistContext


class NullProgress:
    def start(self, step: int, num_params: int) -> None: ...

    def update(self, terms: LossTerms, num_images: int, data_s: float, step_s: float) -> None: ...

    def pop_window(self, step: int, lr: float) -> dict[str, float]:
        return {}

    def note_eval(self, summary: dict[str, float]) -> None: ...

    def note(self, text: str) -> None: ...

    def finish(self, best: dict[str, Any], model_uri: str | None) -> None: ...


class Progress(NullProgress):
    """Accumulates loss *sums* weighted by valid pixels over the logging window, then derives means."""

    def __init__(self, spec: JobSpec, ctx: DistContext):
        self.max_steps, self.metric = spec.run.max_steps, spec.run.best_metric
        self.world = ctx.world_size
        self._reset()
        self.last_eval: dict[str, float] = {}
        self.t_start = time.perf_counter()
        self.start_step = 0

    def _reset(self) -> None:
        self.fine_sum = self.coarse_sum = 0.0
        self.num_valid = self.num_images = self.steps = 0
        self.data_s = self.step_s = 0.0

    def start(self, step: int, num_params: int) -> None:
        self.start_step, self.t_start = step, time.perf_counter()
        self.note(
            f"training from step {step} to {self.max_steps} on {self.world} worker(s), {num_params / 1e6:.2f} M params"
        )

    def update(self, terms: LossTerms, num_images: int, data_s: float, step_s: float) -> None:
        n = int(terms.num_valid)
        self.fine_sum += float(terms.loss_fine) * n
        self.coarse_sum += float(terms.loss_coarse.sum()) * n
        self.num_valid += n
        self.num_images += num_images
        self.steps += 1
        self.data_s += data_s
        self.step_s += step_s

    def pop_window(self, step: int, lr: float) -> dict[str, float]:
        n = max(self.num_valid, 1)
        out = {
            "train/loss_fine": self.fine_sum / n,
            "train/loss_coarse": self.coarse_sum / n,
            "train/num_valid": float(self.num_valid),
            "train/patches_per_s": self.num_images / max(self.step_s, 1e-9),
            "train/data_wait_share": self.data_s / max(self.step_s, 1e-9),
            "train/lr": lr,
        }
        done = step - self.start_step
        eta = (time.perf_counter() - self.t_start) / max(done, 1) * (self.max_steps - step)
        val = self.last_eval.get(self.metric, math.nan)
        self.note(
            f"step {step}/{self.max_steps} | loss fine {out['train/loss_fine']:.4f}"
            f" coarse {out['train/loss_coarse']:.4f}"
            f" | {out['train/patches_per_s']:.1f} patches/s | data wait {100 * out['train/data_wait_share']:.0f}%"
            f" | ETA {_hms(eta)} | last {self.metric} {val:.3f}"
        )
        self._reset()
        return out

    def note_eval(self, summary: dict[str, float]) -> None:
        self.last_eval = summary
        labels = {k.rsplit("/", 1)[1]: v for k, v in summary.items() if k.startswith("val/label/iou/")}
        ious = ", ".join(f"{k} {v:.3f}" for k, v in labels.items())
        self.note(
            f"eval: {int(summary['val/num_valid'])} single-class px | label mIoU {summary['val/label/miou']:.3f} "
            f"({ious}) | fine mIoU {summary['val/fine/miou']:.3f} acc {summary['val/fine/accuracy']:.3f}"
        )

    def note(self, text: str) -> None:
        _progress_logger().info(text)

    def finish(self, best: dict[str, Any], model_uri: str | None) -> None:
        if best:
            self.note(f"best {self.metric} = {best['value']:.4f} at step {best['step']}")
        if model_uri:
            self.note(f"model logged: {model_uri}")


def _progress_logger() -> logging.Logger:
    """Progress lines on stdout, once: a logger of our own (Ray Train patches ``print`` to tee it)."""
    log = logging.getLogger("hierseg.progress")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[hierseg] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def build_progress(spec: JobSpec, ctx: DistContext) -> NullProgress:
    return Progress(spec, ctx) if ctx.is_main else NullProgress()
