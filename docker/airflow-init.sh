#!/usr/bin/env bash
# The airflow-init service of docker-compose.yaml; the loopback cluster (python -m lottery.deploy.cluster,
# make cluster-up) runs the same script. Idempotent: every `docker compose up` runs it again.
#
#   1. `airflow db migrate` (creates or upgrades the metadata database);
#   2. lottery.deploy.airflow_init: pool lottery_workers, connection spark_default -> $SPARK_MASTER_URL,
#      the admin password of the simple auth manager, a writable $LOTTERY_ARTIFACT_ROOT.
set -euo pipefail
airflow db migrate
exec python -m lottery.deploy.airflow_init
