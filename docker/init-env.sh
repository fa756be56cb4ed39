#!/usr/bin/env bash
# Write ./.env for docker-compose.yaml with fresh secrets (kept if .env exists; never committed).
#   docker/init-env.sh [GPU_WORKERS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -e .env ]]; then
    echo ".env exists: keeping it (delete it to generate new secrets)" >&2
    exit 0
fi
umask 077
python3 - "${1:-1}" > .env <<'PY'
import base64, os, secrets, sys
print("# docker-compose.yaml settings (written by docker/init-env.sh). Keep private.")
print(f"GPU_WORKERS={int(sys.argv[1])}")
print("# GPUs each gpu-worker replica reserves: 1 (one GPU per host), or `all` on a multi-GPU")
print("# host, where each replica claims a distinct GPU (docker/entrypoint.sh). See docs/cluster.md.")
print("GPU_WORKER_GPUS=1")
print(f"POSTGRES_PASSWORD={secrets.token_urlsafe(24)}")
print(f"AIRFLOW_ADMIN_PASSWORD={secrets.token_urlsafe(12)}")
print(f"AIRFLOW_FERNET_KEY={base64.urlsafe_b64encode(os.urandom(32)).decode()}")
print(f"AIRFLOW_API_SECRET_KEY={secrets.token_urlsafe(32)}")
print(f"AIRFLOW_JWT_SECRET={secrets.token_urlsafe(32)}")
PY
echo "wrote .env (admin password: $(grep ^AIRFLOW_ADMIN_PASSWORD= .env | cut -d= -f2))"
