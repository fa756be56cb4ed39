#!/usr/bin/env bash
# Entrypoint of every container of docker-compose.yaml (run under tini). Prepares the process
# environment, then execs the service's command unchanged (`airflow scheduler`, `spark-class ...`).
#
# 1. Spark: executors on spark-worker connect back to the driver, which runs inside the Celery
#    task on airflow-worker; a container's hostname (its id) is not resolvable from the others,
#    so every container advertises its IP address to Spark (SPARK_LOCAL_HOSTNAME).
# 2. GPU workers: Docker gives a replica reserving `count: 1` GPU the host's *first* GPU, the same
#    one for every replica. On a multi-GPU host run the replicas with GPU_WORKER_GPUS=all (each
#    sees every GPU) and each one claims a distinct GPU here: an exclusive flock on
#    $LOTTERY_GPU_LOCK_DIR/<GPU uuid>.lock, held by this process tree for the container's life,
#    and CUDA_VISIBLE_DEVICES set to that GPU. With one visible GPU nothing is done.
set -euo pipefail

log() { echo "entrypoint: $*" >&2; }

if [[ -z "${SPARK_LOCAL_HOSTNAME:-}" ]]; then
    ip="$(hostname -i 2>/dev/null || true)"
    ip="${ip%% *}"
    if [[ -n "$ip" && "$ip" != 127.* ]]; then
        export SPARK_LOCAL_HOSTNAME="$ip"
    fi
fi

claim_gpu() {
    local dir="$1" uuids=() uuid fd attempt
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    mapfile -t uuids < <(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null | tr -d ' ')
    (( ${#uuids[@]} > 1 )) || return 0
    mkdir -p "$dir"
    for attempt in $(seq 1 "${LOTTERY_GPU_CLAIM_ATTEMPTS:-120}"); do
        for uuid in "${uuids[@]}"; do
            exec {fd}>>"$dir/$uuid.lock"
            if flock -n "$fd"; then
                # fd stays open across exec: the lock lives as long as the worker and its children.
                export CUDA_VISIBLE_DEVICES="$uuid"
                log "claimed GPU $uuid (${#uuids[@]} visible; lock $dir/$uuid.lock)"
                return 0
            fi
            exec {fd}>&-
        done
        (( attempt == 1 )) && log "all ${#uuids[@]} GPUs are claimed by other replicas; waiting for one"
        sleep 5
    done
    log "no free GPU among ${#uuids[@]} after ${LOTTERY_GPU_CLAIM_ATTEMPTS:-120} attempts: more replicas than GPUs?"
    exit 1
}

if [[ -n "${LOTTERY_GPU_LOCK_DIR:-}" && -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    claim_gpu "$LOTTERY_GPU_LOCK_DIR"
fi

exec "$@"
