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
}
