//! The plots of `kn report`, drawn with plotters: PNG (bitmap backend, encoded by the
//! `png` crate) or SVG. Text is set in DejaVu Sans, embedded in the binary, so rendering
//! needs no system font or fontconfig. Every figure sizes itself from its content
//! (relations, layers, label widths) so that labels never overlap.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

use super::raster::Raster;
use super::stats::{Effect, ProbeSummary};
use super::Report;
use crate::error::{Error, Result};

/// Image format of the plots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Bitmap, for READMEs and slides.
    #[default]
    Png,
    /// Vector, for papers.
    Svg,
}

impl Format {
    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Svg => "svg",
        }
    }
}

/// One written plot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Figure {
    /// What it shows: `layers`, `layers-by-relation`, `neurons-per-fact`,
    /// `shared-neurons`, `suppress`, `amplify`.
    pub name: String,
    /// Its file name in the report directory.
    pub file: String,
    /// Its title.
    pub title: String,
}

/// DejaVu Sans 2.37 (Bitstream Vera license, see assets/fonts/LICENSE).
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FONT: &str = "sans-serif";
const TITLE: u32 = 22;
const DESC: u32 = 16;
const TICK: u32 = 14;
const SMALL: u32 = 12;
const MARGIN: i32 = 16;
/// Knowledge neurons (matplotlib's first colour) and the control (its second).
const KN: RGBColor = RGBColor(31, 119, 180);
const CONTROL: RGBColor = RGBColor(255, 127, 14);
const MEDIAN: RGBColor = RGBColor(214, 39, 40);
const GRID: RGBColor = RGBColor(225, 225, 225);
const EMPTY_CELL: RGBColor = RGBColor(240, 240, 240);
/// Relation names longer than this are cut (with `…`) in plots; tables keep them whole.
const MAX_LABEL: usize = 28;

/// Registers the embedded font as plotters' `sans-serif` (once per process). SVGs name
/// the same family, which every viewer has.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is embedded and known to parse; were it not, every text would fail
        // to draw with a FontUnavailable error naming the plot, which is reported.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS);
    });
}

/// The embedded font, for the PNG backend.
fn font() -> ab_glyph::FontRef<'static> {
    // Embedded at build time and parsed by a unit test: it cannot fail at run time.
    ab_glyph::FontRef::try_from_slice(DEJAVU_SANS).expect("the embedded DejaVu Sans parses")
}

/// Width in pixels of `text` at `size`.
fn text_width(text: &str, size: u32) -> i32 {
    (FONT, size)
        .into_font()
        .box_size(text)
        .map(|(w, _)| w as i32)
        .unwrap_or_else(|_| (text.chars().count() as u32 * size * 6 / 10) as i32)
}

fn style(size: u32) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).color(&BLACK)
}

fn anchored(size: u32, h: HPos, v: VPos) -> TextStyle<'static> {
    style(size).pos(Pos::new(h, v))
}

fn cut(label: &str) -> String {
    if label.chars().count() <= MAX_LABEL {
        label.to_string()
    } else {
        let head: String = label.chars().take(MAX_LABEL - 1).collect();
        format!("{head}…")
    }
}

