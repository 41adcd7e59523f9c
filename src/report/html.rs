//! A [`Report`] as one self-contained HTML page: inline CSS, inline SVG, no
//! script and nothing fetched. Every string from the database is escaped.

use std::fmt::Write;

use super::svg::{bars, bars_and_lines, escape, Line, LINE_COLOURS};
use super::{Count, Report, TOP_WORKERS};

/// The charts on the page, by `data-chart` name, with how many data points
/// (bars) each draws for `r` (what the browser test counts). The per-minute
/// chart's worker lines are `data-series` elements, one per
/// [`Report::per_minute_by_worker`].
pub fn chart_points(r: &Report) -> Vec<(&'static str, usize)> {
    vec![
        ("per-minute", r.per_minute.len()),
        ("domains", r.domains.len()),
        ("per-day", r.per_day.len()),
        ("mta", r.mta.len()),
        ("mta-delays", r.mta_delays.len()),
    ]
}

const CSS: &str = "body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1d2330;max-width:1100px;margin:24px auto;padding:0 16px;background:#fafbfc}\
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}\
.state{color:#667}.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}\
.card{background:#fff;border:1px solid #dde;border-radius:6px;padding:8px 12px}.card b{display:block;font-size:22px}\
.card span{color:#667;font-size:13px}table{border-collapse:collapse;background:#fff;width:100%}\
th,td{border:1px solid #dde;padding:4px 8px;text-align:left}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\
svg{background:#fff;border:1px solid #dde;border-radius:6px}svg text{font-size:11px;fill:#333}svg text.axis{font-size:12px}\
.reply{font-family:ui-monospace,monospace;font-size:13px;word-break:break-all}\
.legend{list-style:none;padding:0;margin:6px 0;display:flex;flex-wrap:wrap;gap:4px 16px;font-size:13px}\
.legend i{display:inline-block;width:14px;height:4px;margin-right:6px;vertical-align:middle}\
.legend i.bar{height:10px;background:#3b6ea8}";

/// The page for `r`.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    glance(&mut s, r);
    per_minute(&mut s, r);
    domains(&mut s, r);
    replies(&mut s, r);
    per_day(&mut s, r);
    s.push_str("<h2>At the MTA (blast reconcile)</h2>");
    s.push_str(&bars("mta", "recipients", &points(&r.mta)));
    s.push_str("<h2>MTA delivery delay</h2>");
    s.push_str(&bars("mta-delays", "recipients", &points(&r.mta_delays)));
    s.push_str("</body></html>\n");
    s
}

/// A chart's points from labelled counts.
fn points(counts: &[Count]) -> Vec<(String, i64)> {
    counts.iter().map(|c| (c.label.clone(), c.n)).collect()
}

/// The head of the page and the numbers at a glance.
fn glance(s: &mut String, r: &Report) {
    let t = &r.totals;
    let name = escape(&r.campaign);
    let _ = write!(
        s,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>blast report: {name}</title><style>{CSS}</style></head><body>\
         <h1>Campaign {name}</h1><div class=\"state\">state: {}</div><h2>At a glance</h2><div class=\"cards\">",
        escape(&r.state)
    );
    let rate = format!("{:.1}/s", t.mean_rate);
    let duration = format!("{:.1}s", t.duration_secs);
    let cards: Vec<(&str, String)> = vec![
        ("audience", t.audience.to_string()),
        ("sent", t.sent.to_string()),
        ("failed", t.failed.to_string()),
        ("deferred", t.deferred.to_string()),
        ("suppressed", t.suppressed.to_string()),
        ("unrendered", t.unrendered.to_string()),
        (
            "pending",
            t.pending.map_or_else(|| "?".to_string(), |p| p.to_string()),
        ),
        ("bounced", t.bounced.to_string()),
        ("complained", t.complained.to_string()),
        ("unsubscribed", t.unsubscribed.to_string()),
        ("duration", duration),
        ("mean rate", rate),
        ("peak per minute", t.peak_per_minute.to_string()),
    ];
    for (label, v) in cards {
        let _ = write!(
            s,
            "<div class=\"card\" data-total=\"{label}\"><b>{}</b><span>{label}</span></div>",
            escape(&v)
        );
    }
    s.push_str("</div>");
    if let (Some(a), Some(b)) = (&t.first_at, &t.last_at) {
        let _ = write!(
            s,
            "<p>First answer {} &middot; last answer {}</p>",
            escape(a),
            escape(b)
        );
    }
}

