//! Bar charts with error bars and reference lines, as SVG text.

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

/// A vertical bar chart. The y axis spans the bars, intervals and references with some margin.
pub fn bar_chart(title: &str, y_label: &str, bars: &[Bar], references: &[Reference]) -> String {
    let (width, height) = (60.0 + 46.0 * bars.len().max(1) as f64 + 170.0, 430.0);
    let (left, right, top, bottom) = (60.0, 170.0, 40.0, 150.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let mut values: Vec<f64> = bars.iter().map(|b| b.value).collect();
    values.extend(
        bars.iter()
            .filter_map(|b| b.interval)
            .flat_map(|(lo, hi)| [lo, hi]),
    );
    values.extend(references.iter().map(|r| r.value));
    values.retain(|v| v.is_finite());
    let (mut lo, mut hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.1).max(0.01);
    let (y_min, y_max) = (lo - pad, hi + pad);
    let y = |v: f64| top + plot_h * (1.0 - (v - y_min) / (y_max - y_min));
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"DejaVu Sans, Arial, sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{:.1}\" y=\"22\" font-size=\"14\" text-anchor=\"middle\">{}</text>\n",
        width / 2.0,
        escape(title)
    );
    for i in 0..=5 {
        let v = y_min + (y_max - y_min) * i as f64 / 5.0;
        svg.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e0e0e0\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.3}</text>\n",
            left + plot_w,
            y(v),
            y(v),
            left - 6.0,
            y(v) + 4.0
        ));
    }
    svg.push_str(&format!(
        "<text transform=\"translate(14,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        top + plot_h / 2.0,
        escape(y_label)
    ));
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
