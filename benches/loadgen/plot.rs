//! The latency plot (SVG, plotters): latency by percentile on log–log axes, one line
//! per run, with KMS's 250 ms per-call timeout drawn across so the headroom is visible
//! at a glance.

use std::path::Path;

use anyhow::{Result, anyhow};
use hdrhistogram::Histogram;
use plotters::prelude::*;

/// KMS's timeout for one call to an XKS proxy.
pub const KMS_TIMEOUT_MS: f64 = 250.0;

/// Draws `series` (name, latency histogram in µs) into an SVG file at `path`.
pub fn latency_svg(path: &Path, title: &str, series: &[(String, &Histogram<u64>)]) -> Result<()> {
    let drawn: Vec<(&String, Vec<(f64, f64)>)> = series
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(name, h)| (name, spectrum(h)))
        .collect();
    // x is 1/(1-q): 1 = p0, 10 = p90, 100 = p99, 1000 = p99.9 ...
    let x_max = drawn
        .iter()
        .flat_map(|(_, pts)| pts.last().map(|p| p.0))
        .fold(1000.0f64, f64::max);
    let lows = drawn.iter().flat_map(|(_, p)| p.iter().map(|v| v.1));
    let y_min = lows.fold(f64::MAX, f64::min).clamp(0.001, 1.0) * 0.8;
    let y_max = drawn
        .iter()
        .flat_map(|(_, p)| p.iter().map(|v| v.1))
        .fold(KMS_TIMEOUT_MS * 2.0, f64::max)
        * 1.2;

    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d((1.0..x_max).log_scale(), (y_min..y_max).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, points)) in drawn.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .draw_series(LineSeries::new(
            [(1.0, KMS_TIMEOUT_MS), (x_max, KMS_TIMEOUT_MS)],
            RED.stroke_width(3),
        ))
        .map_err(|e| err(&e))?
        .label("KMS timeout (250 ms)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(3)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Points (1/(1-q), latency ms) from p0 to the last percentile the sample supports.
fn spectrum(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let count = h.len().max(1) as f64;
    // Beyond 1/(1-q) = count the histogram has no more information.
    let x_end = count.max(2.0);
    let steps = 240;
    (0..=steps)
        .map(|i| {
            let x = x_end.powf(f64::from(i) / f64::from(steps));
            let q = 1.0 - 1.0 / x;
            (x, h.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect()
}

fn percentile_label(x: f64) -> String {
    let q = 100.0 * (1.0 - 1.0 / x);
    if q < 1e-9 {
        "p0".to_owned()
    } else {
        let text = format!("{q:.4}");
        format!("p{}", text.trim_end_matches('0').trim_end_matches('.'))
    }
}
