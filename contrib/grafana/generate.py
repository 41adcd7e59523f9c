"""Writes blast.json, the Grafana dashboard over blast's Prometheus metrics.
Edit the panels here, run `python3 contrib/grafana/generate.py`, commit both;
tests/metrics.rs checks every series the dashboard asks for is one blast
exposes, and that every family blast exposes has a panel."""
import json
import os
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
C = 'campaign=~"$campaign"'
panels = []
y = 0
pid = 1
def row(title):
    global y, pid
    panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    pid += 1; y += 1
def panel(title, targets, kind="timeseries", unit="short", x=0, w=12, h=8, desc="", extra=None):
    global pid
    p = {"type": kind, "title": title, "id": pid, "datasource": DS, "description": desc,
         "gridPos": {"h": h, "w": w, "x": x, "y": y},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {},
         "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)}
                     for i, (e, l) in enumerate(targets)]}
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi"}}
    if extra: p.update(extra)
    pid += 1
    panels.append(p)
def down(h=8):
    global y
    y += h

row("Campaign")
panel("Messages per second by outcome",
      [(f'sum by (outcome) (rate(blast_messages_total{{{C}}}[$__rate_interval]))', "{{outcome}}")],
      unit="ops", w=12, desc="Every recipient's outcome: sent = the MTA took it.")
panel("Sent per second by worker",
      [(f'sum by (campaign, worker) (rate(blast_messages_total{{{C}, outcome="sent"}}[$__rate_interval]))', "{{campaign}} {{worker}}")],
      unit="ops", x=12, w=12)
down()
panel("Recipients pending", [(f'max by (campaign) (blast_recipients_pending{{{C}}})', "{{campaign}}")],
      kind="stat", w=6, h=5, desc="Not yet answered, over every worker of the campaign.")
panel("Time left at the current rate",
      [(f'max by (campaign) (blast_recipients_pending{{{C}}}) / sum by (campaign) (rate(blast_messages_total{{{C}, outcome=~"sent|failed|deferred|suppressed|unrendered"}}[5m]))', "{{campaign}}")],
      kind="stat", unit="s", x=6, w=6, h=5)
panel("Live workers", [(f'max by (campaign) (blast_campaign_workers{{{C}}} * on (campaign, worker) blast_run_active)', "{{campaign}}")],
      kind="stat", x=12, w=6, h=5)
panel("Refused or deferred (share of answers, 5m)",
      [(f'sum by (campaign) (rate(blast_messages_total{{{C}, outcome=~"failed|deferred"}}[5m])) / sum by (campaign) (rate(blast_messages_total{{{C}, outcome=~"sent|failed|deferred"}}[5m]))', "{{campaign}}")],
      kind="stat", unit="percentunit", x=18, w=6, h=5)
down(5)
row("Relays")
panel("SMTP transaction time (p50, p99) by relay",
      [(f'histogram_quantile(0.5, sum by (relay, le) (rate(blast_smtp_transaction_seconds_bucket{{{C}}}[$__rate_interval])))', "p50 {{relay}}"),
       (f'histogram_quantile(0.99, sum by (relay, le) (rate(blast_smtp_transaction_seconds_bucket{{{C}}}[$__rate_interval])))', "p99 {{relay}}")],
      unit="s", w=12)
panel("In flight and concurrency limit by relay",
      [(f'sum by (relay) (blast_relay_in_flight{{{C}}})', "in flight {{relay}}"),
       (f'sum by (relay) (blast_relay_concurrency_limit{{{C}}})', "limit {{relay}}")],
      x=12, w=12, desc="The adaptive limit halves on congestion marks and grows while the relay keeps up.")
down()
panel("Congestion marks by relay and kind",
      [(f'sum by (relay, kind) (rate(blast_relay_congestion_marks_total{{{C}}}[$__rate_interval]))', "{{relay}} {{kind}}")],
      unit="ops", w=8)
panel("Circuit: open now, times opened",
      [(f'max by (relay) (blast_relay_circuit_open{{{C}}})', "open {{relay}}"),
       (f'sum by (relay) (increase(blast_relay_circuit_opened_total{{{C}}}[1h]))', "opened in the last hour {{relay}}")],
      w=8, x=8, desc="1 while the relay gets no messages (connection failures or a burst of 4xx).")
panel("Per relay: deferred, failed, rerouted, reconnects per second",
      [(f'sum by (relay, outcome) (rate(blast_messages_total{{{C}, relay!="", outcome=~"deferred|failed|rerouted|possibly_duplicated"}}[$__rate_interval]))', "{{relay}} {{outcome}}"),
       (f'sum by (relay) (rate(blast_connection_retries_total{{{C}}}[$__rate_interval]))', "{{relay}} reconnects")],
      unit="ops", w=8, x=16)
down()
row("blast and the MTA")
panel("Render time per message (p50, p99)",
      [(f'histogram_quantile(0.5, sum by (le) (rate(blast_render_seconds_bucket{{{C}}}[$__rate_interval])))', "p50"),
       (f'histogram_quantile(0.99, sum by (le) (rate(blast_render_seconds_bucket{{{C}}}[$__rate_interval])))', "p99")],
      unit="s", w=8)
panel("Ledger: flush time p99 and rows per batch",
      [(f'histogram_quantile(0.99, sum by (le) (rate(blast_ledger_flush_seconds_bucket{{{C}}}[$__rate_interval])))', "flush p99 (s)"),
       (f'sum(rate(blast_ledger_batch_rows_sum{{{C}}}[$__rate_interval])) / sum(rate(blast_ledger_batch_rows_count{{{C}}}[$__rate_interval]))', "rows per batch")],
      w=8, x=8, desc="A slow database shows here first: flushes grow, then the send rate falls.")
panel("MTA queue (queue_probe)",
      [(f'max by (worker) (blast_mta_queue_messages{{{C}}})', "{{worker}}")],
      w=8, x=16, desc="Only with delivery.queue_probe / run-due --queue-probe.")
down()
row("Inbound (blast serve)")
panel("Unsubscribe requests per second by result",
      [('sum by (result) (rate(blast_unsubscribe_requests_total[$__rate_interval]))', "{{result}}")],
      unit="ops", w=8)
panel("Bounces ingested per hour by kind and class",
      # Database-wide figures: every `serve` replica reports the same ones.
      [('max by (kind, class) (increase(blast_bounces_total[1h]))', "{{kind}} {{class}}")],
      w=8, x=8)
panel("Suppressed addresses by reason",
      [('sum by (reason) (max by (reason, channel) (blast_suppressed_addresses))', "{{reason}}")],
      w=8, x=16)
down()

dash = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                  "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
                   {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}],
    "title": "blast",
    "uid": "blast-campaigns",
    "description": "blast campaigns: outcomes, relays, render and ledger, the MTA queue, and the inbound path. Scrapes: blast send --metrics, blast run-due --metrics, blast serve /metrics.",
    "tags": ["blast", "email"],
    "timezone": "",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "10s",
    "time": {"from": "now-3h", "to": "now"},
    "templating": {"list": [
        {"name": "DS_PROMETHEUS", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
        {"name": "campaign", "label": "Campaign", "type": "query", "datasource": DS,
         "query": {"query": "label_values(blast_messages_total, campaign)", "refId": "campaign"},
         "definition": "label_values(blast_messages_total, campaign)",
         "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "sort": 1, "hide": 0},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blast.json")
with open(out, "w") as f:
    json.dump(dash, f, indent=2)
    f.write("\n")
