//! Durations as operators write them: `500ms`, `5s`, `2m`, `1h`, and combinations like `1m30s`.
//! The grammar lives here once: the parser, and the JSON Schema that tells editors about it.

use std::time::Duration;

use schemars::{Schema, SchemaGenerator, json_schema};

/// The schema of a duration as a spec writes it: `500ms`, `15s`, `2m`, `1h30m`, or bare
/// seconds (what [`parse`] reads).
pub fn schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": "^\\s*([0-9]+|([0-9]+(ms|s|m|h))+)\\s*$",
        "examples": ["15s", "2m", "1h30m"],
    })
}

/// Parses `500ms`, `15s`, `2m`, `1h`, `1h30m`; a bare number is seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "bad duration {text:?}: expected a number at {rest:?}"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration {text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value * 60),
            "h" => Duration::from_secs(value * 3600),
            other => {
                return Err(format!(
                    "bad duration {text:?}: unknown unit {other:?} (use ms, s, m or h)"
                ));
            }
        };
        total += unit;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Serde helper: a duration field written as text.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_durations_parse() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("42").unwrap(), Duration::from_secs(42));
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        assert!(parse("").is_err());
        assert!(parse("5 minutes").unwrap_err().contains("unknown unit"));
        assert!(parse("m5").unwrap_err().contains("expected a number"));
    }
}
