//! Heatmaps of access frequency over IPA and time, as damo draws them:
//! one column per working-set aggregation, one row per slice of the IPA
//! range, brighter where the monitor found memory accessed more often.
//! Written as PNG (with axes labelled in GiB and seconds, drawn in a small
//! built-in bitmap font) or SVG.

use faultline_proto::v1::WorkingSetAggregation;

/// Pixels left of the plot (the IPA axis labels).
pub const LEFT: usize = 84;
/// Pixels above the plot.
pub const TOP: usize = 12;
/// Pixels below the plot (the time axis labels).
const BOTTOM: usize = 34;
/// Pixels right of the plot.
const RIGHT: usize = 16;
/// Pixels per row.
const ROW_PX: usize = 3;
/// The plot's width aimed for: each aggregation gets as many pixels as fit.
const PLOT_WIDTH: usize = 600;

/// Access frequency over IPA rows and aggregation columns.
#[derive(Clone, Debug, PartialEq)]
pub struct Heatmap {
    /// The IPA range drawn, [start, end).
    pub ipa: (u64, u64),
    /// Each column's time, seconds after the first.
    pub times_s: Vec<f64>,
    /// `cells[row][column]`: frequency relative to the hottest cell, 0 to
    /// 1; row 0 is the lowest IPA.
    pub cells: Vec<Vec<f32>>,
    /// The hottest cell's frequency out of the samples, 0 to 1: what the
    /// brightest colour stands for (damo scales its heats to the data's
    /// range too, so a pattern shows however fast the guest touches
    /// memory against the sampling interval).
    pub peak: f32,
}

/// Why no heatmap could be drawn.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeatmapError {
    /// No aggregations.
    #[error("no working-set aggregations to draw")]
    Empty,
    /// The range asked for is empty or not monitored.
    #[error("IPA range {0:#x}-{1:#x} holds no monitored region")]
    NotMonitored(u64, u64),
}

impl Heatmap {
    /// The heatmap of `seen`, over `ipa` (default: the largest contiguous
    /// monitored range of the first aggregation), in `rows` rows.
    pub fn new(seen: &[WorkingSetAggregation], ipa: Option<(u64, u64)>, rows: usize) -> Result<Self, HeatmapError> {
        let first = seen.first().ok_or(HeatmapError::Empty)?;
        let (lo, hi) = match ipa {
            Some(r) => r,
            None => largest_span(first).ok_or(HeatmapError::Empty)?,
        };
        if lo >= hi || !seen.iter().any(|a| a.regions.iter().any(|r| r.start < hi && lo < r.end)) {
            return Err(HeatmapError::NotMonitored(lo, hi));
        }
        let t0 = time_s(first);
        let rows = rows.max(1);
        let row_bytes = (hi - lo).div_ceil(rows as u64);
        let mut cells = vec![vec![0f32; seen.len()]; rows];
        for (col, a) in seen.iter().enumerate() {
            let max = a.samples_per_aggregation.max(1) as f32;
            for r in &a.regions {
                let (from, to) = (r.start.max(lo), r.end.min(hi));
                if from >= to {
                    continue;
                }
                // Each row gets the regions over it, weighted by overlap.
                for (row, cells) in cells
                    .iter_mut()
                    .enumerate()
                    .take(((to - lo - 1) / row_bytes) as usize + 1)
                    .skip(((from - lo) / row_bytes) as usize)
                {
                    let (row_lo, row_hi) = (lo + row as u64 * row_bytes, (lo + (row as u64 + 1) * row_bytes).min(hi));
                    let overlap = to.min(row_hi).saturating_sub(from.max(row_lo)) as f32;
                    cells[col] += r.frequency as f32 / max * overlap / (row_hi - row_lo) as f32;
                }
            }
        }
        let peak = cells.iter().flatten().copied().fold(0f32, f32::max);
        if peak > 0.0 {
            cells.iter_mut().flatten().for_each(|c| *c /= peak);
        }
        Ok(Self { ipa: (lo, hi), times_s: seen.iter().map(|a| time_s(a) - t0).collect(), cells, peak })
    }

