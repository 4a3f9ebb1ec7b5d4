#!/usr/bin/env bash
# Serve this project's MLflow store (the SQLite database and artifacts beside this script) on 127.0.0.1.
#   bash mlflow/serve.sh [PORT]        then open http://127.0.0.1:PORT (default 5000)
# Runs already logged to the default store (sqlite:///<project>/mlflow/mlflow.db) appear as they are.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
port=${1:-5000}
mkdir -p "$here/artifacts"
# The project's virtual environment's mlflow when there is one (the README's setup makes .venv).
mlflow=${MLFLOW:-$( [ -x "$here/../.venv/bin/mlflow" ] && echo "$here/../.venv/bin/mlflow" || echo mlflow )}
exec "$mlflow" server --host 127.0.0.1 --port "$port" \
    --backend-store-uri "sqlite:///$here/mlflow.db" \
    --artifacts-destination "$here/artifacts"
