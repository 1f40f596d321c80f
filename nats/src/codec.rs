//! Wire encoding of `GenerateRequest` / `GenerateResponse` on NATS: binary
//! protobuf by default, canonical protobuf JSON (pbjson) when the request
//! says `Content-Type: application/json`. Responses use the request's encoding.

use std::fmt;

use async_nats::HeaderMap;
use bytes::Bytes;
use prost::Message;
use torchwire_proto::v1::{GenerateRequest, GenerateResponse};

use crate::headers;
use crate::NatsError;

/// How a message body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Binary protobuf (`application/protobuf`, or no Content-Type).
    #[default]
    Protobuf,
    /// Canonical protobuf JSON (`application/json`).
    Json,
}

impl Encoding {
    /// The encoding a message's headers ask for: JSON when Content-Type is
    /// `application/json` (any case, parameters allowed), protobuf otherwise.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Self {
        let content_type = headers.and_then(|h| {
            h.iter()
                .find(|(name, _)| {
                    AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(headers::CONTENT_TYPE)
                })
                .and_then(|(_, values)| values.first())
        });
        match content_type {
            Some(value) => Self::from_content_type(value.as_str()),
            None => Self::Protobuf,
        }
    }

    /// The encoding for a Content-Type value.
    pub fn from_content_type(value: &str) -> Self {
        let media_type = value.split(';').next().unwrap_or_default().trim();
        if media_type.eq_ignore_ascii_case(headers::JSON) {
            Self::Json
        } else {
            Self::Protobuf
        }
    }

    /// The Content-Type header value for this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Protobuf => headers::PROTOBUF,
            Self::Json => headers::JSON,
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Protobuf => "protobuf",
            Self::Json => "JSON",
        })
    }
}

/// Decodes a request body.
pub fn decode_request(body: &[u8], encoding: Encoding) -> Result<GenerateRequest, NatsError> {
    decode(body, encoding)
}

/// Encodes a request body (for publishers: the CLI, tests).
pub fn encode_request(request: &GenerateRequest, encoding: Encoding) -> Bytes {
    encode(request, encoding)
}

/// Decodes a response body (for clients reading the reply subject).
pub fn decode_response(body: &[u8], encoding: Encoding) -> Result<GenerateResponse, NatsError> {
    decode(body, encoding)
}

/// Encodes a response body.
pub fn encode_response(response: &GenerateResponse, encoding: Encoding) -> Bytes {
    encode(response, encoding)
}

fn decode<M>(body: &[u8], encoding: Encoding) -> Result<M, NatsError>
where
    M: Message + Default + serde::de::DeserializeOwned,
{
    let decoded = match encoding {
        Encoding::Protobuf => M::decode(body).map_err(|e| Box::new(e) as _),
        Encoding::Json => serde_json::from_slice(body).map_err(|e| Box::new(e) as _),
    };
    decoded.map_err(|source| NatsError::Decode { encoding, source })
}

fn encode<M>(message: &M, encoding: Encoding) -> Bytes
where
    M: Message + serde::Serialize,
{
    match encoding {
        Encoding::Protobuf => Bytes::from(message.encode_to_vec()),
        // pbjson's Serialize impls cannot fail: every field maps to JSON.
        Encoding::Json => {
            Bytes::from(serde_json::to_vec(message).expect("pbjson messages serialize to JSON"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use torchwire_proto::v1::{FinishReason, Usage};

    fn request() -> GenerateRequest {
        GenerateRequest {
            prompt: "Once upon a time".into(),
            request_id: "r-1".into(),
            max_new_tokens: Some(16),
            temperature: 0.7,
            seed: Some(42),
            stop: vec!["\n".into()],
            ..Default::default()
        }
    }

    #[test]
    fn content_type_selects_the_encoding() {
        let mut h = HeaderMap::new();
        assert_eq!(Encoding::from_headers(None), Encoding::Protobuf);
        assert_eq!(Encoding::from_headers(Some(&h)), Encoding::Protobuf);
        h.insert(headers::CONTENT_TYPE, "application/json; charset=utf-8");
        assert_eq!(Encoding::from_headers(Some(&h)), Encoding::Json);
        let mut lower = HeaderMap::new();
        lower.insert("content-type", "Application/JSON");
        assert_eq!(Encoding::from_headers(Some(&lower)), Encoding::Json);
        let mut other = HeaderMap::new();
        other.insert(headers::CONTENT_TYPE, headers::PROTOBUF);
        assert_eq!(Encoding::from_headers(Some(&other)), Encoding::Protobuf);
    }

    #[test]
    fn requests_round_trip_in_both_encodings() {
        for encoding in [Encoding::Protobuf, Encoding::Json] {
            let body = encode_request(&request(), encoding);
            assert_eq!(
                decode_request(&body, encoding).unwrap(),
                request(),
                "{encoding}"
            );
        }
    }

    #[test]
    fn json_is_canonical_proto_json() {
        let body = encode_request(&request(), Encoding::Json);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["maxNewTokens"], 16);
        // 64-bit integers are strings in proto3 JSON.
        assert_eq!(json["seed"], "42");
        let parsed =
            decode_request(br#"{"prompt":"hi","max_new_tokens":3}"#, Encoding::Json).unwrap();
        assert_eq!(parsed.max_new_tokens, Some(3));
    }

    #[test]
    fn responses_encode_in_both_encodings() {
        let response = GenerateResponse {
            request_id: "r-1".into(),
            text: " there".into(),
            token_ids: vec![5, 6],
            finish_reason: FinishReason::Length as i32,
            usage: Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 2,
            }),
            ..Default::default()
        };
        for encoding in [Encoding::Protobuf, Encoding::Json] {
            let body = encode_response(&response, encoding);
            assert_eq!(
                decode_response(&body, encoding).unwrap(),
                response,
                "{encoding}"
            );
        }
        let json: serde_json::Value =
            serde_json::from_slice(&encode_response(&response, Encoding::Json)).unwrap();
        assert_eq!(json["finishReason"], "FINISH_REASON_LENGTH");
    }

    #[test]
    fn bad_bodies_are_errors() {
        let err = decode_request(b"{not json", Encoding::Json).unwrap_err();
        assert!(
            matches!(
                err,
                NatsError::Decode {
                    encoding: Encoding::Json,
                    ..
                }
            ),
            "{err}"
        );
        let err = decode_request(&[0xff, 0xff, 0xff], Encoding::Protobuf).unwrap_err();
        assert!(err.to_string().contains("protobuf"), "{err}");
    }
}
