//! Which OTLP collector spans go to: the endpoint in torchwire's own config
//! wins over the standard `OTEL_EXPORTER_OTLP_*` variables, and it must be an
//! http:// or https:// URL, checked before anything starts.

use tonic::codegen::http::Uri;

/// The standard variables naming a collector, the traces-only one first.
const ENDPOINT_VARS: &[&str] = &[
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Turns every OpenTelemetry SDK off when `true`.
const SDK_DISABLED_VAR: &str = "OTEL_SDK_DISABLED";

/// A collector endpoint that is not a usable URL; `key` names where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointError {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for EndpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for EndpointError {}

/// The collector to export spans to, if any: `configured` (torchwire's own
/// config key `key`), else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
/// `OTEL_EXPORTER_OTLP_ENDPOINT` from `env`. Empty values count as unset;
/// `OTEL_SDK_DISABLED=true` turns export off whatever is configured.
pub fn resolve_endpoint(
    configured: Option<&str>,
    key: &str,
    env: &[(String, String)],
) -> Result<Option<String>, EndpointError> {
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    };
    if var(SDK_DISABLED_VAR).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let chosen = match configured.map(str::trim).filter(|v| !v.is_empty()) {
        Some(url) => Some((key, url)),
        None => ENDPOINT_VARS
            .iter()
            .find_map(|name| var(name).map(|url| (*name, url))),
    };
    let Some((key, url)) = chosen else {
        return Ok(None);
    };
    check_url(url).map_err(|message| EndpointError {
        key: key.to_string(),
        message,
    })?;
    Ok(Some(url.to_string()))
}

/// An OTLP/gRPC endpoint is `http://host:port` or `https://host:port`.
fn check_url(url: &str) -> Result<(), String> {
    let example = "like http://otel-collector:4317";
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL {example}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "{url:?} must start with http:// or https:// ({example})"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} names no host ({example})"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn configured_beats_the_traces_variable_which_beats_the_generic_one() {
        let all = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
        ]);
        let got = |configured, env: &[(String, String)]| {
            resolve_endpoint(configured, "otlp_endpoint", env).unwrap()
        };
        assert_eq!(
            got(Some("http://mine:4317"), &all).as_deref(),
            Some("http://mine:4317")
        );
        assert_eq!(got(None, &all).as_deref(), Some("http://traces:4317"));
        assert_eq!(got(Some(""), &all).as_deref(), Some("http://traces:4317"));
        assert_eq!(got(None, &all[..1]).as_deref(), Some("http://generic:4317"));
        assert_eq!(got(None, &[]), None);
    }

    #[test]
    fn the_sdk_switch_turns_export_off() {
        let e = env(&[
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
        ]);
        assert_eq!(
            resolve_endpoint(Some("http://mine:4317"), "k", &e),
            Ok(None)
        );
    }

    #[test]
    fn bad_urls_name_the_key_they_came_from() {
        for bad in [
            "localhost:4317",
            "ftp://collector:21",
            "http://",
            "not a url",
        ] {
            let err = resolve_endpoint(Some(bad), "otlp_endpoint", &[]).unwrap_err();
            assert_eq!(err.key, "otlp_endpoint", "{bad}: {err}");
        }
        let e = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]);
        let err = resolve_endpoint(None, "otlp_endpoint", &e).unwrap_err();
        assert_eq!(err.key, "OTEL_EXPORTER_OTLP_ENDPOINT");
        assert!(
            resolve_endpoint(Some("https://collector.example:443"), "k", &[]).is_ok(),
            "https is fine"
        );
    }
}
