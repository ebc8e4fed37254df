#!/usr/bin/env bash
# The deployment walk-through of docs/deployment.md, on one machine, from credentials to results:
# a SuperLink over TLS with SuperNode authentication, three registered SuperNodes (kiosks of
# 10 synthetic users each), and fedrec with SecAgg+. Every process listens on 127.0.0.1.
# tests/test_deployment.py runs this very script, so the documented steps are the tested ones.
#
#   docker/walkthrough.sh                  # from the repository root, in the project's venv
#
# Each step waits for the previous one to be ready (never a fixed sleep), each wait is bounded,
# and every process the script starts is stopped when it exits, whether the run passed or not.
# Settings (environment variables, defaults in brackets):
#   DEPLOY [deploy]  certificates, keys and logs     PORT [8000]       the SuperLink's HTTPS port
#   NODES [3]        SuperNodes to start             NODE_PORT [9094]  first SuperNode's local port
#   ROUNDS [3]       num-server-rounds               RUN_DIR [runs/deployed]  the run directory
#   RUN_CONFIG []    more run-config overrides       WAIT [300]        seconds per readiness wait
#   RUN_TIMEOUT [1800] seconds for the whole run     FEDREC [fedrec]   how to call the fedrec CLI
set -euo pipefail
cd "$(dirname "$0")/.."

FEDREC=${FEDREC:-fedrec}
DEPLOY=$(realpath -m "${DEPLOY:-deploy}")
RUN_DIR=$(realpath -m "${RUN_DIR:-runs/deployed}")
PORT=${PORT:-8000}
NODE_PORT=${NODE_PORT:-9094}
NODES=${NODES:-3}
ROUNDS=${ROUNDS:-3}
WAIT=${WAIT:-300}
RUN_TIMEOUT=${RUN_TIMEOUT:-1800}
export FLWR_HOME=${FLWR_HOME:-$DEPLOY/flwr-home}   # the flwr CLI's config and installed apps
PIDS=()

say() { echo "walkthrough: $*" >&2; }

start() {  # start LOG COMMAND...: in its own session, so that stop can end it and all it starts
  local log=$1; shift
  setsid "$@" > "$log" 2>&1 < /dev/null &
  PIDS+=("$!")
}

tree() {  # a process and all its descendants
  local child
  echo "$1"
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$child"; done
}

alive() {  # is this process still running (not gone, not a zombie)?
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $stat != Z* ]]
}

stop() {  # SIGTERM every started process and its descendants; SIGKILL what is left after 20 s
  local victims=() pid _ running
  [ ${#PIDS[@]} -gt 0 ] || return 0
  for pid in "${PIDS[@]}"; do victims+=($(tree "$pid")); done
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  kill -TERM "${victims[@]}" 2>/dev/null || true
  for _ in $(seq 40); do
    running=0
    for pid in "${victims[@]}"; do alive "$pid" && { running=1; break; }; done
    [ "$running" = 0 ] && { PIDS=(); return 0; }
    sleep 0.5
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  kill -KILL "${victims[@]}" 2>/dev/null || true
  PIDS=()
}
trap stop EXIT
trap 'exit 130' INT TERM

wait_for() {  # wait_for LOG TEXT COUNT PID: until LOG holds TEXT COUNT times; fail if PID dies or WAIT passes
  local deadline=$((SECONDS + WAIT)) count
  while :; do
    count=$(grep -cF -- "$2" "$1" 2>/dev/null) || true
    [ "${count:-0}" -ge "$3" ] && return 0
    if ! alive "$4" || [ $SECONDS -ge $deadline ]; then
      say "'$2' x$3 not seen in $1 (process $4 $(alive "$4" && echo "still running after ${WAIT}s" || echo exited)):"
      tail -n 30 "$1" >&2
      return 1
    fi
    sleep 1
  done
}

# 0. Credentials: a CA and the SuperLink's certificate for localhost; one key pair per SuperNode.
mkdir -p "$DEPLOY"
$FEDREC certs --out "$DEPLOY/certs" --force > /dev/null
$FEDREC keys --out "$DEPLOY/keys" --count "$NODES" --force > /dev/null

# 1. The SuperLink: TLS + SuperNode authentication. --connection also writes [superlink.local-tls]
#    (address, ca.crt) into $FLWR_HOME/config.toml for the flwr CLI. Ready when Uvicorn serves HTTPS.
start "$DEPLOY/superlink.log" $FEDREC superlink --certs "$DEPLOY/certs" --port "$PORT" --connection local-tls
SUPERLINK=${PIDS[-1]}
wait_for "$DEPLOY/superlink.log" "Uvicorn running on https://" 1 "$SUPERLINK"
say "SuperLink ready on 127.0.0.1:$PORT"

# 2. Register the SuperNodes' public keys (only registered keys may connect).
for i in $(seq "$NODES"); do
  timeout "$WAIT" flwr supernode register "$DEPLOY/keys/supernode-$i.pub" local-tls > "$DEPLOY/register-$i.log" 2>&1 ||
    { say "registering supernode-$i.pub failed:"; cat "$DEPLOY/register-$i.log" >&2; exit 1; }
done

# 3. The SuperNodes, each with its own key, data partition and local port. Ready when the
#    SuperLink has activated every one of them.
for i in $(seq "$NODES"); do
  start "$DEPLOY/supernode-$i.log" $FEDREC supernode --superlink "127.0.0.1:$PORT" --ca "$DEPLOY/certs/ca.crt" \
    --key "$DEPLOY/keys/supernode-$i.key" --partition-id $((i - 1)) --num-partitions "$NODES" \
    --port $((NODE_PORT + i - 1))
done
wait_for "$DEPLOY/superlink.log" "[Fleet.ActivateNode] Activated" "$NODES" "$SUPERLINK"
say "$NODES SuperNodes connected"

# 4. fedrec with SecAgg+: 10 synthetic users per kiosk, one kiosk per SuperNode. The ServerApp
#    itself refuses to start when fewer SuperNodes are connected than the data has kiosks.
timeout "$RUN_TIMEOUT" flwr run . local-tls --stream --run-config "secure-aggregation=true \
  num-server-rounds=$ROUNDS synthetic-users=$((10 * NODES)) partitioning='group' users-per-client=10 \
  run-dir='$RUN_DIR' $RUN_CONFIG"

# 5. Results: metrics.jsonl, summary.json and checkpoints in the run directory. Leaving the
#    script stops the SuperLink and the SuperNodes (trap above).
[ -s "$RUN_DIR/summary.json" ] || { say "the run wrote no $RUN_DIR/summary.json"; exit 1; }
say "done; results in $RUN_DIR"
