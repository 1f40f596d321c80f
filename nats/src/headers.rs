//! Header names and values of torchwire's NATS messages, and the checks on
//! the ones that come from outside. A request carries `REPLY_TO` (the
//! subject its responses go to), optionally `REQUEST_ID` and `CONTENT_TYPE`;
//! each response carries `SEQUENCE`, `REQUEST_ID`, the same `CONTENT_TYPE`
//! as its request, and `FINAL` on the last one. Every value a publisher
//! controls is checked before it is used as a subject or copied into a
//! response header.

use async_nats::HeaderMap;

use crate::NatsError;

/// Subject the responses to a request are published to.
pub const REPLY_TO: &str = "Torchwire-Reply-To";
/// Position of a response message in its stream: 0, 1, 2, ...
pub const SEQUENCE: &str = "Torchwire-Seq";
/// `"true"` on the last response message of a request.
pub const FINAL: &str = "Torchwire-Final";
/// The request id, on requests (optional) and on every response.
pub const REQUEST_ID: &str = "Torchwire-Request-Id";
/// Encoding of the body: [`JSON`] or [`PROTOBUF`] (the default when absent).
pub const CONTENT_TYPE: &str = "Content-Type";
/// Canonical protobuf JSON (proto3 JSON mapping).
pub const JSON: &str = "application/json";
/// Binary protobuf.
pub const PROTOBUF: &str = "application/protobuf";
/// Value of [`FINAL`] on the last response.
pub const TRUE: &str = "true";
/// What the request body is: [`GENERATE`] (a `GenerateRequest`, the
/// default when absent) or [`CHAT`] (a `ChatRequest`).
pub const METHOD: &str = "Torchwire-Method";
/// [`METHOD`] of a `GenerateRequest`.
pub const GENERATE: &str = "Generate";
/// [`METHOD`] of a `ChatRequest`.
pub const CHAT: &str = "Chat";

/// The call a request message asks for (its [`METHOD`] header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Generate,
    Chat,
}

impl Method {
    /// The header value for this method.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Generate => GENERATE,
            Self::Chat => CHAT,
        }
    }
}

/// The [`METHOD`] of a request: Generate when absent; names are matched
/// case-insensitively; anything else is refused.
pub fn method(headers: Option<&HeaderMap>) -> Result<Method, NatsError> {
    match get(headers, METHOD)? {
        None | Some("") => Ok(Method::Generate),
        Some(m) if m.eq_ignore_ascii_case(GENERATE) => Ok(Method::Generate),
        Some(m) if m.eq_ignore_ascii_case(CHAT) => Ok(Method::Chat),
        Some(m) => Err(NatsError::invalid(
            METHOD,
            format!(
                "must be {GENERATE} or {CHAT}, got {:?}",
                m.chars().take(32).collect::<String>()
            ),
        )),
    }
}

/// Longest reply subject accepted, in bytes.
pub const MAX_REPLY_SUBJECT_BYTES: usize = 256;
/// Longest request id accepted, in bytes (the gRPC API's limit too).
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// The single value of header `name` (matched case-insensitively), if any.
/// A header repeated with different values is an error: which one would be
/// meant is anyone's guess.
pub fn get<'a>(
    headers: Option<&'a HeaderMap>,
    name: &'static str,
) -> Result<Option<&'a str>, NatsError> {
    let Some(headers) = headers else {
        return Ok(None);
    };
    let mut found: Option<&str> = None;
    for (key, values) in headers.iter() {
        if !AsRef::<str>::as_ref(key).eq_ignore_ascii_case(name) {
            continue;
        }
        for value in values {
            match found {
                Some(seen) if seen != value.as_str() => {
                    return Err(NatsError::invalid(name, "is set more than once"));
                }
                _ => found = Some(value.as_str()),
            }
        }
    }
    Ok(found)
}

/// The reply subject of a request: its [`REPLY_TO`] header, checked with
/// [`check_reply_subject`].
pub fn reply_subject(
    headers: Option<&HeaderMap>,
    prefix: Option<&str>,
    request_subject: &str,
) -> Result<String, NatsError> {
    match get(headers, REPLY_TO)? {
        None | Some("") => Err(NatsError::invalid(REPLY_TO, "is missing")),
        Some(subject) => {
            check_reply_subject(subject, prefix, request_subject)?;
            Ok(subject.to_string())
        }
    }
}