    /// Pixels per column.
    fn column_px(&self) -> usize {
        (PLOT_WIDTH / self.times_s.len().max(1)).clamp(1, 40)
    }

    /// The plot's size in pixels (width, height), placed at ([`LEFT`], [`TOP`]).
    pub fn plot_size(&self) -> (usize, usize) {
        (self.times_s.len() * self.column_px(), self.cells.len() * ROW_PX)
    }

    /// The pixel row of the plot that shows `ipa` (row 0 at the top: the
    /// highest IPA).
    pub fn pixel_row(&self, ipa: u64) -> Option<usize> {
        let (lo, hi) = self.ipa;
        (lo..hi).contains(&ipa).then(|| {
            let row_bytes = (hi - lo).div_ceil(self.cells.len() as u64);
            let row = ((ipa - lo) / row_bytes) as usize;
            TOP + (self.cells.len() - 1 - row) * ROW_PX
        })
    }

    /// RGB pixels, row by row, with the axes and their labels.
    pub fn raster(&self) -> (usize, usize, Vec<u8>) {
        let (pw, ph) = self.plot_size();
        let (w, h) = (LEFT + pw + RIGHT, TOP + ph + BOTTOM);
        let mut px = vec![255u8; w * h * 3];
        let cw = self.column_px();
        for (row, cols) in self.cells.iter().enumerate() {
            let y0 = TOP + (self.cells.len() - 1 - row) * ROW_PX;
            for (col, &v) in cols.iter().enumerate() {
                let rgb = color(v);
                for y in y0..y0 + ROW_PX {
                    for x in LEFT + col * cw..LEFT + (col + 1) * cw {
                        px[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&rgb);
                    }
                }
            }
        }
        let mut ink = |x: usize, y: usize| {
            if x < w && y < h {
                px[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&[0, 0, 0]);
            }
        };
        // Axes, ticks and labels.
        for y in TOP..=TOP + ph {
            ink(LEFT - 1, y);
        }
        for x in LEFT - 1..LEFT + pw {
            ink(x, TOP + ph);
        }
        for (y, label) in self.ipa_ticks() {
            (LEFT - 5..LEFT - 1).for_each(|x| ink(x, y));
            text(&mut ink, LEFT - 7 - 6 * label.len(), y.saturating_sub(3), &label);
        }
        for (x, label) in self.time_ticks() {
            (TOP + ph..TOP + ph + 4).for_each(|y| ink(x, y));
            text(&mut ink, x.saturating_sub(3 * label.len()), TOP + ph + 7, &label);
        }
        let title = "time (s)";
        text(&mut ink, LEFT + pw / 2 - 3 * title.len(), TOP + ph + 20, title);
        text(&mut ink, 2, TOP, "IPA");
        text(&mut ink, 2, TOP + 10, "(GiB)");
        (w, h, px)
    }

    /// IPA ticks: (pixel row, label in GiB), five over the range.
    fn ipa_ticks(&self) -> Vec<(usize, String)> {
        let (lo, hi) = self.ipa;
        let (_, ph) = self.plot_size();
        (0..=4)
            .map(|i| {
                let ipa = lo + (hi - lo) / 4 * i;
                let y = TOP + ph - (ph * i as usize / 4).min(ph);
                (y.min(TOP + ph - 1), format!("{:.3}", ipa as f64 / (1u64 << 30) as f64))
            })
            .collect()
    }

    /// Time ticks: (pixel column, label in seconds), about five.
    fn time_ticks(&self) -> Vec<(usize, String)> {
        let n = self.times_s.len();
        let cw = self.column_px();
        let step = (n / 5).max(1);
        (0..n).step_by(step).map(|c| (LEFT + c * cw, format!("{:.1}", self.times_s[c]))).collect()
    }

    /// The heatmap as PNG.
    pub fn to_png(&self) -> Vec<u8> {
        let (w, h, px) = self.raster();
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, w as u32, h as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().expect("writing PNG to memory");
        writer.write_image_data(&px).expect("writing PNG to memory");
        writer.finish().expect("writing PNG to memory");
        out
    }

