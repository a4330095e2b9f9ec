"""The report's HTML (Jinja2, autoescaped: every value from the run is text, never markup).

Self-contained: styles inline, images as ``data:`` URIs, no script, no
external request, so the file opens the same from a share, a mail or a
bucket. Sections carry ids (``status``, ``scores``, ``flagged``,
``throughput``, ``drift``) for readers and tests.
"""

from __future__ import annotations

import jinja2

SOURCE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>cxr-ray screening report: {{ model.name }} {{ model.version[:12] }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:60rem;color:#212121;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;border-bottom:1px solid #ccc;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.2rem .6rem;text-align:left}
th{background:#f5f5f5}.num{text-align:right;font-variant-numeric:tabular-nums}
img.chart{max-width:100%}.muted{color:#757575}
.grid{display:flex;flex-wrap:wrap;gap:.5rem}figure{margin:0;border:1px solid #ddd;padding:.3rem;width:10.5rem;font-size:.8rem}
img.thumb{width:100%;height:7rem;object-fit:contain;background:#000}.nothumb{height:3rem}.rank{font-weight:600}
.warn{background:#ffebee;border-left:4px solid #c62828;padding:.5rem .8rem;margin:.4rem 0}
.note{background:#fff8e1;border-left:4px solid #f9a825;padding:.5rem .8rem;margin:.4rem 0}
.ok{background:#e8f5e9;border-left:4px solid #2e7d32;padding:.5rem .8rem;margin:.4rem 0}
</style></head><body>
<h1>Screening report</h1>
<p class="muted">{{ output }} &middot; model {{ model.name }} {{ model.version[:12] }} ({{ model.arch }})
&middot; run {{ run_id }} &middot; {{ generated_at }}</p>
<table>
<tr><th>rows</th><td class="num" id="rows">{{ rows }}</td></tr>
<tr><th>flagged</th><td class="num" id="flagged-count">{{ flagged }}</td></tr>
<tr><th>flagged rate (of ok rows)</th><td class="num">{{ flagged_rate }}</td></tr>
<tr><th>threshold</th><td class="num">{{ "%.4f"|format(threshold) }}</td></tr>
<tr><th>complete</th><td>{{ "yes" if complete else "no: " ~ missing ~ " inputs missing" }}</td></tr>
</table>

<section id="status"><h2>Status and error codes</h2>
<table><tr><th>status</th><th>rows</th></tr>
{% for name, count in status %}<tr data-status="{{ name }}"><td>{{ name }}</td><td class="num">{{ count }}</td></tr>
{% endfor %}</table>
<table><tr><th>error code</th><th>rows</th></tr>
{% for code, count in error_codes %}<tr data-code="{{ code }}"><td>{{ code }}</td><td class="num">{{ count }}</td></tr>
{% else %}<tr><td colspan="2" class="muted">none</td></tr>{% endfor %}</table>
<img class="chart" alt="rows by status and error code" src="{{ charts.counts }}"></section>

<section id="scores"><h2>Scores</h2>
<p>{{ scored }} ok rows scored; {{ flagged }} flagged (score &ge; {{ "%.4f"|format(threshold) }}), a rate of
{{ flagged_rate }}.</p>
<img class="chart" alt="score histogram" src="{{ charts.scores }}"></section>

<section id="flagged"><h2>Top {{ top|length }} flagged inputs</h2>
<p class="muted">Pseudonymous identifiers only (keyed instance pseudonyms, or a digest of the input path that
also names its heatmap under <code>_heatmaps/</code>); match them with the Parquet rows.</p>
<div class="grid">
{% for row in top %}<figure class="flagged-row" data-score="{{ "%.6f"|format(row.score) }}"><div class="rank">#{{ loop.index }}
&middot; score {{ "%.4f"|format(row.score) }}</div>
{% if row.thumbnail %}<img class="thumb" alt="heatmap" src="{{ row.thumbnail }}">{% else %}<div class="nothumb muted">{{ "heatmap not written" if heatmaps else "no heatmap (--heatmaps none)" }}</div>{% endif %}
<figcaption><code>{{ row.input_id }}</code>{% if row.study %}<br><code>study {{ row.study }}</code>{% endif %}</figcaption></figure>
{% else %}<p class="muted">No input was flagged.</p>{% endfor %}</div></section>

<section id="throughput"><h2>Throughput</h2>
<table>{% for run in runs %}<tr><th>run {{ run.run_id }}</th><td>{{ run.screened }} screened in {{ run.seconds }} s:
{{ run.images_per_s }} images/s</td></tr>{% endfor %}
{% if steady %}<tr><th>steady (this run)</th><td>{{ steady }} images/s</td></tr>{% endif %}</table>
<img class="chart" alt="throughput over time" src="{{ charts.throughput }}"></section>

<section id="drift"><h2>Drift check against the training data</h2>
{% if not drift.available %}<p class="note" id="drift-unavailable">Drift check {{ drift.reason }}.</p>
{% else %}
{% for message in drift.warnings %}<p class="warn drift-warning">{{ message }}</p>{% endfor %}
{% if not drift.warnings %}<p class="ok" id="drift-ok">No significant shift: every compared distribution has
PSI &le; {{ significant }}{% if drift.screened_images < min_images %} (or too few images, {{ drift.screened_images }}
&lt; {{ min_images }}, to call one){% endif %}.</p>{% endif %}
<p class="muted">{{ drift.screened_images }} screened ok images against {{ drift.reference_images }} validation
images. PSI below {{ moderate }}: no meaningful change; {{ moderate }}-{{ significant }}: moderate, worth watching;
above {{ significant }}: significant shift.</p>
<table><tr><th>distribution</th><th>PSI</th><th>KS</th><th>level</th></tr>
{% for c in drift.checks %}<tr class="drift-check" data-name="{{ c.name }}" data-level="{{ c.level }}"><td>{{ labels.get(c.name, c.name) }}</td>
<td class="num">{{ "%.3f"|format(c.psi) }}</td><td class="num">{{ "%.3f"|format(c.ks) if c.ks is not none else "" }}</td>
<td>{{ c.level }}</td></tr>{% endfor %}</table>
{% if not_compared %}<p class="muted">Not compared (absent from the fingerprint or from the screening output): {{ not_compared|join(", ") }}.</p>{% endif %}
<img class="chart" alt="drift PSI per distribution" src="{{ charts.drift }}">
{% endif %}</section>
</body></html>
"""

TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(SOURCE)
