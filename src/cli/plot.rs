//! SVG plots for `postflow eval --plot`: a reliability diagram (classification) or an
//! interval-coverage plot (regression) of named predictives, given as plain arrays so
//! the plotting knows nothing of the eval command. Plotters' SVG backend writes text as
//! SVG `<text>`, so no font files are needed.
use std::path::Path;

use plotters::prelude::*;

use ndarray::Array2;

use crate::metrics::{interval_coverage, reliability_bins, ECE_BINS};
use crate::{Error, Result};

/// Nominal levels of the coverage plot.
const LEVELS: [f64; 11] = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95];

/// Line colours, in the order the series are given.
const COLORS: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189)];

type Curve<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// A reliability diagram (`ECE_BINS` equal-width confidence bins) of each named class-probability
/// matrix [N, C] against `labels` [N], written as SVG to `path`.
pub(super) fn reliability(path: &Path, name: &str, labels: &[i64], series: &[(&str, &Array2<f64>)]) -> Result<()> {
    let mut curves: Vec<Curve> = Vec::new();
    for (&(label, probs), &color) in series.iter().zip(COLORS.iter().cycle()) {
        let bins = reliability_bins(probs, labels, ECE_BINS)?;
        let points = bins.iter().filter(|b| b.count > 0).map(|b| (b.confidence, b.accuracy)).collect();
        curves.push((label, color, points));
    }
    let title = format!("{name}: reliability ({ECE_BINS} bins)");
    save(path, &title, "confidence (top label)", "accuracy", &curves)
}

/// Observed coverage of central Gaussian intervals at nominal levels 0.05–0.95 for each named
/// predictive (mean, variance) [N, k] against `y` [N, k], written as SVG to `path`.
pub(super) fn coverage(
    path: &Path,
    name: &str,
    y: &Array2<f32>,
    series: &[(&str, &Array2<f64>, &Array2<f64>)],
) -> Result<()> {
    let mut curves: Vec<Curve> = Vec::new();
    for (&(label, mean, var), &color) in series.iter().zip(COLORS.iter().cycle()) {
        let points =
            LEVELS.iter().map(|&l| interval_coverage(mean, var, y, l).map(|c| (l, c))).collect::<Result<Vec<_>>>()?;
        curves.push((label, color, points));
    }
    let title = format!("{name}: central interval coverage");
    save(path, &title, "nominal level", "observed coverage", &curves)
}

/// Draw the plot in memory, then write it whole (an existing file survives a failed write).
fn save(path: &Path, title: &str, x_desc: &str, y_desc: &str, curves: &[Curve]) -> Result<()> {
    let mut svg = String::new();
    draw(&mut svg, title, x_desc, y_desc, curves)
        .map_err(|e| Error::invalid(format!("{}: could not draw the plot: {e}", path.display())))?;
    super::output::write_file(path, svg.as_bytes())
}

fn draw(
    svg: &mut String,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    curves: &[Curve],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, (640, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(54)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart
        .draw_series(DashedLineSeries::new([(0.0, 0.0), (1.0, 1.0)], 6, 4, BLACK.mix(0.5).stroke_width(1)))?
        .label("ideal")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.5)));
    for (label, color, points) in curves {
        let color = *color;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}