    /// The heatmap as SVG: a rectangle per run of equal cells in a row,
    /// text labels on the axes.
    pub fn to_svg(&self) -> String {
        use std::fmt::Write;
        let (pw, ph) = self.plot_size();
        let (w, h) = (LEFT + pw + RIGHT, TOP + ph + BOTTOM);
        let cw = self.column_px();
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"monospace\" font-size=\"10\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
        );
        for (row, cols) in self.cells.iter().enumerate() {
            let y = TOP + (self.cells.len() - 1 - row) * ROW_PX;
            let mut c = 0;
            while c < cols.len() {
                let rgb = color(cols[c]);
                let run = cols[c..].iter().take_while(|&&v| color(v) == rgb).count();
                let _ = writeln!(
                    s,
                    "<rect x=\"{}\" y=\"{y}\" width=\"{}\" height=\"{ROW_PX}\" fill=\"#{:02x}{:02x}{:02x}\"/>",
                    LEFT + c * cw,
                    run * cw,
                    rgb[0],
                    rgb[1],
                    rgb[2]
                );
                c += run;
            }
        }
        let _ =
            writeln!(s, "<path d=\"M{} {TOP}V{}H{}\" stroke=\"black\" fill=\"none\"/>", LEFT - 1, TOP + ph, LEFT + pw);
        for (y, label) in self.ipa_ticks() {
            let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{label}</text>", LEFT - 6, y + 4);
        }
        for (x, label) in self.time_ticks() {
            let _ = writeln!(s, "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{label}</text>", TOP + ph + 14);
        }
        let _ =
            writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time (s)</text>", LEFT + pw / 2, TOP + ph + 28);
        let _ = writeln!(s, "<text x=\"2\" y=\"{}\">IPA (GiB)</text>", TOP + 8);
        s.push_str("</svg>\n");
        s
    }
}

fn time_s(a: &WorkingSetAggregation) -> f64 {
    a.time.as_ref().map_or(0.0, |t| t.seconds as f64 + t.nanos as f64 / 1e9)
}

/// The largest range the regions of `a` cover without a gap.
fn largest_span(a: &WorkingSetAggregation) -> Option<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for r in &a.regions {
        match spans.last_mut() {
            Some(last) if last.1 == r.start => last.1 = r.end,
            _ => spans.push((r.start, r.end)),
        }
    }
    spans.into_iter().max_by_key(|(s, e)| e - s)
}

/// Dark blue (never accessed) through red to yellow (every sample).
fn color(v: f32) -> [u8; 3] {
    const STOPS: [(f32, [f32; 3]); 4] = [
        (0.0, [20.0, 16.0, 60.0]),
        (0.33, [150.0, 30.0, 110.0]),
        (0.66, [240.0, 100.0, 30.0]),
        (1.0, [252.0, 252.0, 160.0]),
    ];
    let v = v.clamp(0.0, 1.0);
    let i = STOPS.iter().position(|(at, _)| *at >= v).unwrap_or(STOPS.len() - 1).max(1);
    let ((a, ca), (b, cb)) = (STOPS[i - 1], STOPS[i]);
    let t = (v - a) / (b - a);
    [0, 1, 2].map(|k| (ca[k] + (cb[k] - ca[k]) * t).round() as u8)
}

/// Draws `s` with its top-left corner at (x, y) in a 5x7 bitmap font,
/// 6 pixels a character.
fn text(ink: &mut impl FnMut(usize, usize), x: usize, y: usize, s: &str) {
    for (i, ch) in s.chars().enumerate() {
        let Some(rows) = glyph(ch) else { continue };
        for (dy, bits) in rows.iter().enumerate() {
            for dx in 0..5 {
                if bits & (0x10 >> dx) != 0 {
                    ink(x + 6 * i + dx, y + dy);
                }
            }
        }
    }
}

