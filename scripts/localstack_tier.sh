#!/usr/bin/env bash
# The LocalStack tier (issue 7): start LocalStack without Docker from its own virtualenv on a free port, wait
# until its health endpoint says the services the tier needs are up, run `pytest -m localstack` against it,
# and always stop it. Any failure to start is a failure of the tier, never a silent pass.
#
#   scripts/localstack_tier.sh [pytest args...]
#
# Environment: LOCALSTACK_VENV (.tools/localstack), PYTEST (.venv/bin/python -m pytest),
# LOCALSTACK_START_TIMEOUT (seconds, 90), LOCALSTACK_SERVICES (s3,sqs,sns,events,stepfunctions,iam,sts,kms,lambda).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${LOCALSTACK_VENV:-.tools/localstack}
services=${LOCALSTACK_SERVICES:-s3,sqs,sns,events,stepfunctions,iam,sts,kms,lambda}
timeout=${LOCALSTACK_START_TIMEOUT:-90}
read -r -a pytest_cmd <<<"${PYTEST:-.venv/bin/python -m pytest}"

if [[ ! -x $venv/bin/python ]]; then
    echo "localstack tier: no LocalStack virtualenv at $venv (make test-localstack creates it)" >&2
    exit 1
fi

port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
endpoint="http://127.0.0.1:$port"
state=$(mktemp -d "${TMPDIR:-/tmp}/conveyor-localstack.XXXXXX")
log=$state/localstack.log
pid=

stop() {
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$state"
}
trap stop EXIT
trap 'exit 130' INT TERM

echo "localstack tier: starting LocalStack ($("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("localstack-core"))'), no Docker) on $endpoint for $services"
started=$SECONDS
# DNS_ADDRESS=0: no DNS server (it would want port 53). The state lives in a temporary directory.
env DNS_ADDRESS=0 GATEWAY_LISTEN="127.0.0.1:$port" SERVICES="$services" EAGER_SERVICE_LOADING=1 \
    LOCALSTACK_VOLUME_DIR="$state/volume" FILESYSTEM_ROOT="$state/fs" SKIP_SSL_CERT_DOWNLOAD=1 \
    DISABLE_EVENTS=1 LOCALSTACK_TELEMETRY_DISABLED=1 \
    "$venv/bin/python" -m localstack.runtime.main >"$log" 2>&1 &
pid=$!

ready=
while (( SECONDS - started < timeout )); do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "localstack tier: FAILED: LocalStack exited before it was ready; the end of its log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    if "$venv/bin/python" - "$endpoint" "$services" <<'PY'
import json, sys, urllib.request
endpoint, services = sys.argv[1], sys.argv[2].split(",")
try:
    with urllib.request.urlopen(endpoint + "/_localstack/health", timeout=2) as response:
        health = json.load(response)["services"]
except Exception:
    sys.exit(1)
sys.exit(0 if all(health.get(s) in ("available", "running") for s in services) else 1)
PY
    then
        ready=1
        break
    fi
    sleep 1
done
if [[ -z $ready ]]; then
    echo "localstack tier: FAILED: LocalStack did not report $services available within $timeout s; the end of its log:" >&2
    tail -n 40 "$log" >&2
    exit 1
fi
echo "localstack tier: LocalStack ready in $((SECONDS - started)) s"

# -v: every test that ran; -rfEs: failures, errors and every skip with its reason; -m localstack: this tier
# only (a plain `pytest` skips these tests: LOCALSTACK_ENDPOINT is unset there).
status=0
LOCALSTACK_ENDPOINT=$endpoint "${pytest_cmd[@]}" tests/localstack -m localstack -v -rfEs -p no:cacheprovider "$@" || status=$?
if (( status != 0 )); then
    echo "localstack tier: the end of LocalStack's log:" >&2
    tail -n 20 "$log" >&2
fi
echo "localstack tier: done in $((SECONDS - started)) s (LocalStack start included)"
exit "$status"
