//! Latency histograms: recording, percentiles, the `.hgrm` percentile distribution (the text format
//! of HdrHistogram's `outputPercentileDistribution`, readable by its plotter), and an SVG plot.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Lowest discernible latency: 1 ns, so three significant digits hold from the bottom up (a
/// 1 µs lowest value would make everything under 1 ms coarse to 512 ns steps). ~200 KiB per histogram.
const LOWEST_NS: u64 = 1;
/// Highest recordable latency: 100 s; longer is clamped (and would be a failed run anyway).
const HIGHEST_NS: u64 = 100_000_000_000;
/// Three significant digits: 0.1% value resolution.
const SIGFIG: u8 = 3;

/// A latency histogram in nanoseconds.
pub(crate) fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; a failure here is a programming error.
    Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, SIGFIG).expect("constant histogram bounds")
}

/// Records one latency, clamped into the histogram's range.
#[inline]
pub(crate) fn record(h: &mut Histogram<u64>, latency_ns: u64) {
    let v = latency_ns.clamp(LOWEST_NS, HIGHEST_NS);
    // In range by the clamp, so this cannot fail.
    let _ = h.record(v);
}

/// The percentiles every report shows, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct Percentiles {
    /// Number of recorded values.
    pub(crate) count: u64,
    /// Minimum.
    min_ns: u64,
    /// Mean.
    mean_ns: f64,
    /// Median.
    pub(crate) p50_ns: u64,
    /// 90th percentile.
    pub(crate) p90_ns: u64,
    /// 99th percentile.
    pub(crate) p99_ns: u64,
    /// 99.9th percentile.
    pub(crate) p999_ns: u64,
    /// 99.99th percentile.
    p9999_ns: u64,
    /// Maximum.
    pub(crate) max_ns: u64,
}

/// Summarizes `h`.
pub(crate) fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        count: h.len(),
        min_ns: h.min(),
        mean_ns: h.mean(),
        p50_ns: h.value_at_quantile(0.50),
        p90_ns: h.value_at_quantile(0.90),
        p99_ns: h.value_at_quantile(0.99),
        p999_ns: h.value_at_quantile(0.999),
        p9999_ns: h.value_at_quantile(0.9999),
        max_ns: h.max(),
    }
}

/// Writes the percentile distribution in HdrHistogram's text format, values in milliseconds.
pub(crate) fn hgrm(h: &Histogram<u64>) -> String {
    const SCALE: f64 = 1e6; // ns per ms
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            let q = v.quantile_iterated_to();
            let value = h.highest_equivalent(v.value_iterated_to()) as f64 / SCALE;
            if q < 1.0 {
                let _ = writeln!(
                    s,
                    "{:12.3} {:2.12} {:10} {:14.2}",
                    value,
                    q,
                    v.count_since_last_iteration(),
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(
                    s,
                    "{:12.3} {:2.12} {:10} {:>14}",
                    value,
                    q,
                    v.count_since_last_iteration(),
                    "inf"
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / SCALE,
        h.stdev() / SCALE
    );
    let _ = writeln!(
        s,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / SCALE,
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    );
    s
}

/// One line of a latency-percentile plot.
pub(crate) struct Series<'a> {
    /// Legend label.
    pub(crate) label: &'a str,
    /// The histogram (nanoseconds).
    pub(crate) hist: &'a Histogram<u64>,
}

/// Draws latency (ms, linear) against percentile (log scale of 1/(1-p), 0% to 99.999%), the usual
/// HdrHistogram plot, as a self-contained SVG.
pub(crate) fn svg_plot(title: &str, series: &[Series<'_>]) -> String {
    let max_ms = series
        .iter()
        .filter(|s| !s.hist.is_empty())
        .map(|s| s.hist.max() as f64 / 1e6)
        .fold(0.0f64, f64::max);
    let plot = Plot {
        y_max: nice_ceiling(max_ms.max(0.001)),
    };
    let mut s = String::new();
    plot.frame(&mut s, title);
    for (i, ser) in series.iter().enumerate() {
        plot.series(&mut s, i, ser);
    }
    s.push_str("</svg>\n");
    s
}

const W: f64 = 900.0;
const H: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;
/// The x axis ends at 99.999%.
const MAX_NINES: f64 = 5.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];
/// Plot width and height inside the margins.
const PW: f64 = W - LEFT - RIGHT;
const PH: f64 = H - TOP - BOTTOM;

/// A latency-percentile plot whose y axis goes up to `y_max` ms.
struct Plot {
    y_max: f64,
}

impl Plot {
    fn x_of(&self, q: f64) -> f64 {
        let nines = if q >= 1.0 {
            MAX_NINES
        } else {
            (-(1.0 - q).log10()).min(MAX_NINES)
        };
        LEFT + nines / MAX_NINES * PW
    }

    fn y_of(&self, ms: f64) -> f64 {
        TOP + PH - (ms / self.y_max).min(1.0) * PH
    }

    /// The SVG head, the title, the grid, the axes and their labels.
    fn frame(&self, s: &mut String, title: &str) {
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
            W / 2.0,
            xml_escape(title)
        );
        for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
            .iter()
            .enumerate()
        {
            let x = LEFT + i as f64 / MAX_NINES * PW;
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
                TOP + PH,
                TOP + PH + 18.0
            );
        }
        for i in 0..=5 {
            let ms = self.y_max * i as f64 / 5.0;
            let y = self.y_of(ms);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + PW,
                LEFT - 6.0,
                y + 4.0,
                fmt_ms(ms)
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{PW}" height="{PH}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
            LEFT + PW / 2.0,
            H - 20.0
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">latency (ms)</text>"#,
            TOP + PH / 2.0,
            TOP + PH / 2.0
        );
    }

    /// Series `i`: its line and its legend entry.
    fn series(&self, s: &mut String, i: usize, ser: &Series<'_>) {
        let color = COLORS[i % COLORS.len()];
        if !ser.hist.is_empty() {
            let mut pts = String::new();
            for v in ser.hist.iter_quantiles(5) {
                let q = v.quantile_iterated_to();
                let ms = ser.hist.highest_equivalent(v.value_iterated_to()) as f64 / 1e6;
                let _ = write!(pts, "{:.1},{:.1} ", self.x_of(q), self.y_of(ms));
            }
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                pts.trim_end()
            );
        }
        let ly = TOP + 16.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + 12.0,
            LEFT + 36.0,
            LEFT + 42.0,
            ly + 4.0,
            xml_escape(ser.label)
        );
    }
}