/// The 5x7 glyphs the labels use.
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        '0' => [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
        '1' => [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
        '2' => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
        '3' => [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
        '4' => [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
        '5' => [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
        '6' => [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
        '7' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
        '9' => [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
        '.' => [0, 0, 0, 0, 0, 0x0c, 0x0c],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        'A' => [0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11],
        'B' => [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e],
        'G' => [0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f],
        'I' => [0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e],
        'P' => [0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10],
        'e' => [0, 0, 0x0e, 0x11, 0x1f, 0x10, 0x0e],
        'i' => [0x04, 0, 0x0c, 0x04, 0x04, 0x04, 0x0e],
        'm' => [0, 0, 0x1a, 0x15, 0x15, 0x11, 0x11],
        's' => [0, 0, 0x0e, 0x10, 0x0e, 0x01, 0x1e],
        't' => [0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline_proto::v1::WorkingSetRegion;

    fn aggregation(second: i64, hot: u32) -> WorkingSetAggregation {
        let region = |start: u64, end: u64, frequency| WorkingSetRegion { start, end, frequency, ..Default::default() };
        WorkingSetAggregation {
            time: Some(prost_types::Timestamp { seconds: second, nanos: 0 }),
            samples_per_aggregation: 20,
            // A gap before RAM: the default range is RAM's.
            regions: vec![
                region(0x1000_0000, 0x1100_0000, 20),
                region(0x4000_0000, 0x4100_0000, hot),
                region(0x4100_0000, 0x4400_0000, 0),
            ],
            ..Default::default()
        }
    }

    /// Mean luminance of pixel row `y` of the plot.
    fn row_luma(w: usize, px: &[u8], y: usize, plot_w: usize) -> f64 {
        let row = &px[(y * w + LEFT) * 3..(y * w + LEFT + plot_w) * 3];
        row.chunks(3).map(|p| 0.2126 * p[0] as f64 + 0.7152 * p[1] as f64 + 0.0722 * p[2] as f64).sum::<f64>()
            / plot_w as f64
    }

    #[test]
    fn the_scale_is_the_hottest_cell_so_a_dim_pattern_still_shows() {
        // Hit in 2 samples of 20: as bright as 20 of 20 would be, and said.
        let seen: Vec<_> = (0..10).map(|s| aggregation(100 + s, 2)).collect();
        let map = Heatmap::new(&seen, None, 64).unwrap();
        assert_eq!(map.peak, 0.1);
        let (w, _, px) = map.raster();
        let (pw, _) = map.plot_size();
        let hot = row_luma(w, &px, map.pixel_row(0x4000_0000).unwrap(), pw);
        assert!(hot > 200.0, "hot {hot}");
        // Nothing accessed: dark, and no division by zero.
        let seen: Vec<_> = (0..10).map(|s| aggregation(100 + s, 0)).collect();
        let map = Heatmap::new(&seen, None, 8).unwrap();
        assert_eq!(map.peak, 0.0);
        assert!(map.cells.iter().flatten().all(|&c| c == 0.0));
    }

    #[test]
    fn the_hot_range_is_the_bright_band_and_the_rest_is_dark() {
        let seen: Vec<_> = (0..10).map(|s| aggregation(100 + s, 20)).collect();
        let map = Heatmap::new(&seen, None, 64).unwrap();
        assert_eq!(map.ipa, (0x4000_0000, 0x4400_0000), "the largest contiguous range");
        assert_eq!(map.times_s[9], 9.0);
        let (w, _, px) = map.raster();
        let (pw, _) = map.plot_size();
        let hot = row_luma(w, &px, map.pixel_row(0x4000_0000).unwrap(), pw);
        let cold = row_luma(w, &px, map.pixel_row(0x4300_0000).unwrap(), pw);
        assert!(hot > 200.0 && cold < 40.0, "hot {hot}, cold {cold}");
        // Decoded back from the PNG, the same pixels.
        let png = map.to_png();
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(buf, px);
        let svg = map.to_svg();
        assert!(svg.contains(">time (s)</text>") && svg.contains(">IPA (GiB)</text>") && svg.contains(">1.000</text>"));
        assert_eq!(Heatmap::new(&[], None, 8), Err(HeatmapError::Empty));
        assert_eq!(
            Heatmap::new(&seen, Some((0x9000_0000, 0xa000_0000)), 8),
            Err(HeatmapError::NotMonitored(0x9000_0000, 0xa000_0000))
        );
    }
}