/// A subject responses may be published to: a literal subject (non-empty
/// dot-separated tokens, no `*` or `>`, no whitespace or control
/// characters) of at most [`MAX_REPLY_SUBJECT_BYTES`], not a system subject
/// (`$JS.API...`, `$SYS...`: a response there would be an API call with the
/// server's permissions), not the request subject itself, and starting with
/// `prefix` when one is configured.
pub fn check_reply_subject(
    subject: &str,
    prefix: Option<&str>,
    request_subject: &str,
) -> Result<(), NatsError> {
    let bad = |reason: String| Err(NatsError::invalid(REPLY_TO, reason));
    if subject.len() > MAX_REPLY_SUBJECT_BYTES {
        return bad(format!(
            "is {} bytes long; at most {MAX_REPLY_SUBJECT_BYTES} are allowed",
            subject.len()
        ));
    }
    if let Some(c) = subject
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '*' | '>'))
    {
        return bad(format!(
            "contains {c:?}: a reply subject must be literal (no wildcards, whitespace or control characters)"
        ));
    }
    if subject.split('.').any(str::is_empty) {
        return bad("has an empty token (dot-separated tokens, none empty)".into());
    }
    if subject.starts_with('$') {
        return bad("is a system subject (starts with '$')".into());
    }
    if subject == request_subject {
        return bad("is the request subject itself".into());
    }
    if let Some(prefix) = prefix {
        if !subject.starts_with(prefix) {
            return bad(format!(
                "does not start with {prefix:?} (nats.reply_prefix)"
            ));
        }
    }
    Ok(())
}

/// The [`REQUEST_ID`] header, checked with [`check_request_id`].
pub fn request_id(headers: Option<&HeaderMap>) -> Result<Option<String>, NatsError> {
    match get(headers, REQUEST_ID)? {
        None | Some("") => Ok(None),
        Some(id) => {
            check_request_id(REQUEST_ID, id)?;
            Ok(Some(id.to_string()))
        }
    }
}

