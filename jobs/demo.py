"""The README's first command: synthetic EM data -> shards -> 2-worker Ray training -> MLflow.

    python jobs/demo.py [--spec examples/specs/quickstart.yaml] [--set key=value ...]

Prints the model's validation accuracy next to the majority-class baseline, and how to open the
MLflow UI (bound to 127.0.0.1) where the metrics, evaluation plots and registered model are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "specs" / "quickstart.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from hierseg.data.loader import read_manifest
    from hierseg.spec import SpecError, load_spec
    from hierseg.train.launch import PreflightError, absolutize, run_ray

    run_name = f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh run each time; nothing overwritten
    try:
        spec = absolutize(load_spec(args.spec, [f"run.name={run_name}", *args.overrides]))
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        outcome = run_ray(spec)
    except PreflightError as e:
        print(f"demo: cannot start: {e}", file=sys.stderr)
        return 2
    minutes = (time.monotonic() - t0) / 60

    client = MlflowClient(tracking_uri=spec.tracking.uri)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    metrics = run.data.metrics
    hist = read_manifest(spec.data.val)["class_histogram"]
    baseline = max(hist) / sum(hist)
    accuracy, miou = metrics.get("val/fine/accuracy", float("nan")), metrics.get("val/fine/miou", float("nan"))
    store = spec.tracking.uri
    print(
        "\n".join(
            [
                "",
                f"hierseg demo finished in {minutes:.1f} min "
                f"({outcome['step']} steps on {spec.run.num_workers} Ray workers)",
                f"  validation pixel accuracy : {accuracy:.3f}   (uncertain pixels excluded)",
                f"  majority-class baseline   : {baseline:.3f}   (always predict the most frequent class)",
                f"  validation fine mIoU      : {miou:.3f}",
                f"  registered model          : {outcome.get('model_uri')}",
                f"  MLflow run                : {run.info.run_id} in experiment {spec.tracking.experiment!r}",
                "  evaluation plots          : artifacts eval/step_*/ (confusion.png, iou.png, samples.png)",
                "",
                "Open the MLflow UI (local only):",
                f"  {Path(sys.executable).parent}/mlflow ui --backend-store-uri {store} --host 127.0.0.1 --port 5000",
                "",
            ]
        )
    )
    summary = {"accuracy": accuracy, "majority_baseline": baseline, "miou": miou, "run_id": run.info.run_id}
    Path(spec.run.storage_path, run_name, "demo_summary.json").write_text(json.dumps(summary, indent=1))
    if not accuracy > baseline + 0.05:
        print("demo: the model did not beat the majority baseline by a clear margin", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from hierseg.cli import run_verb

    sys.exit(run_verb("demo", main, sys.argv[1:]))  # errors end as one line; --debug: traceback
