"""The report page's Jinja2 template (kept in a module: no package data to install).

Relative links (``plot.png``, ``results.csv``, ``model.keras?ticket=...``) resolve under the run's
page URL, which ends in a slash. Links to task logs open in the whole UI (``target="_top"``): the
page itself is shown in an iframe of the DAG run's "Report" tab.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
{% if refresh %}<meta http-equiv="refresh" content="{{ refresh }}">{% endif %}
<style>
 body { font-family: system-ui, sans-serif; margin: 1rem 1.5rem; color: #1a202c; font-size: 14px; }
 h1 { font-size: 1.3rem; margin: 0 0 .3rem; } h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
 .muted { color: #5a6472; } .notice { background: #fff8e1; border: 1px solid #f0d77a; padding: .6rem .8rem; }
 .corrupt { background: #fdecea; border: 1px solid #e99a92; padding: .6rem .8rem; }
 table { border-collapse: collapse; } td, th { border: 1px solid #d5d9e0; padding: .2rem .5rem; text-align: right; }
 th { background: #f3f5f8; } td.match { font-weight: bold; background: #e6f4ea; }
 td.failed, td.corrupt, td.missing { color: #b3261e; } td.queued, td.running { color: #8a8f98; }
 img.plot { width: 100%; max-width: 720px; height: auto; border: 1px solid #d5d9e0; }
 ul.problems li { margin: .15rem 0; } code { font-size: .92em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<div class="muted">DAG run <code>{{ facts.run_id }}</code> of <code>{{ facts.dag_id }}</code>: <b id="run-state">{{ facts.state }}</b>
{% if refresh %} &middot; refreshes every {{ refresh }} s while the run is in progress{% endif %}</div>
{% if message %}<p class="notice" id="message">{{ message }}</p>{% endif %}
{% if view %}
{% if view.notice %}<p class="notice" id="notice">{{ view.notice }}</p>{% endif %}
{% if view.corrupt %}<div class="corrupt" id="corrupt"><b>Damaged files</b> (delete them to recompute; the rest of the page is still right):
<ul>{% for item in view.corrupt %}<li><code>{{ item }}</code></li>{% endfor %}</ul></div>{% endif %}
{% if view.rows %}
{% if view.replicates > 1 %}<p id="replicates">{{ view.replicates }} replicates (seeds {{ view.config.seed }} to
 {{ view.config.seed + view.replicates - 1 }}): each cell is the mean &plusmn; sample standard deviation (n: the replicates done)
 of their val accuracy (%), and a ticket matches when its mean is within {{ tolerance }} percentage points of the dense mean.</p>
<p id="dense">{% if view.dense %}<b>Dense network</b>: val accuracy (%) {{ spread(view.dense_accuracy, view.dense_std, view.dense.n) }}.
{%- else %}<b>Dense network</b>: not trained yet.{% endif %}
 Tickets done: <b id="done">{{ view.done }} of {{ view.expected }}</b> (over the replicates).</p>
{% else %}<p id="dense">{% if view.dense %}<b>Dense network</b>: val accuracy {{ pct(view.dense_accuracy) }}
 ({{ view.dense.get("epochs", "?") }} epochs).{% else %}<b>Dense network</b>: not trained yet.{% endif %}
 Tickets done: <b id="done">{{ view.done }} of {{ view.expected }}</b>.</p>{% endif %}
<p><img class="plot" id="plot" src="plot.png?v={{ plot_version }}" alt="accuracy vs sparsity" width="960" height="600"></p>
<p id="downloads">Download: <a href="results.csv" download>results.csv</a> &middot; <a href="plot.png?download=1">the plot (PNG)</a>
{% if view.models %} &middot; <form style="display:inline" action="model.keras" method="get">
 <label>a ticket's model <select name="ticket" id="ticket">{% for name in view.models %}<option>{{ name }}</option>{% endfor %}</select></label>
 <button type="submit">model.keras</button></form>{% endif %}</p>
{% for table in tables %}
<h2>{{ table.title }}</h2>
<table class="tickets" id="table-{{ table.control or 'tickets' }}"><tr><th>sparsity</th><th>weights left</th>
{% for label in view.labels %}<th>rewind {{ label }}</th>{% endfor %}</tr>
{% for line in table.lines %}<tr><td>{{ line.sparsity }}</td><td>{{ line.left }}</td>
{% for cell in line.cells %}<td class="{{ cell.css }}" title="{{ cell.title }}">{{ cell.text }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endfor %}
<p class="muted">Bold, green: matches the dense network (at most {{ tolerance }} percentage points below it).</p>
{% if view.matching %}<ul>{% for label, m in view.matching.items() %}<li>rewind {{ label }}: {% if not m.done %}no results yet
{% elif m.matching %}{{ m.matching }} of {{ m.done }} levels match; the sparsest keeps {{ pct(m.sparsest_remaining) }} of the weights
(<code>{{ m.sparsest_mask_id }}</code>){% else %}none of {{ m.done }} levels match{% endif %}</li>{% endfor %}</ul>{% endif %}
{% endif %}
{% if view.stability %}<h2 id="stability-title">Instability ({{ view.stability | selectattr("status", "equalto", "ok") | list | length }} of {{ view.stability | length }} analyses {% if view.replicates > 1 %}with a result{% else %}done{% endif %})</h2>
<p class="muted">Two copies trained from each rewind point with different data orders: the highest val error on the line
between them above the mean of its ends, in percentage points{% if view.replicates > 1 %} (mean &plusmn; std (n) over the replicates){% endif %}.
Bold, green: below {{ "%g" | format(view.stability_threshold) }} points, stable.</p>
<table class="tickets" id="table-stability"><tr><th>network</th><th>rewind</th><th>instability (points)</th><th>on the training subset</th><th>val accuracy (%)</th></tr>
{% for line in stability_lines %}<tr><td>{{ line.network }}</td><td>{{ line.rewind }}</td><td class="{{ line.css }}" title="{{ line.title }}">{{ line.cells[0] }}</td>
<td>{{ line.cells[1] }}</td><td>{{ line.cells[2] }}</td></tr>{% endfor %}</table>
<p><img class="plot" id="instability-plot" src="instability.png?v={{ instability_version }}" alt="instability vs rewind point" width="960" height="600"></p>
<ul id="rewind-here">{% for sentence in view.rewind_here %}<li>{{ sentence }}</li>{% endfor %}</ul>{% endif %}
{% macro tickets(items, css) %}<ul class="{{ css }}" id="{{ css }}">{% for p in items %}<li>{{ p.what }}: <b>{{ p.status }}</b>
{% if p.detail %}<span class="muted">{{ p.detail }}</span>{% endif %}
{% if p.instance %} &middot; <a target="_top" href="{{ log_url(p.instance) }}">log of {{ p.instance.task_id }}
{%- if p.instance.map_index >= 0 %} [{{ p.instance.name or p.instance.map_index }}]{% endif %}</a> ({{ p.instance.state or "not started" }}){% endif %}
</li>{% endfor %}</ul>{% endmacro %}
{% if view.waiting %}<h2 id="waiting-title">Queued or running ({{ view.waiting | length }})</h2>{{ tickets(view.waiting, "waiting") }}{% endif %}
<h2 id="problems-title">Failed or missing ({{ view.problems | length }})</h2>
{% if view.problems %}{{ tickets(view.problems, "problems") }}
<p id="rerun">{% if facts.finished %}To re-run every failed ticket at once: fix the cause, then on
<a target="_top" href="{{ run_url }}">the run's page</a> press <b>Clear Run</b> and choose <b>Clear only failed tasks</b>
(the CLI: <code>lottery rerun-failed --run-id {{ facts.run_id }}</code>). Finished tickets are not trained again, and the
report is rewritten.{% else %}The run is still in progress: once it has finished, fix the cause and clear its failed tasks
(<a target="_top" href="{{ run_url }}">the run's page</a>, <b>Clear Run</b>, <b>Clear only failed tasks</b>).{% endif %}</p>
{% else %}<p>None{% if view.rows %}: every combination so far finished{% endif %}.</p>{% endif %}
{% if view.experiment_id %}<h2>Experiment</h2>
{% if view.replicates > 1 %}<p>Replicate set <code id="experiment-id">{{ view.experiment_id }}</code>, directory <code>{{ view.report_dir }}</code>
(its <code>report/report.md</code>, <code>results.csv</code> and <code>summary.csv</code>); each replicate's work directory, with its own report and models:</p>
<ul id="replicate-dirs">{% for d in view.replicate_dirs %}<li>replicate {{ loop.index0 }}: <code>{{ d }}</code></li>{% endfor %}</ul>
{% else %}<p>Id <code id="experiment-id">{{ view.experiment_id }}</code>, work directory <code>{{ facts.workdir }}</code>.</p>{% endif %}
{% if view.config %}<p>Non-default settings: {% for k, v in view.changed.items() %}<code>{{ k }}={{ v }}</code>{% if not loop.last %}, {% endif %}{% else %}none{% endfor %}.</p>
<details><summary>The whole config</summary><pre>{{ config_json }}</pre></details>{% endif %}{% endif %}
{% endif %}
</body>
</html>
"""
