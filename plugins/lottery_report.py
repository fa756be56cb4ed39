"""The lottery_ticket report in the Airflow UI: a "Report" tab on every DAG run (and task instance)
showing ``lottery.ui.report_page``'s page, served by the api-server under its own auth.

Airflow imports every module of the plugins folder in each component: this one only registers the
app (built on its first request) and the tabs; the code is in lottery/ui/. See docs/report-page.md.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from lottery.ui.mount import URL_PREFIX, LazyApp, external_views


class LotteryReportPlugin(AirflowPlugin):
    name = "lottery_report"
    fastapi_apps = [{"app": LazyApp("lottery.ui.report_page:create_app"), "url_prefix": URL_PREFIX,
                     "name": "Lottery-ticket report"}]
    external_views = external_views()