/// Sub-buckets per bucket for `sigfig` significant digits, as HdrHistogram computes it:
/// 2^ceil(log2(2 x 10^sigfig)).
fn sub_bucket_count(sigfig: u8) -> u64 {
    (2 * 10u64.pow(sigfig as u32)).next_power_of_two()
}

fn fmt_ms(ms: f64) -> String {
    if ms == 0.0 {
        "0".to_string()
    } else if ms >= 10.0 {
        format!("{ms:.0}")
    } else if ms >= 1.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.3}")
    }
}

/// The smallest of 1, 2, 5 x 10^k at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let exp = v.log10().floor();
    let base = 10f64.powf(exp);
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * base >= v {
            return m * base;
        }
    }
    10.0 * base
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Nanoseconds as milliseconds with three decimals, for tables.
pub(crate) fn ms(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform_1_to_1000_us() -> Histogram<u64> {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            record(&mut h, us * 1000);
        }
        h
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let p = percentiles(&uniform_1_to_1000_us());
        assert_eq!(p.count, 1000);
        let close = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.002;
        assert!(close(p.p50_ns, 500_000), "{}", p.p50_ns);
        assert!(close(p.p90_ns, 900_000), "{}", p.p90_ns);
        assert!(close(p.p99_ns, 990_000), "{}", p.p99_ns);
        assert!(close(p.p999_ns, 999_000), "{}", p.p999_ns);
        assert!(close(p.max_ns, 1_000_000), "{}", p.max_ns);
        assert!(close(p.min_ns, 1_000));
    }

    #[test]
    fn out_of_range_values_are_clamped_not_dropped() {
        let mut h = new_histogram();
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert!(h.max() >= HIGHEST_NS);
    }

    #[test]
    fn merged_histograms_count_everything() {
        let mut a = uniform_1_to_1000_us();
        let b = uniform_1_to_1000_us();
        a.add(&b).unwrap();
        assert_eq!(percentiles(&a).count, 2000);
    }

    #[test]
    fn hgrm_has_header_rows_and_footer() {
        let text = hgrm(&uniform_1_to_1000_us());
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
        assert!(text.contains("#[Max     ="));
        assert!(text.contains("Total count    =         1000]"));
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert!(rows.len() > 20);
        // The last data row is the 100th percentile at 1 ms.
        let last = rows.last().unwrap();
        assert!(last.contains("1.000000000000"), "{last}");
        assert!(last.trim_start().starts_with("1.00"), "{last}");
        // Percentiles increase monotonically.
        let qs: Vec<f64> = rows[1..]
            .iter()
            .map(|r| r.split_whitespace().nth(1).unwrap().parse().unwrap())
            .collect();
        assert!(qs.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let h = uniform_1_to_1000_us();
        let empty = new_histogram();
        let svg = svg_plot(
            "fanout <test>",
            &[
                Series {
                    label: "a",
                    hist: &h,
                },
                Series {
                    label: "b",
                    hist: &empty,
                },
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("fanout &lt;test&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 1);
    }

    #[test]
    fn sub_buckets_match_hdrhistogram() {
        assert_eq!(sub_bucket_count(3), 2048);
        assert_eq!(sub_bucket_count(2), 256);
        assert!(hgrm(&uniform_1_to_1000_us()).contains("SubBuckets     =         2048]"));
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.2), 2.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(5.5), 10.0);
        assert_eq!(nice_ceiling(0.03), 0.05);
    }
}
