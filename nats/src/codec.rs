//! Wire encoding of `GenerateRequest` / `GenerateResponse` on NATS: binary
//! protobuf by default, canonical protobuf JSON (pbjson) when the request
//! says `Content-Type: application/json`. Responses use the request's encoding.

use std::fmt;

use async_nats::HeaderMap;
use bytes::Bytes;
use prost::Message;
use torchwire_proto::v1::{ChatRequest, GenerateRequest, GenerateResponse};

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

/// Decodes a chat request body (`Torchwire-Method: Chat`).
pub fn decode_chat_request(body: &[u8], encoding: Encoding) -> Result<ChatRequest, NatsError> {
    decode(body, encoding)
}

/// Encodes a chat request body (for publishers: the CLI, tests).
pub fn encode_chat_request(request: &ChatRequest, encoding: Encoding) -> Bytes {
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

    mod fuzz {
        //! Every decoder of NATS input, fed what a hostile or broken
        //! publisher could send: decoding returns a message or a
        //! `NatsError::Decode` of the encoding asked for, never a panic.
        //! `scripts/fuzz.sh` runs these with many more cases.

        use super::*;
        use proptest::prelude::*;

        fn any_request() -> impl Strategy<Value = GenerateRequest> {
            (
                (".{0,12}", "\\PC{0,64}", ".{0,12}"),
                proptest::option::of(any::<u32>()),
                (
                    any::<f32>(),
                    any::<u32>(),
                    any::<f32>(),
                    any::<f32>(),
                    any::<f32>(),
                ),
                proptest::option::of(any::<u64>()),
                proptest::collection::vec(".{0,8}", 0..4),
                (any::<bool>(), any::<u32>()),
            )
                .prop_map(
                    |(
                        (model, prompt, request_id),
                        max_new_tokens,
                        (temperature, top_k, top_p, min_p, repetition_penalty),
                        seed,
                        stop,
                        (ignore_eos, logprobs),
                    )| {
                        GenerateRequest {
                            model,
                            prompt,
                            request_id,
                            max_new_tokens,
                            temperature,
                            top_k,
                            top_p,
                            min_p,
                            repetition_penalty,
                            seed,
                            stop,
                            ignore_eos,
                            logprobs,
                            options: None,
                        }
                    },
                )
        }

        /// JSON documents near the real schema: known and unknown keys with
        /// values of every JSON type.
        fn any_json() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::Bool),
                any::<i64>().prop_map(|n| serde_json::json!(n)),
                any::<f64>().prop_map(|n| serde_json::json!(n)),
                ".{0,10}".prop_map(serde_json::Value::String),
                Just(serde_json::json!("18446744073709551616")),
                Just(serde_json::json!("NaN")),
                Just(serde_json::json!(-1)),
            ];
            let value = leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4)
                        .prop_map(serde_json::Value::Array),
                    proptest::collection::btree_map(".{0,6}", inner, 0..3)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            });
            let key = prop_oneof![
                Just("prompt"),
                Just("model"),
                Just("requestId"),
                Just("request_id"),
                Just("maxNewTokens"),
                Just("max_new_tokens"),
                Just("temperature"),
                Just("topK"),
                Just("topP"),
                Just("minP"),
                Just("repetitionPenalty"),
                Just("seed"),
                Just("stop"),
                Just("ignoreEos"),
                Just("logprobs"),
                Just("unknownField"),
            ];
            proptest::collection::btree_map(key, value, 0..6).prop_map(|m| {
                serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                    .to_string()
            })
        }

        fn check<T: std::fmt::Debug>(
            result: Result<T, NatsError>,
            encoding: Encoding,
        ) -> Result<(), TestCaseError> {
            if let Err(e) = result {
                prop_assert!(
                    matches!(&e, NatsError::Decode { encoding: got, .. } if *got == encoding),
                    "{e}"
                );
                prop_assert!(!e.to_string().is_empty());
            }
            Ok(())
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_decode_or_fail_cleanly(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                for encoding in [Encoding::Protobuf, Encoding::Json] {
                    check(decode_request(&body, encoding), encoding)?;
                    check(decode_response(&body, encoding), encoding)?;
                }
            }

            #[test]
            fn json_near_the_schema_decodes_or_fails_cleanly(doc in any_json()) {
                check(decode_request(doc.as_bytes(), Encoding::Json), Encoding::Json)?;
                check(decode_response(doc.as_bytes(), Encoding::Json), Encoding::Json)?;
            }

            /// Valid requests, then flipped, cut or spliced bytes.
            #[test]
            fn mutated_requests_decode_or_fail_cleanly(
                request in any_request(),
                json in any::<bool>(),
                flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
                cut in any::<prop::sample::Index>(),
            ) {
                let encoding = if json { Encoding::Json } else { Encoding::Protobuf };
                let mut body = encode_request(&request, encoding).to_vec();
                // Floats (NaN, infinities) that JSON cannot carry make no round trip.
                if flips.is_empty() && request.temperature.is_finite() && request.top_p.is_finite()
                    && request.min_p.is_finite() && request.repetition_penalty.is_finite()
                {
                    prop_assert_eq!(decode_request(&body, encoding).unwrap(), request.clone());
                }
                if !body.is_empty() {
                    for (at, byte) in &flips {
                        let i = at.index(body.len());
                        body[i] ^= byte;
                    }
                    body.truncate(cut.index(body.len() + 1));
                }
                check(decode_request(&body, encoding), encoding)?;
            }

            #[test]
            fn any_content_type_selects_an_encoding(value in "\\PC{0,40}|.{0,40}") {
                let encoding = Encoding::from_content_type(&value);
                prop_assert!(matches!(encoding, Encoding::Json | Encoding::Protobuf));
            }
        }
    }
}
