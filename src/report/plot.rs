//! Charts as SVG text: bars with error bars and reference lines, lines (loss curves, ladders)
//! and heatmaps (PGR matrices).

/// One bar: label, value, and the interval drawn as an error bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub interval: Option<(f64, f64)>,
}

/// A horizontal reference line (e.g. the ceiling).
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub label: String,
    pub value: f64,
    pub color: &'static str,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The opening of a chart: the SVG element, a white background and the title.
fn open_svg(width: f64, height: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"DejaVu Sans, Arial, sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{:.1}\" y=\"22\" font-size=\"14\" text-anchor=\"middle\">{}</text>\n",
        width / 2.0,
        escape(title)
    )
}

/// The range of `values` (finite ones) with 10% margins; (0, 1) when there are none.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.1).max(0.01);
    (lo - pad, hi + pad)
}

/// The vertical extent of a plot area: maps values in [y_min, y_max] to pixel rows.
#[derive(Clone, Copy)]
struct YScale {
    top: f64,
    plot_h: f64,
    y_min: f64,
    y_max: f64,
}

impl YScale {
    fn y(self, v: f64) -> f64 {
        self.top + self.plot_h * (1.0 - (v - self.y_min) / (self.y_max - self.y_min))
    }
}

/// A chart's SVG up to its data: the header with the title, then the y grid and label of the
/// plot area (left, top, width, height) over the range; and the scale of that area.
fn start_chart(
    (width, height, title): (f64, f64, &str),
    area: (f64, f64, f64, f64),
    range: (f64, f64),
    y_label: &str,
) -> (String, YScale) {
    let mut svg = open_svg(width, height, title);
    svg.push_str(&y_grid(area, range, y_label));
    let (_, top, _, plot_h) = area;
    let (y_min, y_max) = range;
    (
        svg,
        YScale {
            top,
            plot_h,
            y_min,
            y_max,
        },
    )
}

/// Six horizontal grid lines with their values, and the y axis' label.
fn y_grid(
    (left, top, plot_w, plot_h): (f64, f64, f64, f64),
    (y_min, y_max): (f64, f64),
    y_label: &str,
) -> String {
    let scale = YScale {
        top,
        plot_h,
        y_min,
        y_max,
    };
    let y = |v: f64| scale.y(v);
    let mut svg = String::new();
    for i in 0..=5 {
        let v = y_min + (y_max - y_min) * i as f64 / 5.0;
        svg.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e0e0e0\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left + plot_w,
            y(v),
            y(v),
            left - 6.0,
            y(v) + 4.0,
            tick(v, y_max - y_min)
        ));
    }
    svg.push_str(&format!(
        "<text transform=\"translate(14,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        top + plot_h / 2.0,
        escape(y_label)
    ));
    svg
}

/// A tick value with as many decimals as the axis' span needs.
fn tick(v: f64, span: f64) -> String {
    if span >= 50.0 {
        format!("{v:.0}")
    } else if span >= 5.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Colours of series, in order (Tableau 10).
pub const PALETTE: [&str; 10] = [
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d",
    "#ff9da6", "#bab0ac",
];

/// One line of a line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend entry (series with the same label share one entry).
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: &'static str,
    pub dashed: bool,
    /// Circles at the points (ladders); none for dense curves (losses).
    pub markers: bool,
}

