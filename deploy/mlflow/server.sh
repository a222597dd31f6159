#!/usr/bin/env bash
# A shared MLflow tracking server + model registry with a database backend and a served artifact store.
#
#   deploy/mlflow/server.sh start      # start in the background, wait until /health answers
#   deploy/mlflow/server.sh wait       # wait until it is ready (exit 1 after MLFLOW_WAIT_S seconds)
#   deploy/mlflow/server.sh status     # exit 0 when it answers
#   deploy/mlflow/server.sh stop
#   deploy/mlflow/server.sh run        # in the foreground (containers, systemd units)
#
# Then train against it with --set tracking.uri=http://127.0.0.1:5000 (or MLFLOW_TRACKING_URI).
# Binds to 127.0.0.1 unless MLFLOW_HOST is set: MLflow has no authentication of its own, so expose it
# only behind an authenticating reverse proxy or with the basic-auth app (see deploy/mlflow/README.md).
#
# Environment (defaults in brackets):
#   MLFLOW_HOST [127.0.0.1]  MLFLOW_PORT [5000]  MLFLOW_WORKERS [2]  MLFLOW_WAIT_S [120]
#   MLFLOW_STATE_DIR [./mlflow_server]: pid file, log, and the default SQLite store and artifacts
#   MLFLOW_BACKEND_STORE_URI [sqlite:///$MLFLOW_STATE_DIR/mlflow.db]
#       e.g. postgresql://mlflow:PASSWORD@db.internal:5432/mlflow (needs psycopg2 in the environment)
#   MLFLOW_ARTIFACTS_DESTINATION [$MLFLOW_STATE_DIR/artifacts]  e.g. s3://bucket/mlflow (needs boto3)
#   MLFLOW_APP_NAME [unset]: set to basic-auth to turn on MLflow's built-in username/password auth
#   MLFLOW_BIN [mlflow on PATH]
set -euo pipefail

HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
WORKERS=${MLFLOW_WORKERS:-2}
WAIT_S=${MLFLOW_WAIT_S:-120}
STATE_DIR=$(mkdir -p "${MLFLOW_STATE_DIR:-./mlflow_server}" && cd "${MLFLOW_STATE_DIR:-./mlflow_server}" && pwd)
BACKEND=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STATE_DIR/mlflow.db}
ARTIFACTS=${MLFLOW_ARTIFACTS_DESTINATION:-$STATE_DIR/artifacts}
MLFLOW=${MLFLOW_BIN:-mlflow}
PID_FILE=$STATE_DIR/server.pid
LOG_FILE=$STATE_DIR/server.log
# A client on this machine reaches a server bound to every interface through loopback.
CHECK_HOST=$HOST
[[ $CHECK_HOST == 0.0.0.0 || $CHECK_HOST == "::" ]] && CHECK_HOST=127.0.0.1
URL=http://$CHECK_HOST:$PORT

server_cmd() {
  # Fills the global array CMD (no eval: the values may hold passwords or spaces).
  CMD=("$MLFLOW" server --host "$HOST" --port "$PORT" --workers "$WORKERS"
    --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS")
  if [[ -n ${MLFLOW_APP_NAME:-} ]]; then CMD+=(--app-name "$MLFLOW_APP_NAME"); fi
}

running() { [[ -s $PID_FILE ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; }

healthy() {
  "${PYTHON:-python3}" - "$URL/health" <<'PY' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
}

do_wait() {
  local deadline=$((SECONDS + WAIT_S))
  until healthy; do
    if [[ -s $PID_FILE ]] && ! running; then
      echo "mlflow server exited during start-up; last log lines ($LOG_FILE):" >&2
      tail -n 20 "$LOG_FILE" >&2
      return 1
    fi
    ((SECONDS < deadline)) || { echo "mlflow server not ready at $URL after ${WAIT_S}s; see $LOG_FILE" >&2; return 1; }
    sleep 1
  done
  echo "mlflow server ready at $URL (backend $BACKEND, artifacts $ARTIFACTS)"
}

do_start() {
  if running; then echo "already running (pid $(cat "$PID_FILE"))"; do_wait; return; fi
  mkdir -p "$STATE_DIR"
  [[ $ARTIFACTS == *://* ]] || mkdir -p "$ARTIFACTS"
  # setsid: the server (uvicorn, its workers and job consumers) gets its own process group whose id is
  # the recorded pid, so stop ends all of it.
  server_cmd
  setsid "${CMD[@]}" >>"$LOG_FILE" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
  do_wait
}

do_stop() {
  if ! running; then echo "not running"; rm -f "$PID_FILE"; return 0; fi
  local pid
  pid=$(cat "$PID_FILE")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 1 30); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$PID_FILE"
  echo "stopped"
}

case ${1:-} in
  start) do_start ;;
  stop) do_stop ;;
  wait) do_wait ;;
  status) if healthy; then echo "up at $URL"; else echo "down ($URL)"; exit 1; fi ;;
  run) server_cmd && exec "${CMD[@]}" ;;
  *) echo "usage: $0 {start|stop|status|wait|run}" >&2; exit 2 ;;
esac
