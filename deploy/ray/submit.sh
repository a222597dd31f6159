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
# Environment: RAY_ADDRESS, RAY_AUTH_MODE, HIERSEG_MLFLOW_URI (e.g. http://mlflow.internal:5000; passed
# to the job as MLFLOW_TRACKING_URI and --set tracking.uri=...), HIERSEG_NO_WAIT=1 (return after submitting).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 SPEC.yaml [--set key=value ...]" >&2
  exit 2
fi
spec=$1
shift
[[ -f $spec ]] || { echo "$0: spec file not found: $spec" >&2; exit 2; }
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
runtime_env="{\"working_dir\": \"$repo\", \"env_vars\": $env_vars, \"excludes\": [\".venv\", \".git\", \"demo_out\", \"sweeps\", \"mlruns\", \"*.db\"]}"
wait_flag=()
[[ -n ${HIERSEG_NO_WAIT:-} ]] && wait_flag=(--no-wait)

# Inside the job, RAY_ADDRESS is set by Ray, so jobs/train.py (launcher ray) connects to this cluster.
exec ray job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env" "${wait_flag[@]}" \
  -- python jobs/train.py --spec "$spec" --launcher ray "$@" "${extra[@]}"
