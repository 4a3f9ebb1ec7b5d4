#!/usr/bin/env bash
# Serve the project's MLflow store on 127.0.0.1: the store the commands use without --tracking-uri
# ($EQUICSP_MLFLOW_DIR, else this folder: mlflow.db and artifacts/).
#   bash mlflow/serve.sh [--port PORT]     (default 5000; a bare PORT works too)
# The address is printed once the server answers (its first start can take a minute).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
port=5000
while [ $# -gt 0 ]; do
    case "$1" in
        --port) port=${2:?--port needs a number}; shift 2 ;;
        --port=*) port=${1#--port=}; shift ;;
        -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        [0-9]*) port=$1; shift ;;
        *) echo "serve.sh: unknown option $1 (usage: bash mlflow/serve.sh [--port PORT])" >&2; exit 2 ;;
    esac
done
case "$port" in ''|*[!0-9]*) echo "serve.sh: --port needs a number, not '$port'" >&2; exit 2 ;; esac
store=${EQUICSP_MLFLOW_DIR:-$here}
mkdir -p "$store/artifacts"
# The project's virtual environment's mlflow when there is one (the README's setup makes .venv).
mlflow=${MLFLOW:-$( [ -x "$here/../.venv/bin/mlflow" ] && echo "$here/../.venv/bin/mlflow" || echo mlflow )}
"$mlflow" server --host 127.0.0.1 --port "$port" \
    --backend-store-uri "sqlite:///$store/mlflow.db" \
    --artifacts-destination "$store/artifacts" >&2 &  # its log on stderr: stdout carries the address alone
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' INT TERM EXIT
echo "starting the MLflow UI for $store/mlflow.db on port $port ..." >&2
python=$( [ -x "$here/../.venv/bin/python" ] && echo "$here/../.venv/bin/python" || echo python3 )
until "$python" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:$port/health" 2>/dev/null; do
    if ! kill -0 "$server" 2>/dev/null; then
        wait "$server" || true
        echo "serve.sh: the MLflow server stopped before it answered (is port $port taken? try --port)" >&2
        trap - EXIT
        exit 1
    fi
    sleep 1
done
# ?workflowType=machine_learning: MLflow 3 otherwise opens an experiment on its (empty) GenAI view.
echo "MLflow UI: http://127.0.0.1:$port/#/experiments?workflowType=machine_learning   (Ctrl-C stops it)"
wait "$server"
