//! Bar charts as inline SVG text: no script, no fonts to fetch. Each bar is
//! one `data-point` element so tests (and people reading the DOM) can count
//! what was drawn.

use std::fmt::Write;

/// Chart size in SVG user units.
const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 300.0;
/// Room for the axis labels.
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 96.0;
const TOP: f64 = 16.0;
const RIGHT: f64 = 12.0;

/// `s` with `& < > " '` escaped, safe in text and in quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A vertical bar chart named `name` (its `data-chart`), one bar per
/// `(label, value)`, the y axis titled `y_label`. With no points it says so
/// and draws no `data-point`.
pub fn bars(name: &str, y_label: &str, points: &[(String, i64)]) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg data-chart="{}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" aria-label="{}">"#,
        escape(name),
        escape(y_label)
    );
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let base = TOP + plot_h;
    // Axes.
    let _ = write!(
        s,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}" stroke="#555"/><line x1="{LEFT}" y1="{base}" x2="{}" y2="{base}" stroke="#555"/>"##,
        WIDTH - RIGHT
    );
    let _ = write!(
        s,
        r#"<text class="axis" x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    if points.is_empty() {
        let _ = write!(
            s,
            r#"<text class="empty" x="{}" y="{}" text-anchor="middle">no data</text></svg>"#,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
        return s;
    }
    let max = points.iter().map(|p| p.1).max().unwrap_or(0).max(1);
    // y ticks: 0, half, max.
    for v in [0, max / 2, max] {
        let y = base - plot_h * v as f64 / max as f64;
        let _ = write!(
            s,
            r##"<text class="tick" x="{}" y="{:.1}" text-anchor="end">{v}</text><line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/>"##,
            LEFT - 4.0,
            y + 4.0,
            WIDTH - RIGHT
        );
    }
    let step = plot_w / points.len() as f64;
    // Thin bars when there are many, never wider than 56 units.
    let bar_w = (step * 0.8).clamp(1.0, 56.0);
    // Label at most ~12 bars on the x axis so text does not overlap.
    let every = points.len().div_ceil(12).max(1);
    for (i, (label, v)) in points.iter().enumerate() {
        let h = plot_h * (*v).max(0) as f64 / max as f64;
        let x = LEFT + step * i as f64 + (step - bar_w) / 2.0;
        let label = escape(label);
        let _ = write!(
            s,
            r##"<rect data-point="{label}" data-value="{v}" x="{x:.1}" y="{:.1}" width="{bar_w:.1}" height="{h:.1}" fill="#3b6ea8"><title>{label}: {v}</title></rect>"##,
            base - h
        );
        if i % every == 0 {
            let cx = x + bar_w / 2.0;
            let _ = write!(
                s,
                r#"<text class="tick" x="{cx:.1}" y="{:.1}" text-anchor="end" transform="rotate(-35 {cx:.1} {:.1})">{label}</text>"#,
                base + 14.0,
                base + 14.0
            );
        }
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_data_point_per_bar() {
        let pts: Vec<(String, i64)> = (0..30).map(|i| (format!("m{i}"), i)).collect();
        let svg = bars("per-minute", "sends", &pts);
        assert_eq!(svg.matches("data-point=").count(), 30);
        assert!(svg.starts_with(r#"<svg data-chart="per-minute""#));
        assert!(svg.ends_with("</svg>"));
    }

    #[test]
    fn empty_chart_draws_no_point() {
        let svg = bars("mta", "recipients", &[]);
        assert_eq!(svg.matches("data-point=").count(), 0);
        assert!(svg.contains("no data"));
    }

    #[test]
    fn labels_are_escaped() {
        let pts = vec![("<script>alert(\"x\")</script>&'".to_string(), 3)];
        let svg = bars("domains", "a<b", &pts);
        assert!(!svg.contains("<script"));
        assert!(svg.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"));
        assert!(svg.contains("a&lt;b"));
    }
}
