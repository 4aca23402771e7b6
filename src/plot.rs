//! Pictures where a picture says more: the confusion matrix and the learning curve, as SVG
//! (plotters' SVG backend needs no fonts or C libraries, so it builds on every board).
//! This is the only module that touches plotters.

use std::path::Path;

use plotters::prelude::*;

use crate::head::metrics::Confusion;
use crate::store::{write_atomic, StoreError};

/// One line of a learning curve.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(shots, mean accuracy, std)` points.
    pub points: Vec<(f64, f64, f64)>,
    /// Dashed (used for the pixel baseline).
    pub dashed: bool,
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::format(path, format!("cannot draw plot: {e}"))
}

/// Draws a confusion matrix (rows: true class, columns: predicted, last column `unknown`).
pub fn confusion_svg(path: &Path, c: &Confusion, title: &str) -> Result<(), StoreError> {
    let svg = confusion_svg_string(c, title)?;
    write_atomic(path, |w| std::io::Write::write_all(w, svg.as_bytes()))
}

/// [`confusion_svg`] as an SVG document in memory (the kiosk's web page shows it).
pub fn confusion_svg_string(c: &Confusion, title: &str) -> Result<String, StoreError> {
    let path = Path::new("the confusion matrix");
    let n = c.labels.len();
    let cell = 56u32;
    let margin_left = 150u32;
    let margin_top = 110u32;
    let w = margin_left + cell * (n as u32 + 1) + 30;
    let h = margin_top + cell * n as u32 + 40;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let font = ("sans-serif", 14).into_font();
        root.draw(&Text::new(
            title.to_string(),
            (10, 10),
            ("sans-serif", 18).into_font(),
        ))
        .map_err(|e| plot_err(path, e))?;
        root.draw(&Text::new(
            "true \\ predicted",
            (10, margin_top as i32 - 24),
            font.clone(),
        ))
        .map_err(|e| plot_err(path, e))?;
        for (r, row) in c.counts.iter().enumerate() {
            let total: usize = row.iter().sum::<usize>().max(1);
            let y0 = (margin_top + cell * r as u32) as i32;
            root.draw(&Text::new(
                c.labels[r].clone(),
                (10, y0 + cell as i32 / 2 - 7),
                font.clone(),
            ))
            .map_err(|e| plot_err(path, e))?;
            for (col, count) in row.iter().enumerate() {
                let x0 = (margin_left + cell * col as u32) as i32;
                let share = *count as f64 / total as f64;
                let shade = (255.0 * (1.0 - share)) as u8;
                let colour = if col == r {
                    RGBColor(shade, 255, shade)
                } else {
                    RGBColor(255, shade, shade)
                };
                root.draw(&Rectangle::new(
                    [(x0, y0), (x0 + cell as i32 - 2, y0 + cell as i32 - 2)],
                    colour.filled(),
                ))
                .map_err(|e| plot_err(path, e))?;
                root.draw(&Text::new(
                    count.to_string(),
                    (x0 + 8, y0 + cell as i32 / 2 - 7),
                    font.clone(),
                ))
                .map_err(|e| plot_err(path, e))?;
            }
        }
        for col in 0..=n {
            let x0 = (margin_left + cell * col as u32) as i32;
            let name = c
                .labels
                .get(col)
                .cloned()
                .unwrap_or_else(|| "unknown".into());
            let style = font.clone().transform(FontTransform::Rotate270);
            root.draw(&Text::new(
                name,
                (x0 + cell as i32 / 2 - 7, margin_top as i32 - 6),
                style,
            ))
            .map_err(|e| plot_err(path, e))?;
        }
        root.present().map_err(|e| plot_err(path, e))?;
    }
    Ok(svg)
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws accuracy against examples per class, one line per series, with ±1 std whiskers.
pub fn curve_svg(
    path: &Path,
    series: &[Series],
    title: &str,
    chance: f64,
) -> Result<(), StoreError> {
    let svg = curve_svg_string(series, title, chance)?;
    write_atomic(path, |w| std::io::Write::write_all(w, svg.as_bytes()))
}

/// [`curve_svg`] as an SVG document in memory (the kiosk's web page shows it).
pub fn curve_svg_string(series: &[Series], title: &str, chance: f64) -> Result<String, StoreError> {
    let path = Path::new("the learning curve");
    let max_x = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..max_x * 1.05, 0.0..1.0)
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("examples per class")
            .y_desc("accuracy")
            .draw()
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, chance), (max_x * 1.05, chance)],
                BLACK.mix(0.3),
            ))
            .map_err(|e| plot_err(path, e))?
            .label(format!("chance ({chance:.2})"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.3)));
        for (i, s) in series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let style = ShapeStyle::from(&colour).stroke_width(2);
            let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (p.0, p.1)).collect();
            let drawn = if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))
                    .map_err(|e| plot_err(path, e))?
            } else {
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(|e| plot_err(path, e))?
            };
            drawn
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, colour.filled())))
                .map_err(|e| plot_err(path, e))?;
            chart
                .draw_series(s.points.iter().map(|(x, m, sd)| {
                    PathElement::new(
                        vec![(*x, (m - sd).max(0.0)), (*x, (m + sd).min(1.0))],
                        colour,
                    )
                }))
                .map_err(|e| plot_err(path, e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    Ok(svg)
}