/// A line chart. `x_names`, when given, names the x positions 0, 1, ... (a categorical axis,
/// e.g. the models of a ladder); otherwise the x axis is numeric.
pub fn line_chart(
    title: &str,
    (x_label, y_label): (&str, &str),
    series: &[Series],
    x_names: Option<&[String]>,
) -> String {
    let (width, height) = (700.0, 400.0);
    let bottom = if x_names.is_some() { 120.0 } else { 50.0 };
    let (left, right, top) = (64.0, 250.0, 40.0);
    let (plot_w, plot_h) = (width - left - right, height - top - bottom);
    let (y_min, y_max) = padded_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let (x_min, x_max) = match x_names {
        Some(names) => (-0.5, names.len().max(1) as f64 - 0.5),
        None => {
            let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
            let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
            if lo.is_finite() && hi > lo {
                (lo, hi)
            } else {
                (0.0, 1.0)
            }
        }
    };
    let x = |v: f64| left + plot_w * (v - x_min) / (x_max - x_min);
    let (mut svg, scale) = start_chart(
        (width, height, title),
        (left, top, plot_w, plot_h),
        (y_min, y_max),
        y_label,
    );
    let y = |v: f64| scale.y(v);
    let base = top + plot_h;
    svg.push_str(&format!(
        "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{base:.1}\" y2=\"{base:.1}\" stroke=\"black\"/>\n",
        left + plot_w
    ));
    match x_names {
        Some(names) => {
            for (i, name) in names.iter().enumerate() {
                let lx = x(i as f64);
                svg.push_str(&format!(
                    "<text transform=\"translate({lx:.1},{:.1}) rotate(35)\" text-anchor=\"start\">{}</text>\n",
                    base + 12.0,
                    escape(name)
                ));
            }
        }
        None => {
            for i in 0..=5 {
                let v = x_min + (x_max - x_min) * i as f64 / 5.0;
                svg.push_str(&format!(
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
                    x(v),
                    base + 16.0,
                    tick(v, x_max - x_min)
                ));
            }
        }
    }
    svg.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
        left + plot_w / 2.0,
        height - 8.0,
        escape(x_label)
    ));
    let mut legend: Vec<(&str, &str, bool)> = Vec::new();
    for s in series {
        let points: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
            .collect();
        let dash = if s.dashed {
            " stroke-dasharray=\"6,4\""
        } else {
            ""
        };
        svg.push_str(&format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"{dash}/>\n",
            points.join(" "),
            s.color
        ));
        if s.markers {
            for p in &points {
                let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
                svg.push_str(&format!(
                    "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3\" fill=\"{}\"/>\n",
                    s.color
                ));
            }
        }
        if !legend.iter().any(|(l, _, _)| *l == s.label) {
            legend.push((&s.label, s.color, s.dashed));
        }
    }
    for (i, (label, color, dashed)) in legend.iter().enumerate() {
        let ly = top + 12.0 + 18.0 * i as f64;
        let dash = if *dashed {
            " stroke-dasharray=\"6,4\""
        } else {
            ""
        };
        svg.push_str(&format!(
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            left + plot_w + 10.0,
            left + plot_w + 30.0,
            left + plot_w + 34.0,
            ly + 4.0,
            escape(label)
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

/// A heatmap of `values[row][column]` (None: no cell) with each value written in its cell;
/// colours run from red (`lo`) through white to blue (`hi`), clamped.
pub fn heatmap(
    title: &str,
    (row_label, column_label): (&str, &str),
    (rows, columns): (&[String], &[String]),
    values: &[Vec<Option<f64>>],
    (lo, hi): (f64, f64),
) -> String {
    let cell = 72.0;
    let (left, top, bottom) = (170.0, 50.0, 130.0);
    // Room on the right for the last column's slanted label.
    let width = left + cell * columns.len().max(1) as f64 + 120.0;
    let height = top + cell * rows.len().max(1) as f64 + bottom;
    let mut svg = open_svg(width, height, title);
    let color = |v: f64| {
        let t = ((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 2.0 - 1.0;
        let (r, g, b) = if t < 0.0 {
            (255.0, 255.0 * (1.0 + t * 0.7), 255.0 * (1.0 + t * 0.7))
        } else {
            (255.0 * (1.0 - t * 0.7), 255.0 * (1.0 - t * 0.45), 255.0)
        };
        format!("rgb({:.0},{:.0},{:.0})", r, g, b)
    };
    for (i, row) in values.iter().enumerate() {
        for (j, value) in row.iter().enumerate() {
            let (cx, cy) = (left + cell * j as f64, top + cell * i as f64);
            let (fill, text) = match value {
                Some(v) if v.is_finite() => (color(*v), format!("{v:.2}")),
                _ => ("#f4f4f4".to_string(), String::new()),
            };
            svg.push_str(&format!(
                "<rect x=\"{cx:.1}\" y=\"{cy:.1}\" width=\"{cell}\" height=\"{cell}\" fill=\"{fill}\" stroke=\"white\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{text}</text>\n",
                cx + cell / 2.0,
                cy + cell / 2.0 + 4.0
            ));
        }
    }
    for (i, name) in rows.iter().enumerate() {
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left - 6.0,
            top + cell * i as f64 + cell / 2.0 + 4.0,
            escape(name)
        ));
    }
    for (j, name) in columns.iter().enumerate() {
        svg.push_str(&format!(
            "<text transform=\"translate({:.1},{:.1}) rotate(35)\" text-anchor=\"start\">{}</text>\n",
            left + cell * j as f64 + cell / 2.0,
            top + cell * rows.len() as f64 + 12.0,
            escape(name)
        ));
    }
    svg.push_str(&format!(
        "<text transform=\"translate(14,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n</svg>\n",
        top + cell * rows.len() as f64 / 2.0,
        escape(row_label),
        left + cell * columns.len() as f64 / 2.0,
        height - 8.0,
        escape(column_label)
    ));
    svg
}

/// The width and height attributes of a chart made here.
fn size_of(svg: &str) -> (f64, f64) {
    let attribute = |name: &str| {
        svg.split_once(&format!(" {name}=\""))
            .and_then(|(_, rest)| rest.split_once('"'))
            .and_then(|(v, _)| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (attribute("width"), attribute("height"))
}

/// Charts made here, placed side by side in one SVG (each keeps its size).
pub fn side_by_side(charts: &[String]) -> String {
    let sizes: Vec<(f64, f64)> = charts.iter().map(|c| size_of(c)).collect();
    let width: f64 = sizes.iter().map(|s| s.0).sum::<f64>().max(1.0);
    let height = sizes.iter().map(|s| s.1).fold(1.0, f64::max);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let mut x = 0.0;
    for (chart, (w, _)) in charts.iter().zip(&sizes) {
        // The chart's own root element becomes a nested viewport at its offset.
        svg.push_str(&chart.replacen("<svg ", &format!("<svg x=\"{x:.0}\" y=\"0\" "), 1));
        x += w;
    }
    svg.push_str("</svg>\n");
    svg
}

/// A vertical bar chart. The y axis spans the bars, intervals and references with some margin.
pub fn bar_chart(title: &str, y_label: &str, bars: &[Bar], references: &[Reference]) -> String {
    let (width, height) = (60.0 + 46.0 * bars.len().max(1) as f64 + 170.0, 430.0);
    let (left, right, top, bottom) = (60.0, 170.0, 40.0, 150.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let (y_min, y_max) = padded_range(
        bars.iter()
            .map(|b| b.value)
            .chain(
                bars.iter()
                    .filter_map(|b| b.interval)
                    .flat_map(|(lo, hi)| [lo, hi]),
            )
            .chain(references.iter().map(|r| r.value)),
    );
    let (mut svg, scale) = start_chart(
        (width, height, title),
        (left, top, plot_w, plot_h),
        (y_min, y_max),
        y_label,
    );
    let y = |v: f64| scale.y(v);
    let slot = plot_w / bars.len().max(1) as f64;
    let base = y(y_min.max(0.0).min(y_max));
    for (i, bar) in bars.iter().enumerate() {
        let x = left + slot * i as f64 + slot * 0.15;
        let w = slot * 0.7;
        let top_y = y(bar.value).min(base);
        let h = (y(bar.value) - base).abs();
        svg.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{top_y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"#4c78a8\"/>\n"
        ));
        if let Some((lo, hi)) = bar.interval {
            let cx = x + w / 2.0;
            svg.push_str(&format!(
                "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
                 <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
                 <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
                y(lo),
                y(hi),
                cx - 5.0,
                cx + 5.0,
                y(lo),
                y(lo),
                cx - 5.0,
                cx + 5.0,
                y(hi),
                y(hi)
            ));
        }
        let lx = x + w / 2.0;
        let ly = top + plot_h + 10.0;
        svg.push_str(&format!(
            "<text transform=\"translate({lx:.1},{ly:.1}) rotate(45)\" text-anchor=\"start\">{}</text>\n",
            escape(&bar.label)
        ));
    }
    for (i, r) in references.iter().enumerate() {
        let ry = y(r.value);
        svg.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{ry:.1}\" y2=\"{ry:.1}\" stroke=\"{}\" stroke-dasharray=\"6,4\" stroke-width=\"1.5\"/>\n\
             <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-dasharray=\"6,4\" stroke-width=\"1.5\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{} ({:.3})</text>\n",
            left + plot_w,
            r.color,
            left + plot_w + 10.0,
            left + plot_w + 30.0,
            top + 12.0 + 18.0 * i as f64,
            top + 12.0 + 18.0 * i as f64,
            r.color,
            left + plot_w + 34.0,
            top + 16.0 + 18.0 * i as f64,
            escape(&r.label),
            r.value
        ));
    }
    svg.push_str(&format!(
        "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{base:.1}\" y2=\"{base:.1}\" stroke=\"black\"/>\n</svg>\n",
        left + plot_w
    ));
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_a_bar_per_method_and_escapes_labels() {
        let bars = vec![
            Bar {
                label: "xent[a<b]".into(),
                value: 0.7,
                interval: Some((0.65, 0.75)),
            },
            Bar {
                label: "edl".into(),
                value: 0.72,
                interval: None,
            },
        ];
        let refs = vec![Reference {
            label: "ceiling".into(),
            value: 0.8,
            color: "#d62728",
        }];
        let svg = bar_chart("Accuracy", "test accuracy", &bars, &refs);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("fill=\"#4c78a8\"").count(), 2);
        assert!(svg.contains("xent[a&lt;b]"));
        assert!(svg.contains("ceiling (0.800)"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}

/// Rasterises an SVG to PNG bytes; text is drawn with the system's fonts (where none is
/// installed, the chart is drawn without its labels).
pub fn svg_to_png(svg: &str) -> anyhow::Result<Vec<u8>> {
    let mut options = resvg::usvg::Options::default();
    options.fontdb_mut().load_system_fonts();
    let tree = resvg::usvg::Tree::from_str(svg, &options)
        .map_err(|e| anyhow::anyhow!("parsing SVG: {e}"))?;
    let size = tree.size().to_int_size();
    let mut pixmap =
        resvg::tiny_skia::Pixmap::new(size.width(), size.height()).ok_or_else(|| {
            anyhow::anyhow!("cannot allocate a {}x{} image", size.width(), size.height())
        })?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap
        .encode_png()
        .map_err(|e| anyhow::anyhow!("encoding PNG: {e}"))
}

#[cfg(test)]
mod png_tests {
    use super::*;

    #[test]
    fn png_has_the_svg_size_and_signature() {
        let svg = bar_chart(
            "t",
            "y",
            &[Bar {
                label: "a".into(),
                value: 0.5,
                interval: Some((0.4, 0.6)),
            }],
            &[],
        );
        let png = svg_to_png(&svg).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, at bytes 16..24
        let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
        assert_eq!((width, height), (276, 430));
    }
}

#[cfg(test)]
mod chart_tests {
    use super::*;

    fn series(label: &str, points: Vec<(f64, f64)>, dashed: bool) -> Series {
        Series {
            label: label.into(),
            points,
            color: PALETTE[0],
            dashed,
            markers: true,
        }
    }

    #[test]
    fn line_chart_places_points_and_dedupes_the_legend() {
        let s = vec![
            series("weak: a<b", vec![(0.0, 0.5), (1.0, 0.6), (2.0, 0.7)], false),
            series("weak: a<b", vec![(1.0, 0.55)], false),
            series("ceiling", vec![(0.0, 0.6), (2.0, f64::NAN)], true),
        ];
        let names = vec!["m0".to_string(), "m1".into(), "m2".into()];
        let svg = line_chart("t", ("x", "y"), &s, Some(&names));
        assert_eq!(svg.matches("<polyline").count(), 3);
        // Non-finite points are left out; markers only for finite points.
        assert_eq!(svg.matches("<circle").count(), 3 + 1 + 1);
        // One legend entry per label, escaped.
        assert_eq!(svg.matches("weak: a&lt;b</text>").count(), 1);
        assert!(svg.contains("stroke-dasharray"));
        // Categorical x: the first and last models sit half a slot inside the plot.
        let (left, plot_w) = (64.0, 700.0 - 64.0 - 250.0);
        let x0 = left + plot_w * 0.5 / 3.0;
        assert!(svg.contains(&format!("points=\"{x0:.1},")), "{svg}");
        assert!(svg_to_png(&svg).is_ok());
    }

    #[test]
    fn heatmap_colours_and_writes_each_cell() {
        let rows = vec!["w1".to_string(), "w2".into()];
        let columns = vec!["s1".to_string(), "s2".into()];
        let values = vec![vec![Some(1.0), Some(-1.0)], vec![None, Some(0.0)]];
        let svg = heatmap(
            "p",
            ("weak", "strong"),
            (&rows, &columns),
            &values,
            (-1.0, 1.0),
        );
        assert!(svg.contains(">1.00<") && svg.contains(">-1.00<") && svg.contains(">0.00<"));
        // hi is blue, lo red, the middle white, a missing cell grey.
        assert!(svg.contains("rgb(77,140,255)"), "{svg}");
        assert!(svg.contains("rgb(255,77,77)"));
        assert!(svg.contains("rgb(255,255,255)"));
        assert!(svg.contains("#f4f4f4"));
    }

    #[test]
    fn side_by_side_adds_the_widths_and_renders() {
        let a = heatmap(
            "a",
            ("r", "c"),
            (&["x".to_string()], &["y".to_string()]),
            &[vec![Some(0.5)]],
            (-1.0, 1.0),
        );
        let (wa, ha) = size_of(&a);
        let both = side_by_side(&[a.clone(), a]);
        assert_eq!(size_of(&both), (2.0 * wa, ha));
        assert!(both.contains(&format!("<svg x=\"{wa:.0}\" y=\"0\"")));
        let png = svg_to_png(&both).unwrap();
        let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
        assert_eq!(width as f64, 2.0 * wa);
    }
}