/// A percentage for a label: `45%`, `0.4%`, `−29.0%` (with `signed`, `+31.2%`).
pub fn percent(x: f64, signed: bool) -> String {
    let p = x * 100.0;
    let digits = if p.abs() < 10.0 && p != 0.0 { 1 } else { 0 };
    let body = format!("{:.*}%", digits, p.abs());
    if p < 0.0 && body.trim_start_matches(['0', '.', '%']).is_empty() {
        // −0.04% rounds to 0.0%: no sign on a zero.
        return body;
    }
    match (p < 0.0, signed && p > 0.0) {
        (true, _) => format!("−{body}"),
        (false, true) => format!("+{body}"),
        _ => body,
    }
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A figure that sizes itself and draws on any backend.
trait Plot {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

fn plot_error(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Plot {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

/// Draws `plot` into `path` in `format`.
fn save(plot: &impl Plot, path: &Path, format: Format) -> Result<()> {
    register_font();
    let (w, h) = plot.size();
    match format {
        Format::Png => {
            let mut rgb = vec![0u8; w as usize * h as usize * 3];
            {
                let root = Raster::new(&mut rgb, (w, h), font()).into_drawing_area();
                plot.draw(&root).map_err(|e| plot_error(path, e))?;
                root.present().map_err(|e| plot_error(path, e))?;
            }
            let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
            let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            encoder
                .write_header()
                .and_then(|mut writer| {
                    writer.write_image_data(&rgb)?;
                    writer.finish()
                })
                .map_err(|e| plot_error(path, e))
        }
        Format::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
                plot.draw(&root).map_err(|e| plot_error(path, e))?;
                root.present().map_err(|e| plot_error(path, e))?;
            }
            std::fs::write(path, svg).map_err(|e| Error::io(path, e))
        }
    }
}

/// Draws every figure the report has data for into `dir`.
pub fn render(report: &Report, dir: &Path, format: Format) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let mut out = |name: &str, title: String, plot: &dyn Fn(&Path) -> Result<()>| {
        let file = format!("{name}.{}", format.extension());
        plot(&dir.join(&file))?;
        figures.push(Figure {
            name: name.to_string(),
            file,
            title,
        });
        Ok::<(), Error>(())
    };

    let layers = &report.layer_distribution;
    let title = format!(
        "Refined neurons per layer ({} neurons of {} facts)",
        layers.overall.neurons, report.facts
    );
    let bars = LayerBars {
        title: title.clone(),
        share: &layers.overall.share,
    };
    out("layers", title, &|p| save(&bars, p, format))?;

    let title = "Refined neurons per layer, by relation".to_string();
    let heat = HeatMap {
        title: title.clone(),
        rows: layers
            .by_relation
            .iter()
            .map(|r| format!("{} ({})", cut(&r.relation), r.layers.neurons))
            .collect(),
        cols: (0..report.layers).map(|l| l.to_string()).collect(),
        values: layers
            .by_relation
            .iter()
            .map(|r| {
                r.layers
                    .share
                    .iter()
                    .map(|&s| (r.layers.neurons > 0).then_some(s))
                    .collect()
            })
            .collect(),
        rotate_cols: false,
        cell: (46, 26),
        x_desc: "layer".into(),
        y_desc: "relation (refined neurons)".into(),
        scale_desc: "share of the relation's neurons".into(),
        label: |v| percent(v, false),
    };
    out("layers-by-relation", title, &|p| save(&heat, p, format))?;

    let per_fact = &report.neurons_per_fact.overall;
    let title = format!("Refined neurons per fact ({} facts)", per_fact.facts);
    let hist = Histogram {
        title: title.clone(),
        counts: &per_fact.histogram,
        mean: per_fact.mean,
        median: per_fact.median,
    };
    out("neurons-per-fact", title, &|p| save(&hist, p, format))?;

    let shared = &report.shared_neurons;
    let title = "Shared refined neurons per fact pair".to_string();
    let names: Vec<String> = shared.relations.iter().map(|r| cut(r)).collect();
    let heat = HeatMap {
        title: title.clone(),
        rows: names.clone(),
        cols: names,
        values: shared.mean.clone(),
        rotate_cols: true,
        cell: (46, 26),
        x_desc: "relation".into(),
        y_desc: "relation".into(),
        scale_desc: "shared neurons per pair".into(),
        // Exact zeros plainly, so that the pairs sharing anything stand out.
        label: |v| {
            if v == 0.0 {
                "0".into()
            } else {
                format!("{v:.2}")
            }
        },
    };
    out("shared-neurons", title, &|p| save(&heat, p, format))?;

    for probe in &report.probes {
        let (verb, figure) = match probe.mode {
            super::input::ProbeMode::Suppress => ("Suppressing", "4"),
            super::input::ProbeMode::Amplify => ("Amplifying", "5"),
        };
        let factor = format!(" (×{})", probe.factor);
        let title = format!(
            "{verb} {}{factor}: gold probability change (paper: Figure {figure})",
            neurons_name(probe.method)
        );
        let bars = ProbeBars {
            title: title.clone(),
            probe,
        };
        out(&probe.name, title, &|p| save(&bars, p, format))?;
    }
    Ok(figures)
}

/// Share of refined neurons per layer: the paper's Figure 3.
struct LayerBars<'a> {
    title: String,
    share: &'a [f64],
}

