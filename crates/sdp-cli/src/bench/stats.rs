//! Medians and the output line.

/// Median of `v` (mean of the two middle values for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// `min..max (n)` of the samples, for the progress log on stderr.
pub fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{}..{} (n={})", fmt_value(min), fmt_value(max), v.len())
}

/// Four significant digits at least, never scientific notation (the checks parse
/// `ratio=([0-9.]+)`).
pub fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.5}")
    }
}

/// `bench <name> base=<v> libsdp=<v> ratio=<libsdp/base> unit=<u>`
pub fn line(name: &str, base: f64, libsdp: f64, unit: &str) -> String {
    format!(
        "bench {name} base={} libsdp={} ratio={:.4} unit={unit}",
        fmt_value(base),
        fmt_value(libsdp),
        libsdp / base
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn line_has_the_checked_shape() {
        assert_eq!(
            line("pipe_rw", 812.34, 815.0, "ns/op"),
            "bench pipe_rw base=812.340 libsdp=815.000 ratio=1.0033 unit=ns/op"
        );
    }
}
