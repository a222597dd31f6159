#!/usr/bin/env bash
# Submit a hierseg training job to a running Ray cluster through its job API (the dashboard port).
#
#   deploy/ray/submit.sh SPEC.yaml [--set key=value ...]
#
# RAY_ADDRESS (default http://127.0.0.1:8265) is the dashboard address: a local `ray start --head
# --dashboard-host=127.0.0.1`, or `ray dashboard deploy/ray/cluster.yaml` forwarding a remote head.
# The working directory (this repository, minus .gitignore'd files) is uploaded as the job's runtime env,
# so the cluster runs exactly this checkout; pip packages come from the cluster image.
#
# Ray 2.60 token auth: `ray start` writes a token under the home directory of the user who started the
# cluster, and `ray job submit` fails with "Missing authentication token" unless the client runs with
# RAY_AUTH_MODE=token (and can read that token). This script sets RAY_AUTH_MODE=token unless you set it;
# a cluster started with RAY_AUTH_MODE=disabled (private machine only) needs RAY_AUTH_MODE=disabled here.
#
# Relative paths (data.train/val, run.storage_path, a sqlite:/// tracking store), in the spec or in --set, are
# resolved against the directory you run this script from and passed to the job as absolute --set values:
# the job itself runs in Ray's temporary copy of the repository, where relative paths would put shards,
# checkpoints and the MLflow store (and lose them). On a multi-node cluster those absolute paths must be on
# storage every node mounts (or use URLs and an MLflow server). The script prints where results go.
#
# Environment: RAY_ADDRESS, RAY_AUTH_MODE, HIERSEG_MLFLOW_URI (e.g. http://mlflow.internal:5000; passed
# to the job as MLFLOW_TRACKING_URI and --set tracking.uri=...), HIERSEG_NO_WAIT=1 (return after submitting),
# HIERSEG_DRY_RUN=1 (print the `ray job submit` command instead of running it).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 SPEC.yaml [--set key=value ...]" >&2
  exit 2
fi
spec=$1
shift
[[ -f $spec ]] || { echo "$0: spec file not found: $spec" >&2; exit 2; }
spec_given=$spec
repo=$(cd "$(dirname "$0")/../.." && pwd)
# The job runs in the uploaded copy of this repository, so the spec must be inside it (path made relative).
spec_abs=$(realpath "$spec")
[[ $spec_abs == "$repo"/* ]] || { echo "$0: $spec must be inside $repo (it is uploaded with the job)" >&2; exit 2; }
spec=${spec_abs#"$repo"/}
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

env_vars='{"PYTHONUNBUFFERED": "1"}'
extra=()
if [[ -n ${HIERSEG_MLFLOW_URI:-} ]]; then
  env_vars="{\"PYTHONUNBUFFERED\": \"1\", \"MLFLOW_TRACKING_URI\": \"$HIERSEG_MLFLOW_URI\"}"
  extra=(--set "tracking.uri=$HIERSEG_MLFLOW_URI")
fi
# Pin relative paths to the submitter's directory (see the header); a bad spec stops here, before submitting.
py=$(command -v python || command -v python3)
resolved=$("$py" "$repo/jobs/train.py" --spec "$spec_given" "$@" "${extra[@]}" --print-absolute-overrides) || exit $?
pinned=()
results=""
while IFS= read -r line; do
  if [[ $line == "# results: "* ]]; then results=${line#"# results: "}; elif [[ -n $line ]]; then pinned+=(--set "$line"); fi
done <<< "$resolved"

runtime_env="{\"working_dir\": \"$repo\", \"env_vars\": $env_vars, \"excludes\": [\".venv\", \".git\", \"demo_out\", \"sweeps\", \"mlruns\", \"*.db\"]}"
wait_flag=()
[[ -n ${HIERSEG_NO_WAIT:-} ]] && wait_flag=(--no-wait)

# Inside the job, RAY_ADDRESS is set by Ray, so jobs/train.py (launcher ray) connects to this cluster.
cmd=(ray job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env" "${wait_flag[@]}"
  -- python jobs/train.py --spec "$spec" --launcher ray "$@" "${extra[@]}" "${pinned[@]}")
if [[ -n ${HIERSEG_DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  echo "results would go to: $results"
  exit 0
fi
rc=0
"${cmd[@]}" || rc=$?
if [[ $rc -eq 0 ]]; then
  echo "hierseg: results (on the cluster's file system): $results"
else
  echo "hierseg: job failed (exit $rc); results so far: $results" >&2
fi
exit $rc
