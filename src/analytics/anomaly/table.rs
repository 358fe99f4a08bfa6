//! Smooth functions of one variable the detector takes on every reading,
//! tabulated once per process and interpolated linearly: a table lookup
//! (a few nanoseconds) instead of a libm `exp` or `ln`, or a polynomial
//! chain of ten terms. Each table's error bound is checked in the tests of
//! the module that uses it, against the function it replaces.

/// A function sampled every `1 / steps` over `[lo, lo + (len - 1) / steps]`;
/// outside that span it takes the value of the nearer end.
pub(super) struct Table {
    lo: f64,
    steps: f64,
    values: Box<[f64]>,
}

impl Table {
    /// Samples `f` over `[lo, hi]`, `steps` times per unit.
    pub(super) fn new(lo: f64, hi: f64, steps: f64, f: impl Fn(f64) -> f64) -> Table {
        let len = ((hi - lo) * steps).ceil() as usize + 1;
        Table {
            lo,
            steps,
            values: (0..len).map(|i| f(lo + i as f64 / steps)).collect(),
        }
    }

    /// The function at `x`, interpolated (NaN gives the lower end).
    #[inline]
    pub(super) fn at(&self, x: f64) -> f64 {
        let last = self.values.len() - 1;
        let x = (x - self.lo) * self.steps;
        if x.is_nan() || x <= 0.0 {
            return self.values[0];
        }
        if x >= last as f64 {
            return self.values[last];
        }
        // Through i32, one instruction where u64 takes several (the tables
        // have far fewer than 2^31 entries).
        let i = x as i32;
        let frac = x - f64::from(i);
        let i = i as usize;
        self.values[i] + frac * (self.values[i + 1] - self.values[i])
    }
}

/// A `static` table, built on first use.
macro_rules! table {
    ($lo:expr, $hi:expr, $steps:expr, $f:expr) => {{
        static TABLE: std::sync::OnceLock<$crate::analytics::anomaly::table::Table> =
            std::sync::OnceLock::new();
        TABLE.get_or_init(|| $crate::analytics::anomaly::table::Table::new($lo, $hi, $steps, $f))
    }};
}
pub(super) use table;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_inside_and_clamps_outside() {
        let t = Table::new(-1.0, 1.0, 4.0, |x| x * x);
        assert_eq!(t.at(0.5), 0.25);
        assert!((t.at(0.125) - 0.03125).abs() < 1e-12, "{}", t.at(0.125));
        assert_eq!(t.at(-5.0), 1.0);
        assert_eq!(t.at(5.0), 1.0);
        assert_eq!(t.at(f64::NAN), 1.0);
        assert_eq!(t.at(f64::INFINITY), 1.0);
    }
}
