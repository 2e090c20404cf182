//! Go's `time.Duration` strings, as LAPI writes a decision's remaining time
//! (`"59m59.57s"`, `"167h59m58.123456789s"`, `"-3.2s"` in `deleted`).

use std::time::Duration;

/// A parsed Go duration: its sign and magnitude.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration {
    pub negative: bool,
    pub magnitude: Duration,
}

impl GoDuration {
    /// What remains: `None` when zero or negative (already over).
    pub fn remaining(self) -> Option<Duration> {
        (!self.negative && !self.magnitude.is_zero()).then_some(self.magnitude)
    }
}

/// Parses `[-+]?(NUMBER UNIT)+` or `0`, NUMBER a decimal with an optional
/// fraction, UNIT one of `ns us µs μs ms s m h` (Go's `time.ParseDuration`).
pub fn parse(s: &str) -> Result<GoDuration, String> {
    let bad = |why: &str| {
        format!(
            "`{}` is not a Go duration: {why}",
            s.chars().take(40).collect::<String>()
        )
    };
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(GoDuration {
            negative,
            magnitude: Duration::ZERO,
        });
    }
    if rest.is_empty() {
        return Err(bad("empty"));
    }
    // Nanoseconds, as u128: no overflow below 10^20 years.
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.bytes().take_while(u8::is_ascii_digit).count();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(bad("a number is missing"));
        }
        let unit_len = after
            .char_indices()
            .find(|&(_, c)| c.is_ascii_digit() || c == '.')
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(bad("a unit is missing")),
            _ => return Err(bad("unknown unit")),
        };
        if int.len() > 20 {
            return Err(bad("too large"));
        }
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad("too large"))?
        };
        let mut part: u128 = 0;
        let mut div: u128 = 1;
        for d in frac.bytes().take(18) {
            part = part * 10 + u128::from(d - b'0');
            div *= 10;
        }
        total = total
            .checked_add(whole.checked_mul(scale).ok_or_else(|| bad("too large"))?)
            .and_then(|t| t.checked_add(part * scale / div))
            .ok_or_else(|| bad("too large"))?;
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| bad("too large"))?;
    Ok(GoDuration {
        negative,
        magnitude: Duration::new(secs, (total % 1_000_000_000) as u32),
    })
}

/// A duration as LAPI takes it in an alert's decision: whole seconds in
/// hours, minutes and seconds (`"168h0m0s"`; no days, which LAPI refuses
/// before 1.6.9).
pub fn format(d: Duration) -> String {
    let s = d.as_secs().max(1);
    format!("{}h{}m{}s", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> u128 {
        let d = parse(s).expect("ok");
        assert!(!d.negative, "{s}");
        d.magnitude.as_millis()
    }

    #[test]
    fn crowdsec_go_durations() {
        assert_eq!(ms("59m59.57s"), 3_599_570);
        assert_eq!(ms("167h59m58.123456789s"), 604_798_123);
        assert_eq!(ms("1h"), 3_600_000);
        assert_eq!(ms("1.5h"), 5_400_000);
        assert_eq!(ms("300ms"), 300);
        assert_eq!(parse("2us").expect("ok").magnitude, Duration::from_micros(2));
        assert_eq!(parse("2µs").expect("ok").magnitude, Duration::from_micros(2));
        assert_eq!(parse("7ns").expect("ok").magnitude, Duration::from_nanos(7));
        assert_eq!(ms("0"), 0);
        assert_eq!(ms(".5s"), 500);
        assert_eq!(ms("+4s"), 4000);
        let neg = parse("-3.2s").expect("ok");
        assert!(neg.negative);
        assert_eq!(neg.magnitude, Duration::from_millis(3200));
        assert_eq!(neg.remaining(), None);
        assert_eq!(parse("0s").expect("ok").remaining(), None);
        assert_eq!(parse("1s").expect("ok").remaining(), Some(Duration::from_secs(1)));
        for bad in [
            "",
            "-",
            "1",
            "1d",
            "h",
            "1.h2",
            "s1",
            "1hh",
            "..5s",
            "99999999999999999999999h",
            "1 h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn crowdsec_durations_are_sent_in_hours() {
        assert_eq!(format(Duration::from_secs(7 * 86_400)), "168h0m0s");
        assert_eq!(format(Duration::from_secs(3661)), "1h1m1s");
        assert_eq!(format(Duration::ZERO), "0h0m1s");
        assert_eq!(
            parse(&format(Duration::from_secs(90))).expect("ok").magnitude,
            Duration::from_secs(90)
        );
    }
}
