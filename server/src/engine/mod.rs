//! The engine: one OS thread per model that owns its tensors and KV cache
//! and runs continuous batching; requests reach it through a bounded queue.

pub mod device_sampler;
#[cfg(debug_assertions)]
pub(crate) mod fault;
pub mod kv_cache;
pub mod liveness;
pub mod prefix_cache;
pub mod request;
pub mod sampler;
mod scheduler;
pub mod stats;
pub mod text;
pub mod thread_governor;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::config::ModelConfig;
use crate::error::ServerError;
use crate::model::{self, DeviceChoice, Llama, LoadOptions, Quantization};
use kv_cache::KvCache;
use liveness::{ExitGuard, Progress};
use request::Job;
use stats::Stats;

/// Contexts longer than this are not served unless configured explicitly.
const DEFAULT_CONTEXT_CAP: usize = 4096;

/// What a loaded model is, for ListModels and validation.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub device: String,
    pub dtype: String,
    /// The dtype the KV cache stores keys and values in.
    pub kv_cache_dtype: String,
    /// "none" or "int8".
    pub quantization: String,
    pub parameters: u64,
    /// Bytes the weights take on the device.
    pub weight_bytes: u64,
    pub max_batch_size: usize,
    pub queue_size: usize,
    pub default_max_new_tokens: usize,
    /// Bytes of the KV cache (every slot, allocated at load).
    pub kv_cache_bytes: u64,
    /// Bytes of the KV cache one cached token takes.
    pub kv_bytes_per_token: u64,
    /// Reading the weights and tokenizer and allocating the cache.
    pub load_time: Duration,
    /// The warm-up forward passes after loading.
    pub warmup_time: Duration,
}

/// What the model thread is asked to do, in queue order.
pub(crate) enum Command {
    Generate(Job),
    /// Wakes an idle model thread to see the stop flag.
    Stop,
}

