//! SVG plots: TTFT against conversation length (one series per run, e.g. aLoRA with reuse and
//! the same adapter as LoRA), and latency CDFs.

use std::path::{Path, PathBuf};

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::Report;

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

type Points = Vec<(f64, f64)>;

/// Non-base requests' (prompt tokens, TTFT ms) per report, and the median per target length.
fn ttft_points(r: &Report) -> (Points, Points) {
    let pts: Vec<(f64, f64)> = r
        .records
        .iter()
        .filter(|x| x.out.ok && x.kind != "base")
        .map(|x| (x.out.prompt_tokens as f64, x.out.ttft * 1e3))
        .collect();
    let med = r
        .by_length
        .values()
        .filter(|g| g.completed > 0)
        .map(|g| {
            (
                g.total_input_tokens as f64 / g.completed as f64,
                g.ttft_ms.median,
            )
        })
        .collect();
    (pts, med)
}

type TtftChart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, LogCoord<f64>>>;

/// A white chart of TTFT (ms, log scale from `y`) against `x_desc` on `0..xmax`.
fn ttft_chart<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    caption: &str,
    x_desc: &str,
    xmax: f64,
    (ymin, ymax): (f64, f64),
) -> anyhow::Result<TtftChart<'a, 'b>> {
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..xmax, (ymin.min(ymax / 10.0)..ymax).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("TTFT (ms, log)")
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// The legend at `pos`, then the file written.
fn finish<'a, 'b: 'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>,
    root: &DrawingArea<SVGBackend<'b>, Shift>,
    pos: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// TTFT (log scale) against prompt length, per report. Writes `path`.
pub fn ttft_vs_length(reports: &[Report], path: &Path) -> anyhow::Result<()> {
    let series: Vec<_> = reports.iter().map(ttft_points).collect();
    let all = series.iter().flat_map(|(p, _)| p.iter());
    let xmax = all.clone().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let ymin = all
        .clone()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .max(1e-3)
        / 1.5;
    let ymax = all.map(|p| p.1).fold(1.0, f64::max) * 1.5;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let mut chart = ttft_chart(
        &root,
        "Time to first token of adapter calls vs conversation length",
        "prompt tokens",
        xmax,
        (ymin, ymax),
    )?;
    for (i, (r, (pts, med))) in reports.iter().zip(&series).enumerate() {
        let c = Palette99::pick(i).to_rgba();
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.mix(0.5).filled())))
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(med.iter().copied(), c.stroke_width(2)))
            .map_err(err)?
            .label(format!("{} (median)", r.label))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    finish(&mut chart, &root, SeriesLabelPosition::UpperLeft)
}

/// The requests a latency CDF is about: the adapter calls when a run has any (the intrinsics
/// workload, whose base turns would otherwise dominate), else every successful request.
fn cdf_records(r: &Report) -> Vec<&crate::run::Record> {
    let ok: Vec<_> = r.records.iter().filter(|x| x.out.ok).collect();
    let calls: Vec<_> = ok
        .iter()
        .copied()
        .filter(|x| x.kind == "intrinsic")
        .collect();
    if calls.is_empty() {
        ok
    } else {
        calls
    }
}

/// Empirical CDF of one latency per report (milliseconds). Writes `path`.
pub fn cdf(
    reports: &[Report],
    what: &str,
    value: impl Fn(&crate::run::Record) -> f64,
    path: &Path,
) -> anyhow::Result<()> {
    let series: Vec<Vec<f64>> = reports
        .iter()
        .map(|r| {
            let mut v: Vec<f64> = cdf_records(r).into_iter().map(&value).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v
        })
        .collect();
    // Log scale: adapter calls with reuse and without differ by orders of magnitude.
    let xmax = series.iter().flatten().copied().fold(1e-3, f64::max) * 1.5;
    let xmin = series
        .iter()
        .flatten()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .clamp(1e-3, xmax / 10.0)
        / 1.5;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{what} CDF"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..1f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(format!("{what} (ms, log)"))
        .y_desc("fraction of requests")
        .draw()
        .map_err(err)?;
    for (i, (r, v)) in reports.iter().zip(&series).enumerate() {
        let c = Palette99::pick(i).to_rgba();
        let n = v.len() as f64;
        let pts = v.iter().enumerate().map(|(k, x)| (*x, (k + 1) as f64 / n));
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(err)?
            .label(r.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    finish(&mut chart, &root, SeriesLabelPosition::LowerRight)
}

/// Each request's TTFT (log) against when it was sent, per report: intrinsic calls as dots, base
/// turns as crosses, so a race shows where calls waited behind base prefills. Writes `path`.
pub fn ttft_timeline(reports: &[Report], path: &Path) -> anyhow::Result<()> {
    let ok = |r: &'_ Report| -> Vec<(f64, f64, bool)> {
        r.records
            .iter()
            .filter(|x| x.out.ok)
            .map(|x| (x.start, x.out.ttft * 1e3, x.kind == "intrinsic"))
            .collect()
    };
    let series: Vec<_> = reports.iter().map(ok).collect();
    let all = series.iter().flatten();
    let xmax = all.clone().map(|p| p.0).fold(1e-3, f64::max) * 1.05;
    let ymax = all.clone().map(|p| p.1).fold(1.0, f64::max) * 1.5;
    let ymin = all.map(|p| p.1).fold(f64::INFINITY, f64::min).max(1e-3) / 1.5;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let mut chart = ttft_chart(
        &root,
        "Time to first token over the run (dots: adapter calls, crosses: base turns)",
        "request sent (s from the start)",
        xmax,
        (ymin, ymax),
    )?;
    for (i, (r, pts)) in reports.iter().zip(&series).enumerate() {
        let c = Palette99::pick(i).to_rgba();
        chart
            .draw_series(
                pts.iter()
                    .filter(|p| !p.2)
                    .map(|p| Cross::new((p.0, p.1), 4, c.stroke_width(1))),
            )
            .map_err(err)?;
        chart
            .draw_series(
                pts.iter()
                    .filter(|p| p.2)
                    .map(|p| Circle::new((p.0, p.1), 3, c.filled())),
            )
            .map_err(err)?
            .label(r.label.clone())
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
    }
    finish(&mut chart, &root, SeriesLabelPosition::UpperRight)
}

/// All plots for `reports` into `dir`; returns the files written.
pub fn all(reports: &[Report], dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut files = vec![
        dir.join("ttft_vs_length.svg"),
        dir.join("ttft_cdf.svg"),
        dir.join("e2el_cdf.svg"),
    ];
    ttft_vs_length(reports, &files[0])?;
    let calls = reports
        .iter()
        .any(|r| r.records.iter().any(|x| x.kind == "intrinsic"));
    let what = |m: &str| {
        if calls {
            format!("{m} of adapter calls")
        } else {
            m.to_string()
        }
    };
    cdf(reports, &what("TTFT"), |r| r.out.ttft * 1e3, &files[1])?;
    cdf(
        reports,
        &what("End-to-end latency"),
        |r| r.out.e2e * 1e3,
        &files[2],
    )?;
    if calls {
        let f = dir.join("ttft_timeline.svg");
        ttft_timeline(reports, &f)?;
        files.push(f);
    }
    Ok(files)
}