impl Plot for LayerBars<'_> {
    fn size(&self) -> (u32, u32) {
        let by_layers = 160 + 44 * self.share.len() as u32;
        let by_title = text_width(&self.title, TITLE) as u32 + 2 * MARGIN as u32;
        (by_layers.max(by_title).max(720), 480)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let area = root.titled(&self.title, style(TITLE))?;
        let layers = self.share.len() as i32;
        let top = self.share.iter().copied().fold(0.0, f64::max) * 100.0;
        // Headroom for the value labels above the bars.
        let ymax = (top * 1.15).max(1.0);
        let mut chart = ChartBuilder::on(&area)
            .margin(MARGIN)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d((0..layers - 1).into_segmented(), 0.0..ymax)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            .x_labels(self.share.len())
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(l) => l.to_string(),
                _ => String::new(),
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_desc("layer")
            .y_desc("share of refined neurons (%)")
            .label_style(style(TICK))
            .axis_desc_style(style(DESC))
            .draw()?;
        chart.draw_series(self.share.iter().enumerate().map(|(l, &s)| {
            let l = l as i32;
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(l), 0.0),
                    (SegmentValue::Exact(l + 1), s * 100.0),
                ],
                KN.filled(),
            );
            bar.set_margin(0, 0, 5, 5);
            bar
        }))?;
        let bar_width = chart.plotting_area().dim_in_pixel().0 as i32 / layers.max(1);
        if bar_width >= text_width("100%", SMALL) + 6 {
            chart.draw_series(self.share.iter().enumerate().filter(|(_, &s)| s > 0.0).map(
                |(l, &s)| {
                    EmptyElement::at((SegmentValue::CenterOf(l as i32), s * 100.0))
                        + Text::new(
                            percent(s, false),
                            (0, -4),
                            anchored(SMALL, HPos::Center, VPos::Bottom),
                        )
                },
            ))?;
        }
        Ok(())
    }
}

/// Facts per number of refined neurons, with the mean and the median.
struct Histogram<'a> {
    title: String,
    counts: &'a [usize],
    mean: Option<f64>,
    median: Option<f64>,
}

/// A legend drawn in its own strip under the title, so it never covers data.
enum Key {
    Bar(RGBColor),
    Line(RGBColor),
}

fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    keys: &[(Key, String)],
) -> DrawResult<DB> {
    let widths: Vec<i32> = keys.iter().map(|(_, t)| 24 + text_width(t, TICK)).collect();
    let total: i32 = widths.iter().sum::<i32>() + 24 * (keys.len() as i32 - 1).max(0);
    let (w, h) = area.dim_in_pixel();
    let mut x = (w as i32 - total) / 2;
    let y = h as i32 / 2;
    for ((key, text), width) in keys.iter().zip(widths) {
        match key {
            Key::Bar(c) => area.draw(&Rectangle::new([(x, y - 7), (x + 16, y + 7)], c.filled()))?,
            Key::Line(c) => area.draw(&PathElement::new(
                vec![(x, y), (x + 16, y)],
                c.stroke_width(3),
            ))?,
        }
        area.draw(&Text::new(
            text.clone(),
            (x + 22, y),
            anchored(TICK, HPos::Left, VPos::Center),
        ))?;
        x += width + 24;
    }
    Ok(())
}

impl Plot for Histogram<'_> {
    fn size(&self) -> (u32, u32) {
        let by_counts = 160 + 36 * self.counts.len() as u32;
        (by_counts.clamp(720, 1400), 480)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let area = root.titled(&self.title, style(TITLE))?;
        let (key_area, area) = area.split_vertically(30);
        let mut keys = vec![(Key::Bar(KN), "facts".to_string())];
        if let Some(m) = self.mean {
            keys.push((Key::Line(CONTROL), format!("mean {m:.2}")));
        }
        if let Some(m) = self.median {
            keys.push((Key::Line(MEDIAN), format!("median {m}")));
        }
        legend(&key_area, &keys)?;
        let most = self.counts.iter().copied().max().unwrap_or(0) as f64;
        let xmax = self.counts.len().max(2) as f64 - 0.5;
        let mut chart = ChartBuilder::on(&area)
            .margin(MARGIN)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..xmax, 0.0..(most * 1.1).max(1.0))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            // One label per count while they fit, round steps beyond.
            .x_labels((self.counts.len() + 1).clamp(3, 16))
            .x_label_formatter(&|v| {
                if v.fract() == 0.0 && *v >= 0.0 {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| {
                if v.fract() == 0.0 {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            })
            // At most one label per fact count, so that ticks fall on whole facts.
            .y_labels((most as usize + 1).clamp(2, 10))
            .x_desc("refined neurons of a fact")
            .y_desc("facts")
            .label_style(style(TICK))
            .axis_desc_style(style(DESC))
            .draw()?;
        chart.draw_series(self.counts.iter().enumerate().map(|(k, &n)| {
            let k = k as f64;
            Rectangle::new([(k - 0.4, 0.0), (k + 0.4, n as f64)], KN.filled())
        }))?;
        let top = (most * 1.1).max(1.0);
        for (value, color) in [(self.mean, CONTROL), (self.median, MEDIAN)] {
            if let Some(v) = value {
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(v, 0.0), (v, top)],
                    color.stroke_width(3),
                )))?;
            }
        }
        Ok(())
    }
}

