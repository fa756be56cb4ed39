#!/usr/bin/env bash
# The airflow-init service of docker-compose.yaml; scripts/cluster_local.py runs the same script
# for the loopback cluster. Idempotent: every `docker compose up` runs it again.
#
#   1. `airflow db migrate` (creates or upgrades the metadata database);
#   2. docker/airflow_init.py: pool lottery_workers, connection spark_default -> $SPARK_MASTER_URL,
#      the admin password of the simple auth manager, a writable $LOTTERY_ARTIFACT_ROOT.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
airflow db migrate
exec python "$here/airflow_init.py"
