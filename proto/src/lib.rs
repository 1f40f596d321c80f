//! torchwire's wire types: the `torchwire.v1` inference API and KEDA's
//! `externalscaler` interface, compiled from the `.proto` files in this crate.

/// The torchwire inference API (package `torchwire.v1`).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("torchwire.v1");
    include!(concat!(env!("OUT_DIR"), "/torchwire.v1.serde.rs"));
}

/// KEDA's external scaler interface (package `externalscaler`).
pub mod externalscaler {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("externalscaler");
}

/// Encoded `FileDescriptorSet` of every proto here, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

#[cfg(test)]
mod tests {
    use super::v1::GenerateRequest;

    #[test]
    fn generate_request_reads_canonical_json() {
        let req: GenerateRequest = serde_json::from_str(
            r#"{"prompt":"hi","maxNewTokens":8,"temperature":0.5,"stop":["\n"],"seed":"7"}"#,
        )
        .unwrap();
        assert_eq!(req.prompt, "hi");
        assert_eq!(req.max_new_tokens, Some(8));
        assert_eq!(req.seed, Some(7));
        assert_eq!(req.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn generate_request_accepts_snake_case_json() {
        let req: GenerateRequest =
            serde_json::from_str(r#"{"prompt":"hi","max_new_tokens":3,"ignore_eos":true}"#)
                .unwrap();
        assert_eq!(req.max_new_tokens, Some(3));
        assert!(req.ignore_eos);
    }

    #[test]
    fn generate_request_reads_nested_options_json() {
        let req: GenerateRequest = serde_json::from_str(
            r#"{"prompt":"hi","options":{"max_new_tokens":4,"seed":"3","stop":["x"]}}"#,
        )
        .unwrap();
        let options = req.options.unwrap();
        assert_eq!(options.max_new_tokens, Some(4));
        assert_eq!(options.seed, Some(3));
        assert_eq!(req.max_new_tokens, None);
    }

    #[test]
    fn chat_request_reads_json() {
        let req: super::v1::ChatRequest = serde_json::from_str(
            r#"{"messages":[{"role":"user","content":"hi","name":"ann"}],
                "sessionId":"s1","sessionMode":"SESSION_MODE_CONTINUE"}"#,
        )
        .unwrap();
        assert_eq!(req.messages[0].name.as_deref(), Some("ann"));
        assert_eq!(req.messages[0].tool_call_id, None);
        assert_eq!(req.session_mode(), super::v1::SessionMode::Continue);
    }
}