/// A matrix of values in blue shades, with row and column names, cell values where
/// they fit, and a colour scale.
struct HeatMap {
    title: String,
    rows: Vec<String>,
    cols: Vec<String>,
    /// `[row][col]`; `None` draws a grey cell (no data).
    values: Vec<Vec<Option<f64>>>,
    /// Column names written bottom to top (long names).
    rotate_cols: bool,
    cell: (i32, i32),
    x_desc: String,
    y_desc: String,
    scale_desc: String,
    label: fn(f64) -> String,
}

/// Light to dark blue (matplotlib's "Blues", three stops).
fn blue(t: f64) -> RGBColor {
    let stops = [
        (247.0, 251.0, 255.0),
        (107.0, 174.0, 214.0),
        (8.0, 48.0, 107.0),
    ];
    let t = t.clamp(0.0, 1.0) * 2.0;
    let (a, b, f) = if t <= 1.0 {
        (stops[0], stops[1], t)
    } else {
        (stops[1], stops[2], t - 1.0)
    };
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

struct HeatLayout {
    left: i32,
    top: i32,
    col_labels: i32,
    /// Height of the grid area (and of the colour scale beside it).
    body: i32,
    width: i32,
    height: i32,
}

/// Smallest height of the colour scale.
const SCALE_HEIGHT: i32 = 120;

impl HeatMap {
    fn max(&self) -> f64 {
        let max = self
            .values
            .iter()
            .flatten()
            .flatten()
            .copied()
            .fold(0.0, f64::max);
        if max > 0.0 {
            max
        } else {
            1.0
        }
    }

    fn ticks(&self) -> [(f64, f64); 3] {
        let max = self.max();
        [(0.0, 0.0), (0.5, max / 2.0), (1.0, max)]
    }

    /// Title on top; under it a header line with the row axis' name (above the row
    /// names) and the scale's (above the scale); the grid with row names on its left
    /// and column names under it, then the column axis' name; the scale on the right.
    fn layout(&self) -> HeatLayout {
        let row_labels = self
            .rows
            .iter()
            .map(|r| text_width(r, TICK))
            .max()
            .unwrap_or(0);
        let col_labels = if self.rotate_cols {
            self.cols
                .iter()
                .map(|c| text_width(c, TICK))
                .max()
                .unwrap_or(0)
                + 8
        } else {
            24
        };
        let scale_ticks = self
            .ticks()
            .iter()
            .map(|&(_, v)| text_width(&(self.label)(v), SMALL))
            .max()
            .unwrap_or(0);
        let left = MARGIN + row_labels.max(text_width(&self.y_desc, DESC)) + 8;
        let top = MARGIN + 40 + 30;
        let grid_w = self.cols.len() as i32 * self.cell.0;
        let grid_h = self.rows.len() as i32 * self.cell.1;
        let body = grid_h.max(SCALE_HEIGHT);
        let right =
            30 + (18 + 6 + scale_ticks).max(text_width(&self.scale_desc, TICK) + 8) + MARGIN;
        let bottom = col_labels + 34 + MARGIN;
        let width = (left + grid_w + right).max(text_width(&self.title, TITLE) + 2 * MARGIN);
        HeatLayout {
            left,
            top,
            col_labels,
            body,
            width,
            // Under the grid its labels; beside it the scale, which may reach lower.
            height: top + (grid_h + bottom).max(body + MARGIN),
        }
    }
}

impl Plot for HeatMap {
    fn size(&self) -> (u32, u32) {
        let l = self.layout();
        (l.width as u32, l.height as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let l = self.layout();
        let (cw, ch) = self.cell;
        let max = self.max();
        root.draw(&Text::new(
            self.title.clone(),
            (l.width / 2, MARGIN),
            anchored(TITLE, HPos::Center, VPos::Top),
        ))?;
        for (r, row) in self.values.iter().enumerate() {
            let y = l.top + r as i32 * ch;
            for (c, value) in row.iter().enumerate() {
                let x = l.left + c as i32 * cw;
                let fill = value.map_or(EMPTY_CELL, |v| blue(v / max));
                root.draw(&Rectangle::new([(x, y), (x + cw, y + ch)], fill.filled()))?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cw, y + ch)],
                    WHITE.stroke_width(1),
                ))?;
                if let Some(v) = value {
                    let text = (self.label)(*v);
                    if text_width(&text, SMALL) + 6 <= cw {
                        let ink = if v / max > 0.55 { WHITE } else { BLACK };
                        root.draw(&Text::new(
                            text,
                            (x + cw / 2, y + ch / 2),
                            style(SMALL)
                                .color(&ink)
                                .pos(Pos::new(HPos::Center, VPos::Center)),
                        ))?;
                    }
                }
            }
        }
        let grid_bottom = l.top + self.rows.len() as i32 * ch;
        let grid_right = l.left + self.cols.len() as i32 * cw;
        root.draw(&Text::new(
            self.y_desc.clone(),
            (l.left - 8, l.top - 10),
            anchored(DESC, HPos::Right, VPos::Bottom),
        ))?;
        for (r, name) in self.rows.iter().enumerate() {
            root.draw(&Text::new(
                name.clone(),
                (l.left - 8, l.top + r as i32 * ch + ch / 2),
                anchored(TICK, HPos::Right, VPos::Center),
            ))?;
        }
        for (c, name) in self.cols.iter().enumerate() {
            let x = l.left + c as i32 * cw + cw / 2;
            let text = if self.rotate_cols {
                // Read bottom to top, ending just under the grid.
                Text::new(
                    name.clone(),
                    (x, grid_bottom + 6),
                    style(TICK)
                        .transform(FontTransform::Rotate270)
                        .pos(Pos::new(HPos::Right, VPos::Center)),
                )
            } else {
                Text::new(
                    name.clone(),
                    (x, grid_bottom + 6),
                    anchored(TICK, HPos::Center, VPos::Top),
                )
            };
            root.draw(&text)?;
        }
        root.draw(&Text::new(
            self.x_desc.clone(),
            (
                l.left + (grid_right - l.left) / 2,
                grid_bottom + l.col_labels + 10,
            ),
            anchored(DESC, HPos::Center, VPos::Top),
        ))?;
        // The colour scale, top = max, with its name above it.
        let sx = grid_right + 30;
        let (sy0, sy1) = (l.top, l.top + l.body);
        root.draw(&Text::new(
            self.scale_desc.clone(),
            (sx, l.top - 10),
            anchored(TICK, HPos::Left, VPos::Bottom),
        ))?;
        // 64 bands: smooth to the eye, and few elements in an SVG.
        let bands = 64;
        let edge = |i: i32| sy0 + (sy1 - sy0) * i / bands;
        for i in 0..bands {
            let t = 1.0 - (f64::from(i) + 0.5) / f64::from(bands);
            root.draw(&Rectangle::new(
                [(sx, edge(i)), (sx + 18, edge(i + 1))],
                blue(t).filled(),
            ))?;
        }
        root.draw(&Rectangle::new(
            [(sx, sy0), (sx + 18, sy1)],
            BLACK.stroke_width(1),
        ))?;
        for (t, v) in self.ticks() {
            let y = sy1 - (t * (sy1 - sy0) as f64).round() as i32;
            root.draw(&PathElement::new(vec![(sx + 18, y), (sx + 22, y)], BLACK))?;
            root.draw(&Text::new(
                (self.label)(v),
                (sx + 24, y),
                anchored(SMALL, HPos::Left, VPos::Center),
            ))?;
        }
        Ok(())
    }
}

