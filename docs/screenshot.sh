#!/usr/bin/env bash
# Screenshots of the Prefect UI for the README, made the way the runbook says (README,
# "Operations"): a local server, the `lab` pool, every deployment, `prefect deployment run
# finetune/phased-lab --params '{"smoke": true, ...}'`, a worker --run-once; then headless
# Chromium on the deployments (with a live worker), the completed run, its artifacts and its report.
#   docs/screenshot.sh     (needs chromium: apt-get install -y chromium; a few CPU minutes)
# Writes docs/prefect-{deployments,run,artifacts,report}.png.
set -euo pipefail
set -m  # background jobs get their own process group, so the trap below stops them whole (NOTES)
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
WORK=$(mktemp -d)
PORT=${PORT:-4317}
export PREFECT_HOME=$WORK/prefect PREFECT_API_URL=http://127.0.0.1:$PORT/api RECIPE_LAB_HOME=$PWD
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_CLI_PROMPT=false OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$WORK/hf
export RECIPE_LAB_CACHE=${RECIPE_LAB_CACHE:-$PWD/.cache/recipe-lab}

"$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 &
SERVER=$!
WORKER=
trap 'for p in $WORKER $SERVER; do kill -TERM -- "-$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
until curl -sf "$PREFECT_API_URL/health" >/dev/null; do sleep 1; done

"$BIN/prefect" work-pool create lab --type process --overwrite
"$BIN/prefect" work-pool create lab-control --type process --overwrite
"$BIN/prefect" --no-prompt deploy --all --prefect-file deployments/prefect.yaml
RUN=$("$BIN/prefect" deployment run finetune/phased-lab \
    --params "{\"smoke\": true, \"storage_root\": \"$WORK/runs\", \"run_id\": \"ui-demo\"}" | sed -n 's/.*UUID: *\([0-9a-f-]\{36\}\).*/\1/p')
"$BIN/prefect" worker start --pool lab --run-once >"$WORK/worker.log" 2>&1
"$BIN/prefect" flow-run inspect "$RUN" | grep -q "COMPLETED" || { tail -50 "$WORK/worker.log"; exit 1; }

shot() {  # URL OUT.png: flags from the machine notes; a fresh profile per shot
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$(mktemp -d -p "$WORK")" --hide-scrollbars --window-size=1440,1000 \
        --virtual-time-budget=15000 --screenshot="$2" "$1" 2>/dev/null
}
# A worker that stays up, so that the deployments show as Ready.
"$BIN/prefect" worker start --pool lab --limit 1 >"$WORK/worker2.log" 2>&1 &
WORKER=$!
sleep 15
REPORT=$(curl -sf -X POST "$PREFECT_API_URL/artifacts/filter" -H 'content-type: application/json' \
    -d '{"artifacts": {"key": {"any_": ["ui-demo-report"]}}}' | sed -n 's/^\[{"id":"\([0-9a-f-]\{36\}\)".*/\1/p')
shot "http://127.0.0.1:$PORT/deployments" docs/prefect-deployments.png
shot "http://127.0.0.1:$PORT/runs/flow-run/$RUN" docs/prefect-run.png
shot "http://127.0.0.1:$PORT/artifacts" docs/prefect-artifacts.png
shot "http://127.0.0.1:$PORT/artifacts/artifact/$REPORT" docs/prefect-report.png
echo "wrote docs/prefect-{deployments,run,artifacts,report}.png (flow run $RUN, report artifact $REPORT)"
