//! `Header`: one `name: value` pair sent with every call (`--header`, as
//! grpcurl's `-H`): a W3C `traceparent` to join a trace, an authorization
//! token for a proxy in front of the server. Over NATS (`publish`) the same
//! pairs become message headers.

use std::str::FromStr;

use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};

/// A validated ASCII gRPC metadata entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    name: String,
    value: String,
}

impl Header {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn value(&self) -> &str {
        &self.value
    }

    pub(crate) fn metadata(&self) -> (AsciiMetadataKey, AsciiMetadataValue) {
        // Both were checked when the header was parsed.
        (
            AsciiMetadataKey::from_str(&self.name).expect("checked name"),
            AsciiMetadataValue::try_from(self.value.as_str()).expect("checked value"),
        )
    }
}

impl FromStr for Header {
    type Err = String;

    /// Parses `name: value` (or `name=value`); names are case-insensitive
    /// and stored in lower case, as HTTP/2 requires.
    fn from_str(s: &str) -> Result<Self, String> {
        // Whichever separator comes first: values may contain either.
        let at = s
            .find([':', '='])
            .ok_or_else(|| format!("expected NAME: VALUE, got {s:?}"))?;
        let (name, value) = (&s[..at], &s[at + 1..]);
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_string();
        if name.ends_with("-bin") {
            return Err(format!("binary metadata ({name}) is not supported"));
        }
        if name.starts_with(':') || name.starts_with("grpc-") {
            return Err(format!("{name:?} is reserved for the protocol"));
        }
        AsciiMetadataKey::from_str(&name)
            .map_err(|_| format!("{name:?} is not a valid header name"))?;
        let printable = value.chars().all(|c| c == ' ' || c.is_ascii_graphic());
        if !printable || AsciiMetadataValue::try_from(value.as_str()).is_err() {
            return Err(format!("the value of {name:?} must be printable ASCII"));
        }
        Ok(Self { name, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_separators_and_lowercases_the_name() {
        let h: Header = "Traceparent: 00-abc-def-01".parse().unwrap();
        assert_eq!((h.name(), h.value()), ("traceparent", "00-abc-def-01"));
        let h: Header = "x-api-key=k:1".parse().unwrap();
        assert_eq!((h.name(), h.value()), ("x-api-key", "k:1"));
    }

    #[test]
    fn refuses_what_cannot_be_sent() {
        for bad in [
            "no separator",
            "bad name: x",
            "key-bin: AAAA",
            "grpc-timeout: 1S",
            "x: caf\u{e9}",
            ": empty",
        ] {
            assert!(bad.parse::<Header>().is_err(), "{bad:?} was accepted");
        }
    }
}
