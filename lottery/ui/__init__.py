"""The experiment's report inside the Airflow UI (the ``lottery_report`` plugin's code).

``report_data``: what the page shows, read from a run's work directory (no Airflow import);
``report_page``: the FastAPI app the api-server mounts, its routes and their access rules;
``page_template``: the page's HTML. See docs/report-page.md.
"""
