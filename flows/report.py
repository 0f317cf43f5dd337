"""A self-contained HTML report of one meter's billing period: daily usage chart and top subjects and groups.

The page embeds plotly.js inline (no network needed to open it). Every number is exact: the daily series
and the per-subject and per-group totals are computed from the curated events with the meter's own
aggregation (`flows.tools.query`), and the top-rows table is the published billing table itself.
"""

from __future__ import annotations

import datetime as dt
import html
import os
import zoneinfo
from typing import Any

import polars as pl

from flows import tools
from flows.storage import Storage
from meters import MeterSet

TOP = 10

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1f2933; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.meta { color: #52606d; margin: .2rem 0; } .grid { display: flex; flex-wrap: wrap; gap: 2rem; }
.grid > div { flex: 1 1 320px; }
table { border-collapse: collapse; margin-top: .5rem; font-size: .9rem; }
th, td { border-bottom: 1px solid #e4e7eb; padding: .3rem .7rem; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.null { color: #9aa5b1; font-style: italic; }
"""


def fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:,.6f}".rstrip("0").rstrip(".")
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def html_table(rows: list[dict], numeric: tuple[str, ...] = ("value", "event_count", "rank", "share")) -> str:
    if not rows:
        return '<p class="meta">no rows</p>'
    columns = list(rows[0])
    head = "".join(f'<th class="{"num" if c in numeric else ""}">{html.escape(c)}</th>' for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row[c]
            cls = "num" if c in numeric else ""
            text = html.escape(fmt(v))
            cells.append(
                f'<td class="{cls}"><span class="null">null</span></td>'
                if v is None
                else f'<td class="{cls}">{text}</td>'
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _ranked(df: pl.DataFrame, key: str, n: int) -> list[dict]:
    top = df.sort(["value", key], descending=[True, False], nulls_last=True).head(n)
    out = []
    for i, row in enumerate(top.iter_rows(named=True)):
        item = {"rank": i + 1, key: row[key], "value": row["value"]}
        out.append(item)
    return out


def build(
    root: str | Storage, meters: str | os.PathLike | MeterSet, slug: str, period: str, top: int = TOP
) -> dict[str, Any]:
    """The report's data: period bounds, the daily series and the top tables (all Polars-computed)."""
    storage = tools.open_storage(root)
    meterset = tools.load(meters)
    meter = tools.meter_of(meterset, slug)
    found = tools.find_period(storage, slug, period)
    tz = meterset.billing.timezone
    span = {"from_": found.window_start, "to": found.window_end, "tz": tz}
    daily = tools.query(storage, meterset, slug, window="DAY", **span)
    total = tools.query(storage, meterset, slug, **span)
    subjects = tools.query(storage, meterset, slug, group_by=["subject"], **span)
    groups = {key: tools.query(storage, meterset, slug, group_by=[key], **span) for key in meter.group_paths}
    return {
        "meter": meter,
        "billing": meterset.billing,
        "period": found,
        "daily": daily,
        "total": total["value"][0] if total.height else None,
        "subjects": _ranked(subjects, "subject", top),
        "subject_count": subjects.height,
        "groups": {k: _ranked(v, k, top) for k, v in groups.items()},
        "top_rows": tools.top_table(storage, slug, found.period_start, n=top),
    }


def render(root: str | Storage, meters: str | os.PathLike | MeterSet, slug: str, period: str, top: int = TOP) -> str:
    """The report as one HTML document (plotly.js inline: opens without network)."""
    import plotly.graph_objects as go

    data = build(root, meters, slug, period, top)
    meter, found, billing = data["meter"], data["period"], data["billing"]
    zone = billing.timezone
    daily: pl.DataFrame = data["daily"]
    days = [d.date().isoformat() for d in daily["window_start"].to_list()]
    chart = go.Figure(go.Bar(x=days, y=daily["value"].to_list(), marker_color="#3e7cb1", name=meter.slug))
    chart.update_layout(
        title=f"Daily {meter.aggregation.lower()} of {meter.slug} ({zone} days)",
        xaxis_title="day",
        yaxis_title="value",
        height=380,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        template="plotly_white",
    )
    chart.update_xaxes(type="date", tickformat="%b %d")  # a date axis: days without usage show as gaps
    config = {"displaylogo": False, "responsive": True}
    chart_html = chart.to_html(full_html=False, include_plotlyjs=True, div_id="daily-usage", config=config)
    subjects = data["subjects"]
    bars = go.Figure(
        go.Bar(
            x=[s["value"] for s in reversed(subjects)],
            y=[str(s["subject"]) for s in reversed(subjects)],
            orientation="h",
            marker_color="#e07a5f",
        )
    )
    bars.update_layout(
        title=f"Top {len(subjects)} subjects",
        height=max(220, 40 + 28 * len(subjects)),
        margin={"l": 140, "r": 20, "t": 50, "b": 40},
        template="plotly_white",
    )
    bars_html = bars.to_html(full_html=False, include_plotlyjs=False, div_id="top-subjects", config=config)
    start_local = found.window_start.astimezone(zoneinfo.ZoneInfo(zone))
    end_local = found.window_end.astimezone(zoneinfo.ZoneInfo(zone))
    group_sections = "".join(
        f"<div><h2>Top values of {html.escape(k)}</h2>{html_table(rows)}</div>" for k, rows in data["groups"].items()
    )
    note = (
        "Values per day, per subject and per group use the meter's aggregation over exactly those events; "
        "they add up to the period total only for SUM and COUNT."
    )
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(meter.slug)} — period {html.escape(found.period_start)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{html.escape(meter.slug)}: billing period {html.escape(found.period_start)}</h1>
<p class="meta">{html.escape(meter.description or "")}</p>
<p class="meta">{html.escape(meter.aggregation)} of {html.escape(meter.value_property or "events")} over events of type
<code>{html.escape(meter.event_type)}</code>; period [{html.escape(start_local.isoformat())},
{html.escape(end_local.isoformat())}) ({html.escape(billing.period)}, {html.escape(zone)}).</p>
<p class="meta">Period value: <strong>{html.escape(fmt(data["total"]))}</strong> ·
{data["subject_count"]} subject(s) · generated {generated}</p>
{chart_html}
<div class="grid">
<div><h2>Top subjects</h2>{html_table(subjects)}</div>
<div>{bars_html}</div>
</div>
<div class="grid">{group_sections}</div>
<h2>Largest billing rows (subject and groups)</h2>
{html_table(data["top_rows"])}
<p class="meta">{html.escape(note)}</p>
</body>
</html>
"""