/// Gold probability change per relation, knowledge neurons beside the control: the
/// paper's Figures 4 and 5.
struct ProbeBars<'a> {
    title: String,
    probe: &'a ProbeSummary,
}

impl ProbeBars<'_> {
    /// `(label, effect)` per row, all relations first.
    fn rows(&self) -> Vec<(String, &Effect)> {
        std::iter::once(("all relations".to_string(), &self.probe.overall))
            .chain(
                self.probe
                    .by_relation
                    .iter()
                    .map(|r| (cut(&r.relation), &r.effect)),
            )
            .collect()
    }

    fn label_width(&self) -> i32 {
        self.rows()
            .iter()
            .map(|(name, _)| text_width(name, TICK))
            .max()
            .unwrap_or(0)
    }
}

const PROBE_ROW: i32 = 44;

/// What the probed neurons are called: `knowledge neurons`, or the baseline's.
pub fn neurons_name(method: crate::attribution::record::Method) -> String {
    match method {
        crate::attribution::record::Method::IntegratedGradients => "knowledge neurons".into(),
        crate::attribution::record::Method::Activation => "activation baseline's neurons".into(),
    }
}

/// What a control's neurons are called.
pub fn control_name(control: super::input::ControlKind) -> &'static str {
    match control {
        super::input::ControlKind::Random => "random neurons",
        super::input::ControlKind::OtherRelation => "another relation's neurons",
    }
}

