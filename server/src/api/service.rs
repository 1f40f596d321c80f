//! The gRPC service `torchwire.v1.Inference`.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use torchwire_proto::v1 as pb;
use torchwire_proto::v1::inference_server::Inference;
use torchwire_telemetry::GrpcMetadata;

use super::generate::Generator;
use super::span::{start_request, Transport};
use super::validate;
use crate::engine::stats::Stats;
use crate::error::ServerError;
use crate::session::turn::ChatStream;

/// Implements `torchwire.v1.Inference` on top of a [`Generator`].
pub struct InferenceService {
    generator: Generator,
}

impl InferenceService {
    pub fn new(generator: Generator) -> Self {
        Self { generator }
    }
}

type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let transport = Transport::Grpc { method: "Generate" };
        let (span, metrics) = start_request(transport, &GrpcMetadata(request.metadata()));
        let stream = self
            .generator
            .generate(request.get_ref(), span, metrics)
            .await?;
        Ok(Response::new(Box::pin(
            stream.map(|item| item.map_err(Status::from)),
        )))
    }

    async fn complete(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let transport = Transport::Grpc { method: "Complete" };
        let (span, metrics) = start_request(transport, &GrpcMetadata(request.metadata()));
        let stream = self
            .generator
            .generate(request.get_ref(), span, metrics)
            .await?;
        Ok(Response::new(collect(stream).await?))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self.generator.models();
        let list = models
            .iter()
            .map(|e| {
                let i = &e.info;
                pb::ModelInfo {
                    name: i.name.clone(),
                    architecture: i.architecture.clone(),
                    context_length: i.context_length as u32,
                    vocab_size: i.vocab_size as u32,
                    device: i.device.clone(),
                    dtype: i.dtype.clone(),
                    parameters: i.parameters,
                    max_batch_size: i.max_batch_size as u32,
                    is_default: i.name == models.default_name(),
                    quantization: i.quantization.clone(),
                    weight_bytes: i.weight_bytes,
                    kv_cache_dtype: i.kv_cache_dtype.clone(),
                    kv_cache_bytes: i.kv_cache_bytes,
                }
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models: list }))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let engine = self.generator.models().get(&req.model)?;
        let max_bytes = self
            .generator
            .limits()
            .prompt_bytes(engine.info.context_length);
        validate::text_size("text", req.text.len(), max_bytes)?;
        let encoding = validate::tokenize(
            engine.tokenizer.clone(),
            "text",
            req.text,
            req.add_special_tokens,
        )
        .await?;
        Ok(Response::new(pb::TokenizeResponse {
            count: encoding.get_ids().len() as u32,
            token_ids: encoding.get_ids().to_vec(),
            tokens: encoding.get_tokens().to_vec(),
            model: engine.info.name.clone(),
        }))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let name = request.into_inner().model;
        let models = self.generator.models();
        let engines: Vec<_> = if name.is_empty() {
            models.iter().collect()
        } else {
            vec![models.get(&name)?]
        };
        let stats = engines
            .into_iter()
            .map(|e| {
                let s = &e.stats;
                let running = s.running.load(std::sync::atomic::Ordering::Relaxed);
                pb::ModelStats {
                    model: e.info.name.clone(),
                    running,
                    prefilling: s.prefilling.load(std::sync::atomic::Ordering::Relaxed),
                    waiting: e.waiting() as u32,
                    max_batch_size: e.info.max_batch_size as u32,
                    peak_batch_size: s.peak_batch.load(std::sync::atomic::Ordering::Relaxed),
                    decode_steps: Stats::get(&s.decode_steps),
                    prefills: Stats::get(&s.prefills),
                    tokens_generated: Stats::get(&s.tokens_generated),
                    requests_finished: Stats::get(&s.finished),
                    requests_cancelled: Stats::get(&s.cancelled),
                    requests_rejected: Stats::get(&s.rejected),
                    free_slots: e.info.max_batch_size.saturating_sub(s.slots_held()) as u32,
                    prefix_cache_hits: Stats::get(&s.prefix_hits),
                    prefix_cache_misses: Stats::get(&s.prefix_misses),
                    prefix_cache_tokens_reused: Stats::get(&s.prefix_tokens_reused),
                    prefix_cache_evictions: Stats::get(&s.prefix_evictions),
                    prefix_cache_bytes: Stats::get(&s.prefix_bytes),
                    prefix_cache_entries: Stats::get(&s.prefix_entries),
                }
            })
            .collect();
        Ok(Response::new(pb::GetStatsResponse { models: stats }))
    }

    type ChatStream = GenerateStream;

    async fn chat(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let transport = Transport::Grpc { method: "Chat" };
        let stream = self.chat_stream(request, transport).await?;
        Ok(Response::new(Box::pin(
            stream.map(|item| item.map_err(Status::from)),
        )))
    }

    async fn chat_complete(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let transport = Transport::Grpc {
            method: "ChatComplete",
        };
        let stream = self.chat_stream(request, transport).await?;
        Ok(Response::new(collect(stream).await?))
    }

    async fn render_chat(
        &self,
        request: Request<pb::RenderChatRequest>,
    ) -> Result<Response<pb::RenderChatResponse>, Status> {
        let req = request.into_inner();
        let (model, messages) = self
            .generator
            .with_history(&req.session_id, &req.model, &req.messages)
            .await?;
        let rendered = self.generator.render(&model, &messages).await?;
        let model = self.generator.models().get(&model)?.info.name.clone();
        Ok(Response::new(pb::RenderChatResponse {
            prompt: rendered.prompt,
            count: rendered.token_ids.len() as u32,
            token_ids: rendered.token_ids,
            model,
        }))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let session = self
            .generator
            .get_session(&request.get_ref().session_id)
            .await?;
        Ok(Response::new(pb::GetSessionResponse {
            session: Some(session),
        }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let deleted = self
            .generator
            .delete_session(&request.get_ref().session_id)
            .await?;
        Ok(Response::new(pb::DeleteSessionResponse { deleted }))
    }
}

impl InferenceService {
    /// Starts a chat turn for Chat and ChatComplete.
    async fn chat_stream(
        &self,
        request: Request<pb::ChatRequest>,
        transport: Transport<'static>,
    ) -> Result<ChatStream, Status> {
        let (span, metrics) = start_request(transport, &GrpcMetadata(request.metadata()));
        let turn = self
            .generator
            .chat_turn(request.get_ref(), span, metrics)
            .await?;
        Ok(turn.stream)
    }
}

/// Gathers a whole generation into one message (Complete, ChatComplete).
async fn collect(
    mut stream: impl Stream<Item = Result<pb::GenerateResponse, ServerError>> + Unpin,
) -> Result<pb::GenerateResponse, Status> {
    let mut whole = pb::GenerateResponse::default();
    while let Some(msg) = stream.next().await {
        let msg = msg?;
        whole.text.push_str(&msg.text);
        whole.token_ids.extend(msg.token_ids);
        whole.logprobs.extend(msg.logprobs);
        whole.request_id = msg.request_id;
        whole.model = msg.model;
        whole.finish_reason = msg.finish_reason;
        whole.stop_sequence = msg.stop_sequence;
        whole.usage = msg.usage;
        whole.timings = msg.timings;
    }
    Ok(whole)
}
