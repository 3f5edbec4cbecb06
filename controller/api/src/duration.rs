//! Durations in the Gateway API string form (`"10s"`, `"1m30s"`, `"250ms"`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as in Gateway API (`GEP-2257`): one or more `<number><unit>` with unit
/// `h`, `m`, `s` or `ms`, e.g. `"1m30s"`, `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct GatewayDuration(pub Duration);

/// A duration string that does not follow the Gateway API format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid duration `{input}`: {problem}; write one or more <number><unit> with unit h, m, s or ms, e.g. \"1m30s\" or \"250ms\""
)]
pub struct DurationError {
    input: String,
    problem: &'static str,
}

impl GatewayDuration {
    /// Parses `"1h2m3s4ms"`-style strings.
    pub fn parse(input: &str) -> Result<Self, DurationError> {
        let fail = |problem| DurationError {
            input: input.to_string(),
            problem,
        };
        if input.is_empty() {
            return Err(fail("it is empty"));
        }
        let bytes = input.as_bytes();
        let mut total = Duration::ZERO;
        let mut i = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if i == start {
                return Err(fail("a unit is not preceded by a number"));
            }
            let number: u64 = input[start..i]
                .parse()
                .map_err(|_| fail("a number is too large"))?;
            let unit_start = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let part = match &input[unit_start..i] {
                "h" => Duration::from_secs(number.saturating_mul(3600)),
                "m" => Duration::from_secs(number.saturating_mul(60)),
                "s" => Duration::from_secs(number),
                "ms" => Duration::from_millis(number),
                "" => return Err(fail("a number has no unit")),
                _ => return Err(fail("the unit is not one of h, m, s, ms")),
            };
            total = total.saturating_add(part);
        }
        Ok(GatewayDuration(total))
    }
}

impl fmt::Display for GatewayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

impl<'de> Deserialize<'de> for GatewayDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        GatewayDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for GatewayDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gateway_api_forms() {
        assert_eq!(
            GatewayDuration::parse("10s").map(|d| d.0),
            Ok(Duration::from_secs(10))
        );
        assert_eq!(
            GatewayDuration::parse("250ms").map(|d| d.0),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(
            GatewayDuration::parse("1h1m1s1ms").map(|d| d.0),
            Ok(Duration::from_millis(3_661_001))
        );
    }

    #[test]
    fn rejects_bad_forms_with_reason() {
        for bad in ["", "10", "s", "10x", "1.5s"] {
            let err = GatewayDuration::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("e.g."), "{err}");
        }
    }
}