impl Plot for ProbeBars<'_> {
    fn size(&self) -> (u32, u32) {
        let rows = self.rows().len() as i32;
        let width = (self.label_width() + 760).max(text_width(&self.title, TITLE) + 2 * MARGIN);
        (width as u32, (160 + rows * PROBE_ROW) as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let area = root.titled(&self.title, style(TITLE))?;
        let (key_area, area) = area.split_vertically(30);
        let has_control = self.probe.overall.control_prompts > 0;
        let mut keys = vec![(Key::Bar(KN), neurons_name(self.probe.method))];
        if has_control {
            keys.push((
                Key::Bar(CONTROL),
                format!("control ({})", control_name(self.probe.control)),
            ));
        }
        legend(&key_area, &keys)?;

        let rows = self.rows();
        let n = rows.len() as f64;
        let values: Vec<f64> = rows
            .iter()
            .flat_map(|(_, e)| [e.change, e.control_change])
            .flatten()
            .map(|v| v * 100.0)
            .collect();
        let lo = values.iter().copied().fold(0.0, f64::min);
        let hi = values.iter().copied().fold(0.0, f64::max);
        // Room on both sides of the bars for their value labels.
        let pad = ((hi - lo) * 0.22).max(5.0);
        let (xmin, xmax) = (lo - pad, hi + pad);
        let label_width = self.label_width();
        let mut chart = ChartBuilder::on(&area)
            .margin(MARGIN)
            .x_label_area_size(50)
            .y_label_area_size(label_width + 40)
            .build_cartesian_2d(xmin..xmax, 0.0..n)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            // Relation names are drawn by hand, centred on their rows.
            .y_labels(1)
            .y_label_formatter(&|_| String::new())
            .set_tick_mark_size(LabelAreaPosition::Left, 0)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .x_desc("change of the gold answer's probability (%)")
            .y_desc("relation")
            .label_style(style(TICK))
            .axis_desc_style(style(DESC))
            .draw()?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 0.0), (0.0, n)],
            BLACK.stroke_width(1),
        )))?;
        // Row i (0 = all relations) from the top.
        let row_top = |i: usize| n - i as f64;
        let mut bars = Vec::new();
        let mut labels = Vec::new();
        for (i, (_, effect)) in rows.iter().enumerate() {
            let top = row_top(i);
            let slots = [
                (effect.change, KN, top - 0.12, top - 0.48),
                (effect.control_change, CONTROL, top - 0.52, top - 0.88),
            ];
            for (value, color, y0, y1) in slots {
                let Some(v) = value else { continue };
                let v = v * 100.0;
                bars.push(Rectangle::new([(0.0, y0), (v, y1)], color.filled()));
                let (dx, h) = if v < 0.0 {
                    (-4, HPos::Right)
                } else {
                    (4, HPos::Left)
                };
                labels.push(
                    EmptyElement::at((v, (y0 + y1) / 2.0))
                        + Text::new(
                            percent(v / 100.0, true),
                            (dx, 0),
                            anchored(SMALL, h, VPos::Center),
                        ),
                );
            }
            if effect.change.is_none() {
                labels.push(
                    EmptyElement::at((0.0, top - 0.5))
                        + Text::new(
                            "no prompts".to_string(),
                            (4, 0),
                            anchored(SMALL, HPos::Left, VPos::Center),
                        ),
                );
            }
        }
        chart.draw_series(bars)?;
        chart.draw_series(labels)?;
        for (i, (name, _)) in rows.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(xmin, row_top(i) - 0.5));
            root.draw(&Text::new(
                name.clone(),
                (x - 8, y),
                anchored(TICK, HPos::Right, VPos::Center),
            ))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_labels() {
        assert_eq!(percent(0.4512, false), "45%");
        assert_eq!(percent(0.004, false), "0.4%");
        assert_eq!(percent(-0.2903, true), "−29%");
        assert_eq!(percent(0.0512, true), "+5.1%");
        assert_eq!(percent(0.0, true), "0%");
        assert_eq!(percent(-0.0000001, true), "0.0%");
    }

    #[test]
    fn blues_run_light_to_dark() {
        assert_eq!(blue(0.0), RGBColor(247, 251, 255));
        assert_eq!(blue(1.0), RGBColor(8, 48, 107));
        assert_eq!(blue(0.5), RGBColor(107, 174, 214));
    }

    #[test]
    fn the_embedded_font_measures_text() {
        let _ = font();
        register_font();
        let narrow = text_width("ii", TICK);
        let wide = text_width("WW", TICK);
        assert!(narrow > 0 && wide > 2 * narrow, "{narrow} {wide}");
    }

    /// Draws `plot` as SVG and as PNG in memory; returns the SVG.
    fn draw_both(plot: &impl Plot) -> String {
        register_font();
        let (w, h) = plot.size();
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
            plot.draw(&root).unwrap();
            root.present().unwrap();
        }
        let mut rgb = vec![0u8; w as usize * h as usize * 3];
        let root = Raster::new(&mut rgb, (w, h), font()).into_drawing_area();
        plot.draw(&root).unwrap();
        root.present().unwrap();
        svg
    }

    #[test]
    fn degenerate_inputs_still_draw() {
        // One layer; no neuron at all.
        for share in [vec![1.0], vec![0.0, 0.0]] {
            draw_both(&LayerBars {
                title: "t".into(),
                share: &share,
            });
        }
        // Every fact without neurons; a fact with 300 (labels in round steps).
        let mut many = vec![0; 301];
        many[300] = 1;
        for counts in [vec![3], many] {
            draw_both(&Histogram {
                title: "t".into(),
                counts: &counts,
                mean: Some(0.0),
                median: None,
            });
        }
        // One relation without pairs; all zeros.
        for values in [vec![vec![None]], vec![vec![Some(0.0)]]] {
            draw_both(&HeatMap {
                title: "t".into(),
                rows: vec!["r".into()],
                cols: vec!["r".into()],
                values,
                rotate_cols: true,
                cell: (46, 26),
                x_desc: "x".into(),
                y_desc: "y".into(),
                scale_desc: "s".into(),
                label: |v| format!("{v:.2}"),
            });
        }
        // A probe without control, and one where nothing was probed.
        let effect = |change: Option<f64>| Effect {
            prompts: usize::from(change.is_some()),
            before: change.map(|_| 0.5),
            after: change.map(|c| 0.5 * (1.0 + c)),
            change,
            control_prompts: 0,
            control_after: None,
            control_change: None,
        };
        for change in [Some(-0.3), None] {
            let probe = ProbeSummary {
                name: "suppress".into(),
                mode: super::super::input::ProbeMode::Suppress,
                method: crate::attribution::record::Method::IntegratedGradients,
                factor: 0.0,
                control: super::super::input::ControlKind::Random,
                facts: 1,
                skipped: usize::from(change.is_none()),
                overall: effect(change),
                by_relation: vec![],
            };
            let svg = draw_both(&ProbeBars {
                title: "t".into(),
                probe: &probe,
            });
            assert!(
                !svg.contains("control ("),
                "no control, no legend entry for it"
            );
        }
    }
}