/// Sends per minute: the total as bars and, when several workers sent the
/// campaign, a line per worker (the busiest [`TOP_WORKERS`]) with a legend.
fn per_minute(s: &mut String, r: &Report) {
    s.push_str("<h2>Sends per minute (UTC)</h2>");
    let total = points(&r.per_minute);
    if r.per_minute_by_worker.is_empty() {
        s.push_str(&bars("per-minute", "recipients answered", &total));
        return;
    }
    let lines: Vec<Line> = r
        .per_minute_by_worker
        .iter()
        .map(|w| Line {
            name: worker_name(w.worker.as_deref()),
            values: w.points.iter().map(|p| p.n).collect(),
        })
        .collect();
    s.push_str(&bars_and_lines(
        "per-minute",
        "recipients answered",
        &total,
        &lines,
    ));
    s.push_str("<ul class=\"legend\"><li><i class=\"bar\"></i>all workers</li>");
    for (i, (line, w)) in lines.iter().zip(&r.per_minute_by_worker).enumerate() {
        let _ = write!(
            s,
            "<li data-worker=\"{name}\"><i style=\"background:{}\"></i>{name} ({})</li>",
            LINE_COLOURS[i % LINE_COLOURS.len()],
            w.total,
            name = escape(&line.name),
        );
    }
    s.push_str("</ul>");
    if r.worker_series > r.per_minute_by_worker.len() {
        let _ = write!(
            s,
            "<p>Lines for the {TOP_WORKERS} busiest of {} workers; the bars count every worker's rows.</p>",
            r.worker_series
        );
    }
}

/// How a worker is named on the page: rows written before schema v8
/// recorded none.
fn worker_name(w: Option<&str>) -> String {
    w.map_or_else(
        || "(unknown: written before schema v8)".to_string(),
        str::to_string,
    )
}

/// The destination domains: chart and table.
fn domains(s: &mut String, r: &Report) {
    s.push_str("<h2>Destination domains (top 20 by volume)</h2>");
    let pts: Vec<(String, i64)> = r
        .domains
        .iter()
        .map(|d| (d.domain.clone(), d.total))
        .collect();
    s.push_str(&bars("domains", "recipients", &pts));
    s.push_str("<table><tr><th>domain</th><th class=\"n\">total</th><th class=\"n\">sent</th><th class=\"n\">deferred</th><th class=\"n\">failed</th><th class=\"n\">bounced</th></tr>");
    for d in &r.domains {
        let _ = write!(
            s,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&d.domain), d.total, d.sent, d.deferred, d.failed, d.bounced
        );
    }
    s.push_str("</table>");
}

/// The commonest refusals.
fn replies(s: &mut String, r: &Report) {
    s.push_str("<h2>Commonest refusals (recipients not sent)</h2><table><tr><th class=\"n\">code</th><th>reply</th><th class=\"n\">recipients</th></tr>");
    for x in &r.replies {
        let _ = write!(
            s,
            "<tr><td class=\"n\">{}</td><td class=\"reply\">{}</td><td class=\"n\">{}</td></tr>",
            x.code.map_or_else(String::new, |c| c.to_string()),
            escape(&x.reply),
            x.recipients
        );
    }
    if r.replies.is_empty() {
        s.push_str("<tr><td colspan=\"3\">none</td></tr>");
    }
    s.push_str("</table>");
}

/// Bounces, complaints and unsubscribes per day: chart and table.
fn per_day(s: &mut String, r: &Report) {
    s.push_str("<h2>Bounces, complaints and unsubscribes per day</h2>");
    let pts: Vec<(String, i64)> = r
        .per_day
        .iter()
        .map(|d| (d.day.clone(), d.bounces + d.complaints + d.unsubscribes))
        .collect();
    s.push_str(&bars("per-day", "events", &pts));
    s.push_str("<table><tr><th>day</th><th class=\"n\">bounces</th><th class=\"n\">complaints</th><th class=\"n\">unsubscribes</th></tr>");
    for d in &r.per_day {
        let _ = write!(
            s,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&d.day), d.bounces, d.complaints, d.unsubscribes
        );
    }
    if r.per_day.is_empty() {
        s.push_str("<tr><td colspan=\"4\">none</td></tr>");
    }
    s.push_str("</table>");
}