/// A running model: its queue, tokenizer, chat template and counters.
pub struct Engine {
    pub info: ModelInfo,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// The chat template, or why Chat is refused for this model.
    pub chat_template: crate::chat::ChatSupport,
    pub stats: Arc<Stats>,
    jobs: mpsc::Sender<Command>,
    /// Set to stop the model thread at its next step, ahead of the queue.
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the model thread, which loads and warms up the model; returns
    /// once it is ready to serve (or failed to load).
    pub async fn start(name: &str, config: &ModelConfig) -> Result<Self, ServerError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (jobs_tx, jobs_rx) = mpsc::channel(config.queue_size as usize);
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = stop.clone();
        let (name_owned, config_owned, stats_thread) =
            (name.to_string(), config.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name(format!("model-{name}"))
            .spawn(move || {
                // Also marks the thread gone when a panic unwinds it.
                let _exit = ExitGuard(stats_thread.heartbeat.clone());
                #[cfg(debug_assertions)]
                if let Some(fault) = fault::Fault::from_env() {
                    fault.on_load();
                }
                match load(&name_owned, &config_owned) {
                    Ok((model, cache, tokenizer, info)) => {
                        stats_thread.heartbeat.beat();
                        let scheduler = scheduler::Scheduler::new(
                            name_owned,
                            model,
                            cache,
                            tokenizer.clone(),
                            scheduler::Inbox {
                                jobs: jobs_rx,
                                stop: stop_thread,
                            },
                            stats_thread.clone(),
                            config_owned.max_prefill_tokens as usize,
                        )
                        .with_prefix_cache(prefix_cache::PrefixCache::new(
                            config_owned.prefix_cache_mib * 1024 * 1024,
                            stats_thread,
                        ))
                        .with_sampler(config_owned.sampler)
                        .with_thread_governor(config_owned.adaptive_threads);
                        if ready_tx.send(Ok((tokenizer, info))).is_ok() {
                            scheduler.run();
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| ServerError::Load {
                model: name.into(),
                path: config.path.display().to_string(),
                message: e.to_string(),
            })?;
        let (tokenizer, info) = ready_rx
            .await
            .map_err(|_| ServerError::EngineStopped(name.to_string()))??;
        let (chat_name, chat_dir, chat_file) = (
            name.to_string(),
            config.path.clone(),
            config.chat_template.clone(),
        );
        let chat_template = tokio::task::spawn_blocking(move || {
            crate::chat::load_support(&chat_name, &chat_dir, chat_file.as_deref())
        })
        .await
        .map_err(|e| ServerError::Load {
            model: name.into(),
            path: config.path.display().to_string(),
            message: format!("loading the chat template: {e}"),
        })??;
        Ok(Self {
            info,
            tokenizer,
            chat_template,
            stats,
            jobs: jobs_tx,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a job; a full queue is refused at once.
    pub fn submit(&self, job: Job) -> Result<(), ServerError> {
        self.jobs
            .try_send(Command::Generate(job))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    Stats::add(&self.stats.rejected, 1);
                    ServerError::Overloaded {
                        model: self.info.name.clone(),
                        capacity: self.info.queue_size,
                    }
                }
                mpsc::error::TrySendError::Closed(_) => {
                    ServerError::EngineStopped(self.info.name.clone())
                }
            })
    }

    /// Stops the model thread at its next step: what is still running or
    /// queued gets UNAVAILABLE, and the thread frees the model and its cache.
    /// Returns whether the thread ended within `timeout`.
    pub async fn stop(&self, timeout: Duration) -> bool {
        let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) else {
            return true;
        };
        self.stop.store(true, Ordering::SeqCst);
        let stop = async {
            // Wakes the thread if it is idle. Waits for queue space if the
            // queue is full (the stopping thread empties it); an error means
            // the thread is gone already.
            let _ = self.jobs.send(Command::Stop).await;
            tokio::task::spawn_blocking(move || thread.join()).await
        };
        match tokio::time::timeout(timeout, stop).await {
            Ok(Ok(Ok(()))) => true,
            Ok(_) => {
                tracing::error!(model = %self.info.name, "the model thread panicked");
                true
            }
            Err(_) => {
                tracing::warn!(model = %self.info.name, "the model thread did not stop in time");
                false
            }
        }
    }

    /// Requests waiting in the queue now.
    pub fn waiting(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// Whether the model thread runs and makes progress: a thread with work
    /// may go `stall_limit` without completing a step. A thread that was
    /// told to stop is not checked.
    pub fn progress(&self, stall_limit: Duration) -> Progress {
        if self.stop.load(Ordering::SeqCst) {
            return Progress::Running;
        }
        self.stats.heartbeat.progress(stall_limit)
    }
}

type Loaded = (Llama, KvCache, Arc<tokenizers::Tokenizer>, ModelInfo);

/// Runs on the model thread: loads weights, tokenizer and cache, warms up.
fn load(name: &str, config: &ModelConfig) -> Result<Loaded, ServerError> {
    let err = |message: String| ServerError::Load {
        model: name.to_string(),
        path: config.path.display().to_string(),
        message,
    };
    let started = Instant::now();
    let choice = DeviceChoice::parse(&config.device).map_err(&err)?;
    let device = choice.resolve().map_err(&err)?;
    let kind = match &config.dtype {
        Some(d) => model::parse_dtype(d).map_err(&err)?,
        None if device.is_cuda() => tch::Kind::BFloat16,
        None => tch::Kind::Float,
    };
    let quantization = Quantization::parse(&config.quantize).map_err(&err)?;
    let kv_kind = model::kv_cache_kind(&config.kv_cache_dtype, kind).map_err(&err)?;
    let hf = model::HfConfig::read(&config.path).map_err(&err)?;
    let context = match config.max_context {
        Some(c) => (c as usize).min(hf.max_position_embeddings),
        None => hf.max_position_embeddings.min(DEFAULT_CONTEXT_CAP),
    };
    let tokenizer = load_tokenizer(&config.path).map_err(&err)?;
    let model = Llama::load(
        &config.path,
        LoadOptions {
            device,
            kind,
            max_positions: context,
            quantization,
        },
    )
    .map_err(&err)?;
    let per_sequence = KvCache::bytes_per_sequence(
        model.num_layers(),
        model.kv_heads(),
        context,
        model.head_dim(),
        kv_kind,
    );
    let max_batch = match config.kv_cache_mib {
        Some(mib) => {
            let fits = (mib * 1024 * 1024 / per_sequence) as usize;
            if fits == 0 {
                return Err(ServerError::config(
                    format!("models.{name}.kv_cache_mib"),
                    format!(
                        "{mib} MiB holds no sequence of {context} tokens (one needs {:.1} MiB)",
                        per_sequence as f64 / 1048576.0
                    ),
                ));
            }
            fits.min(1024)
        }
        None => config.max_batch_size as usize,
    };
    let mut cache = KvCache::stored_as(
        (
            model.num_layers(),
            max_batch,
            model.kv_heads(),
            context,
            model.head_dim(),
        ),
        device,
        kind,
        kv_kind,
    )
    .map_err(|e| {
        err(format!(
            "allocating the KV cache ({max_batch} x {context} tokens): {e}"
        ))
    })?;
    let load_time = started.elapsed();
    let warm_started = Instant::now();
    warm_up(&model, &mut cache).map_err(|e| err(format!("warm-up: {e}")))?;
    let warmup_time = warm_started.elapsed();
    let kv_cache_bytes = per_sequence * max_batch as u64;
    let info = ModelInfo {
        name: name.to_string(),
        architecture: hf.architecture(),
        context_length: context,
        vocab_size: hf.vocab_size,
        device: model::device_name(device),
        dtype: model::dtype_name(kind).to_string(),
        kv_cache_dtype: model::dtype_name(kv_kind).to_string(),
        quantization: quantization.name().to_string(),
        parameters: model.parameters,
        weight_bytes: model.weight_bytes,
        max_batch_size: max_batch,
        queue_size: config.queue_size as usize,
        default_max_new_tokens: config.default_max_new_tokens as usize,
        kv_cache_bytes,
        kv_bytes_per_token: per_sequence / context as u64,
        load_time,
        warmup_time,
    };
    tracing::info!(
        model = name,
        device = %info.device,
        dtype = %info.dtype,
        kv_cache_dtype = %info.kv_cache_dtype,
        quantization = %info.quantization,
        decode_step = model.decode_path(),
        weight_mib = info.weight_bytes as f64 / 1048576.0,
        parameters = info.parameters,
        context = context,
        max_batch = max_batch,
        kv_cache_mib = kv_cache_bytes as f64 / 1048576.0,
        load_ms = load_time.as_millis() as u64,
        warmup_ms = warmup_time.as_millis() as u64,
        "model loaded"
    );
    Ok((model, cache, Arc::new(tokenizer), info))
}

fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer, String> {
    let path = dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs a short prompt and a decode step so the first request does not pay
/// for lazy initialisation (allocator, kernels).
fn warm_up(model: &Llama, cache: &mut KvCache) -> Result<(), tch::TchError> {
    let prompt = [0u32, 1, 2, 3];
    let _ = model.prefill(&prompt, cache, 0, false)?;
    let _ = model.decode(&[1], &[prompt.len()], cache)?;
    Ok(())
}
