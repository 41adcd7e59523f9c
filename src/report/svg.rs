//! Bar charts as inline SVG text: no script, no fonts to fetch. Each bar is
//! one `data-point` element so tests (and people reading the DOM) can count
//! what was drawn; lines drawn over the bars (one series each, a
//! `data-series` polyline) share their x positions and y scale.

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

/// The colours of [`Line`]s, in order (then again): distinct from the bars'
/// blue and from each other.
pub const LINE_COLOURS: [&str; 8] = [
    "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#1d2330",
];

/// One series drawn as a line over a bar chart: a value per bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Its name (escaped when drawn).
    pub name: String,
    /// One value per bar, in the bars' order.
    pub values: Vec<i64>,
}

/// A vertical bar chart named `name` (its `data-chart`), one bar per
/// `(label, value)`, the y axis titled `y_label`. With no points it says so
/// and draws no `data-point`.
pub fn bars(name: &str, y_label: &str, points: &[(String, i64)]) -> String {
    bars_and_lines(name, y_label, points, &[])
}

/// [`bars`] with `lines` drawn over the bars, the i-th in
/// [`LINE_COLOURS`]`[i % 8]`, each one `polyline` with its name in
/// `data-series` and a `title`. A value past the last bar is not drawn.
pub fn bars_and_lines(
    name: &str,
    y_label: &str,
    points: &[(String, i64)],
    lines: &[Line],
) -> String {
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
    let max = points
        .iter()
        .map(|p| p.1)
        .chain(lines.iter().flat_map(|l| l.values.iter().copied()))
        .max()
        .unwrap_or(0)
        .max(1);
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
    let plot = Plot {
        step: plot_w / points.len() as f64,
        base,
        height: plot_h,
        max,
    };
    draw_bars(&mut s, &plot, points);
    draw_lines(&mut s, &plot, points.len(), lines);
    s.push_str("</svg>");
    s
}

/// Where a chart's values go: one slot of `step` per bar, `max` at the top.
struct Plot {
    step: f64,
    base: f64,
    height: f64,
    max: i64,
}

impl Plot {
    /// The y of value `v` (negative values at the axis).
    fn y(&self, v: i64) -> f64 {
        self.base - self.height * v.max(0) as f64 / self.max as f64
    }
}

/// One `rect` per point, with its label under every few bars.
fn draw_bars(s: &mut String, plot: &Plot, points: &[(String, i64)]) {
    let step = plot.step;
    let base = plot.base;
    // Thin bars when there are many, never wider than 56 units.
    let bar_w = (step * 0.8).clamp(1.0, 56.0);
    // Label at most ~12 bars on the x axis so text does not overlap.
    let every = points.len().div_ceil(12).max(1);
    for (i, (label, v)) in points.iter().enumerate() {
        let top = plot.y(*v);
        let h = base - top;
        let x = LEFT + step * i as f64 + (step - bar_w) / 2.0;
        let label = escape(label);
        let _ = write!(
            s,
            r##"<rect data-point="{label}" data-value="{v}" x="{x:.1}" y="{top:.1}" width="{bar_w:.1}" height="{h:.1}" fill="#3b6ea8"><title>{label}: {v}</title></rect>"##,
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
}

/// One `polyline` per line over the first `bars` slots.
fn draw_lines(s: &mut String, plot: &Plot, bars: usize, lines: &[Line]) {
    for (i, line) in lines.iter().enumerate() {
        let mut xy: Vec<String> = line
            .values
            .iter()
            .take(bars)
            .enumerate()
            .map(|(k, v)| {
                let x = LEFT + plot.step * k as f64 + plot.step / 2.0;
                format!("{x:.1},{:.1}", plot.y(*v))
            })
            .collect();
        // A single point twice: with round caps it shows as a dot.
        if xy.len() == 1 {
            xy.push(xy[0].clone());
        }
        let name = escape(&line.name);
        let _ = write!(
            s,
            r#"<polyline data-series="{name}" points="{}" fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round" stroke-linecap="round"><title>{name}</title></polyline>"#,
            xy.join(" "),
            LINE_COLOURS[i % LINE_COLOURS.len()]
        );
    }
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
    fn one_polyline_per_line_through_the_bar_centres() {
        let pts: Vec<(String, i64)> = (0..4).map(|i| (format!("m{i}"), 10)).collect();
        let lines = [
            Line {
                name: "a".into(),
                values: vec![4, 6, 10, 0],
            },
            Line {
                name: "b".into(),
                values: vec![6],
            },
        ];
        let svg = bars_and_lines("per-minute", "sends", &pts, &lines);
        assert_eq!(svg.matches("data-point=").count(), 4);
        assert_eq!(svg.matches("<polyline ").count(), 2);
        // The plot is 692 wide from x = 56: bars 173 apart, centres at
        // 142.5, 315.5...; the top (10) at y = 16, the base (0) at 204.
        assert!(
            svg.contains(
                r#"data-series="a" points="142.5,128.8 315.5,91.2 488.5,16.0 661.5,204.0""#
            ),
            "{svg}"
        );
        // One value: a dot.
        assert!(
            svg.contains(r#"data-series="b" points="142.5,91.2 142.5,91.2""#),
            "{svg}"
        );
        assert!(svg.contains(LINE_COLOURS[0]) && svg.contains(LINE_COLOURS[1]));
    }

    #[test]
    fn labels_are_escaped() {
        let pts = vec![("<script>alert(\"x\")</script>&'".to_string(), 3)];
        let svg = bars("domains", "a<b", &pts);
        assert!(!svg.contains("<script"));
        assert!(svg.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"));
        assert!(svg.contains("a&lt;b"));
        let line = Line {
            name: "<script>x</script>\"'&".into(),
            values: vec![1],
        };
        let svg = bars_and_lines("per-minute", "sends", &pts, &[line]);
        assert!(!svg.contains("<script"));
        assert!(svg.contains(r#"data-series="&lt;script&gt;x&lt;/script&gt;&quot;&#39;&amp;""#));
    }
}
