# Source me to use the `airflow` CLI on the project-local home that `make run` / `make ui` use:
#     source scripts/airflow_env.sh && airflow dags list
# (writes .airflow/airflow.cfg first if it does not exist; LOTTERY_AIRFLOW_HOME picks another home)
_lottery_repo="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
eval "$("$_lottery_repo/.venv/bin/python" -m lottery.deploy.airflow_home env ${LOTTERY_AIRFLOW_HOME:+--home "$LOTTERY_AIRFLOW_HOME"})"
unset _lottery_repo
echo "airflow CLI -> AIRFLOW_HOME=$AIRFLOW_HOME (LOTTERY_AIRFLOW_HOME=<home> picks another)" >&2
