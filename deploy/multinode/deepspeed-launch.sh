#!/usr/bin/env bash
# yoto on several nodes with the DeepSpeed launcher (pdsh/ssh to every host of the
# hostfile; yoto installed at the same path on each). Run from the repository root:
#   deploy/multinode/deepspeed-launch.sh deploy/multinode/hostfile --preset gpt-1.3b
set -euo pipefail
HOSTFILE=${1:?usage: deepspeed-launch.sh HOSTFILE [yoto train args...]}
shift
METRICS_PORT=${METRICS_PORT:-9477}
RUN_ROOT=${RUN_ROOT:-/shared/runs}             # shared storage: rank 0 writes, all resume
TARGETS_DIR=${TARGETS_DIR:-/shared/prometheus-targets}
HEAD=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')
TARGET_FILE="$TARGETS_DIR/yoto-$HEAD-$$.json"

# Prometheus scrapes rank 0's host for as long as this script runs.
python3 "$(dirname "$0")/targets.py" --hostfile "$HOSTFILE" --port "$METRICS_PORT" \
  --label launcher=deepspeed --out "$TARGET_FILE"
trap 'rm -f "$TARGET_FILE"' EXIT

# --no_python: "yoto" is the console script; the launcher adds --local_rank=N, which the
# CLI accepts before the command. 0.0.0.0 so Prometheus on another host can scrape it.
deepspeed --hostfile "$HOSTFILE" --master_addr "$HEAD" --master_port 29500 --no_python \
  yoto train --run-root "$RUN_ROOT" --metrics-addr "0.0.0.0:$METRICS_PORT" "$@"