/// A request id that may be copied into response headers and logs: at most
/// [`MAX_REQUEST_ID_BYTES`], no control characters (no CR/LF header
/// injection). `source` names where it came from (header or body field).
pub fn check_request_id(source: &'static str, id: &str) -> Result<(), NatsError> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(NatsError::invalid(
            source,
            format!(
                "is {} bytes long; at most {MAX_REQUEST_ID_BYTES} are allowed",
                id.len()
            ),
        ));
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(NatsError::invalid(
            source,
            format!("contains the control character {c:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUESTS: &str = "torchwire.generate";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, *v);
        }
        h
    }

    #[test]
    fn the_method_header_picks_the_body_and_refuses_others() {
        assert_eq!(method(None).unwrap(), Method::Generate);
        for (value, want) in [
            ("", Method::Generate),
            ("Generate", Method::Generate),
            ("chat", Method::Chat),
            ("CHAT", Method::Chat),
        ] {
            assert_eq!(method(Some(&headers(&[(METHOD, value)]))).unwrap(), want);
        }
        for bad in [
            headers(&[(METHOD, "Embed")]),
            headers(&[(METHOD, "Chat"), (METHOD, "Generate")]),
        ] {
            let err = method(Some(&bad)).unwrap_err().to_string();
            assert!(err.contains(METHOD), "{err}");
        }
    }

    #[test]
    fn inboxes_and_plain_subjects_are_reply_subjects() {
        for s in ["_INBOX.abc.def", "replies.r1", "a", "tenant-1.replies.ünï"] {
            check_reply_subject(s, None, REQUESTS).unwrap();
        }
        check_reply_subject("_INBOX.x", Some("_INBOX."), REQUESTS).unwrap();
    }

    #[test]
    fn hostile_reply_subjects_are_refused() {
        let long = "a".repeat(MAX_REPLY_SUBJECT_BYTES + 1);
        for s in [
            "replies.*",
            "replies.>",
            ">",
            "a*b",
            "replies. x",
            "replies.x\r\nPUB evil 1",
            "replies.\tx",
            "replies.\0",
            "replies..x",
            ".replies",
            "replies.",
            "$JS.API.STREAM.DELETE.TORCHWIRE",
            "$SYS.REQ.SERVER.PING",
            REQUESTS,
            long.as_str(),
        ] {
            let err = check_reply_subject(s, None, REQUESTS).unwrap_err();
            assert!(err.to_string().starts_with(REPLY_TO), "{s:?}: {err}");
        }
        let err = check_reply_subject("replies.x", Some("_INBOX."), REQUESTS).unwrap_err();
        assert!(err.to_string().contains("nats.reply_prefix"), "{err}");
    }

    #[test]
    fn reply_to_is_read_case_insensitively_and_must_be_unambiguous() {
        let h = headers(&[("torchwire-reply-to", "replies.a")]);
        assert_eq!(
            reply_subject(Some(&h), None, REQUESTS).unwrap(),
            "replies.a"
        );
        let h = headers(&[(REPLY_TO, "replies.a"), (REPLY_TO, "replies.b")]);
        let err = reply_subject(Some(&h), None, REQUESTS).unwrap_err();
        assert!(err.to_string().contains("more than once"), "{err}");
        let err = reply_subject(None, None, REQUESTS).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        let h = headers(&[(REPLY_TO, "")]);
        assert!(reply_subject(Some(&h), None, REQUESTS).is_err());
    }

    #[test]
    fn request_ids_with_control_characters_or_too_long_are_refused() {
        check_request_id("request_id", "req-1 ünï").unwrap();
        for id in ["a\r\nTorchwire-Final: true", "a\0", "\u{7f}", "\u{85}"] {
            let err = check_request_id("request_id", id).unwrap_err();
            assert!(err.to_string().contains("control character"), "{err}");
        }
        let err = check_request_id("request_id", &"x".repeat(129)).unwrap_err();
        assert!(err.to_string().starts_with("request_id"), "{err}");
        let h = headers(&[(REQUEST_ID, "")]);
        assert_eq!(request_id(Some(&h)).unwrap(), None);
        let h = headers(&[(REQUEST_ID, "id\u{1b}[31m")]);
        assert!(request_id(Some(&h)).is_err());
    }

    mod fuzz {
        //! Header parsing fed what a hostile publisher could send; run with
        //! many more cases by `scripts/fuzz.sh`.

        use super::*;
        use proptest::prelude::*;

        /// Header maps as a hostile publisher could send them: any names and
        /// values, repeated names, any case.
        fn any_headers() -> impl Strategy<Value = HeaderMap> {
            let name = prop_oneof![
                Just(REPLY_TO.to_string()),
                Just(REPLY_TO.to_ascii_lowercase()),
                Just(REQUEST_ID.to_string()),
                Just(CONTENT_TYPE.to_string()),
                "[A-Za-z-]{1,20}",
            ];
            let value = prop_oneof![
                "\\PC{0,40}",
                ".{0,300}",
                "[_A-Za-z0-9.*>$ ]{0,40}",
                Just("_INBOX.x".to_string()),
            ];
            proptest::collection::vec((name, value), 0..6).prop_map(|pairs| {
                let mut h = HeaderMap::new();
                for (k, v) in pairs {
                    h.append(k.as_str(), v.as_str());
                }
                h
            })
        }

        proptest! {
            /// Whatever the headers, parsing returns a value or an error naming
            /// the header, and what it accepts is safe to publish to and to copy
            /// into a response header.
            #[test]
            fn header_parsing_never_panics_and_accepts_only_safe_values(
                h in any_headers(),
                prefix in proptest::option::of("[_A-Za-z.]{0,8}"),
            ) {
                match reply_subject(Some(&h), prefix.as_deref(), REQUESTS) {
                    Ok(subject) => {
                        prop_assert!(!subject.is_empty() && subject.len() <= MAX_REPLY_SUBJECT_BYTES);
                        prop_assert!(!subject.contains(['*', '>', ' ', '\r', '\n', '\t', '\0']));
                        prop_assert!(!subject.starts_with('$'));
                        prop_assert!(subject.split('.').all(|t| !t.is_empty()));
                        if let Some(p) = &prefix {
                            prop_assert!(subject.starts_with(p.as_str()));
                        }
                    }
                    Err(e) => prop_assert!(matches!(e, NatsError::Invalid { what: REPLY_TO, .. }), "{e}"),
                }
                match request_id(Some(&h)) {
                    Ok(Some(id)) => {
                        prop_assert!(id.len() <= MAX_REQUEST_ID_BYTES);
                        prop_assert!(!id.chars().any(char::is_control));
                    }
                    Ok(None) => {}
                    Err(e) => prop_assert!(matches!(e, NatsError::Invalid { what: REQUEST_ID, .. }), "{e}"),
                }
                let _ = crate::Encoding::from_headers(Some(&h));
            }

            /// Any string is either a valid request id or a clean error.
            #[test]
            fn request_id_checks_never_panic(id in "\\PC{0,200}|.{0,200}") {
                match check_request_id("request_id", &id) {
                    Ok(()) => prop_assert!(id.len() <= MAX_REQUEST_ID_BYTES && !id.chars().any(char::is_control)),
                    Err(e) => prop_assert!(e.to_string().starts_with("request_id: "), "{e}"),
                }
            }
        }
    }
}
