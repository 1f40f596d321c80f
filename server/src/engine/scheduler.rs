//! The model thread's loop: continuous batching. At every step waiting
//! requests join the batch (their prompts run as batched prefills and their
//! first tokens are sampled at once), requests whose client is gone leave it,
//! and one decode step runs every running sequence together. A prompt longer
//! than the prefill budget runs in chunks, one chunk a step, so the running
//! streams keep getting tokens while it is read.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Instant;

use tch::{Kind, Tensor};
use tokio::sync::mpsc;

use super::kv_cache::KvCache;
use super::prefix_cache::{Hit, PrefixCache};
use super::request::{Chunk, Event, Finish, FinishReason, Job, TokenLogprob};
use super::sampler::{Sampled, Sampler};
use super::stats::Stats;
use super::text::{Decode, TextStream};
use super::Command;
use crate::error::ServerError;
use crate::model::Llama;

/// One running sequence; it owns cache slot `i` where `i` is its index in
/// `Scheduler::running`.
struct Sequence {
    job: Job,
    sampler: Sampler,
    /// Prompt and generated tokens (for the repetition penalty).
    history: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    cached: usize,
    /// The last sampled token, fed at the next decode step.
    next: u32,
    generated: usize,
    text: TextStream,
    started: Instant,
    first_token: Option<Instant>,
    /// Where the prompt's cached prefix came from, if it had one.
    resumed: Option<Hit>,
    /// Its last message went out; it leaves the batch at the end of the step.
    finished: bool,
}

/// What the model thread is told: jobs in queue order, and a stop flag
/// (set by `Engine::stop`) that overtakes the queue.
pub(super) struct Inbox {
    pub jobs: mpsc::Receiver<Command>,
    pub stop: Arc<AtomicBool>,
}

pub(super) struct Scheduler {
    name: String,
    model: Llama,
    cache: KvCache,
    tokenizer: Arc<tokenizers::Tokenizer>,
    inbox: Inbox,
    stats: Arc<Stats>,
    /// Padded prompt tokens one batched prefill (or one chunk) may hold.
    max_prefill_tokens: usize,
    running: Vec<Sequence>,
    /// A long prompt being read in chunks; it owns slot `running.len()`.
    chunked: Option<Chunked>,
    /// Taken from the queue, waiting for the chunked prefill to finish.
    pending: VecDeque<Job>,
    /// Prefixes of finished sequences, for prompts that start with one.
    prefix: PrefixCache,
    #[cfg(debug_assertions)]
    fault: Option<super::fault::Fault>,
}

/// A prompt read in chunks of `max_prefill_tokens`.
struct Chunked {
    job: Job,
    /// Prompt tokens in the cache so far.
    done: usize,
    started: Instant,
    /// Where the prompt's first tokens came from, if cached.
    resumed: Option<Hit>,
}

impl Scheduler {
    pub fn new(
        name: String,
        model: Llama,
        cache: KvCache,
        tokenizer: Arc<tokenizers::Tokenizer>,
        inbox: Inbox,
        stats: Arc<Stats>,
        max_prefill_tokens: usize,
    ) -> Self {
        let prefix = PrefixCache::new(0, stats.clone());
        Self {
            name,
            model,
            cache,
            tokenizer,
            inbox,
            stats,
            max_prefill_tokens,
            running: Vec::new(),
            chunked: None,
            pending: VecDeque::new(),
            prefix,
            #[cfg(debug_assertions)]
            fault: super::fault::Fault::from_env(),
        }
    }

    /// Keeps finished sequences' prefixes in `prefix` (off by default).
    pub fn with_prefix_cache(mut self, prefix: PrefixCache) -> Self {
        self.prefix = prefix;
        self
    }

    /// Serves jobs until told to stop, or until every sender is gone and the
    /// batch has drained.
    pub fn run(mut self) {
        while self.step() {}
        tracing::info!(model = %self.name, "model thread stopped");
    }

    /// One turn of the loop: admit, prefill, decode. Blocks while there is
    /// nothing to do; false once the thread should stop.
    fn step(&mut self) -> bool {
        if !self.admit() {
            return false;
        }
        self.drop_cancelled();
        self.prefill_next_chunk();
        if !self.running.is_empty() {
            self.decode_step();
        }
        self.publish_admitted(0);
        self.publish_cache_use();
        self.stats.heartbeat.beat();
        true
    }

    /// Moves waiting jobs into free slots; blocks when nothing is running.
    /// Returns false once told to stop, or once the queue is closed and
    /// nothing is left to do.
    fn admit(&mut self) -> bool {
        let mut joining = Vec::new();
        if self.idle() {
            self.stats.heartbeat.idle();
            let command = self.inbox.jobs.blocking_recv();
            self.stats.heartbeat.busy();
            match command {
                Some(Command::Generate(job)) => joining.push(job),
                Some(Command::Stop) => {}
                None => return false,
            }
        }
        if self.inbox.stop.load(SeqCst) {
            return self.stop(joining);
        }
        if self.chunked.is_some() {
            // Slots are given out in order: the next wait for the long prompt.
            self.pending.extend(joining);
            return true;
        }
        while self.running.len() + joining.len() < self.cache.max_batch() {
            if let Some(job) = self.pending.pop_front() {
                joining.push(job);
                continue;
            }
            match self.inbox.jobs.try_recv() {
                Ok(Command::Generate(job)) => joining.push(job),
                Ok(Command::Stop) => {}
                Err(_) => break,
            }
        }
        self.start(joining);
        true
    }

    /// Nothing running, being read or taken from the queue.
    fn idle(&self) -> bool {
        self.running.is_empty() && self.chunked.is_none() && self.pending.is_empty()
    }

    /// Ends every request still here, running or queued, with UNAVAILABLE.
    fn stop(&mut self, joining: Vec<Job>) -> bool {
        let running = std::mem::take(&mut self.running).into_iter().map(|s| s.job);
        let chunked = self.chunked.take().map(|c| c.job);
        let pending = std::mem::take(&mut self.pending);
        let mut ended = 0;
        for job in running.chain(chunked).chain(pending).chain(joining) {
            let _ = job.events.send(Event::Failed(ServerError::ShuttingDown));
            ended += 1;
        }
        while let Ok(command) = self.inbox.jobs.try_recv() {
            if let Command::Generate(job) = command {
                let _ = job.events.send(Event::Failed(ServerError::ShuttingDown));
                ended += 1;
            }
        }
        tracing::info!(model = %self.name, requests_ended = ended, "model thread stopping");
        false
    }

    /// Runs the prompts of joining jobs, shortest first, in batches of at
    /// most `max_prefill_tokens` padded tokens, and emits their first tokens.
    /// The first prompt longer than that starts a chunked prefill; the jobs
    /// after it wait.
    fn start(&mut self, mut jobs: Vec<Job>) {
        jobs.retain(|job| {
            let gone = job.events.is_closed();
            if gone {
                Stats::add(&self.stats.cancelled, 1);
            }
            !gone
        });
        #[cfg(debug_assertions)]
        if let Some(fault) = &self.fault {
            for job in &jobs {
                fault.on_prompt(|| Decode::decode(self.tokenizer.as_ref(), &job.prompt_ids));
            }
        }
        let mut jobs = self.resume_cached(jobs);
        if self.chunked.is_some() {
            self.pending.extend(jobs);
            return;
        }
        jobs.sort_by_key(|job| job.prompt_ids.len());
        while !jobs.is_empty() {
            if jobs[0].prompt_ids.len() > self.max_prefill_tokens {
                let job = jobs.remove(0);
                self.chunked = Some(Chunked {
                    job,
                    done: 0,
                    started: Instant::now(),
                    resumed: None,
                });
                self.pending.extend(jobs);
                return;
            }
            let lengths = jobs.iter().map(|job| job.prompt_ids.len());
            let n = prefill_group_len(lengths, self.max_prefill_tokens);
            let group: Vec<Job> = jobs.drain(..n).collect();
            self.prefill(group);
            self.stats.heartbeat.beat();
        }
    }

    /// Starts the jobs whose prompt begins with a cached prefix: the
    /// prefix's keys and values are copied into the next free slot and only
    /// the rest of the prompt is read, as a chunked prefill from there (in
    /// one go when it fits `max_prefill_tokens`). Returns the other jobs; a
    /// rest longer than that leaves its job chunked, and the jobs after it
    /// are returned unread.
    fn resume_cached(&mut self, jobs: Vec<Job>) -> Vec<Job> {
        let mut others = Vec::new();
        for job in jobs {
            if self.chunked.is_some() {
                others.push(job);
                continue;
            }
            let slot = self.running.len();
            let hit = match self.prefix.resume(&job.prompt_ids, &mut self.cache, slot) {
                Ok(Some(hit)) => hit,
                Ok(None) => {
                    others.push(job);
                    continue;
                }
                Err(e) => {
                    self.fail(job, &e.to_string());
                    continue;
                }
            };
            self.chunked = Some(Chunked {
                job,
                done: hit.reused,
                started: Instant::now(),
                resumed: Some(hit),
            });
            self.prefill_next_chunk();
        }
        others
    }

    /// One batched prefill: the jobs take the next free slots, in order.
    fn prefill(&mut self, jobs: Vec<Job>) {
        let started = Instant::now();
        let first = self.running.len();
        let prompts: Vec<&[u32]> = jobs.iter().map(|j| j.prompt_ids.as_slice()).collect();
        let rows = self
            .model
            .prefill_batch(&prompts, &mut self.cache, first)
            .and_then(|logits| Vec::<f32>::try_from(&logits.f_flatten(0, -1)?));
        Stats::add(&self.stats.prefills, jobs.len() as u64);
        let mut rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                let message = e.to_string();
                for job in jobs {
                    self.fail(job, &message);
                }
                return;
            }
        };
        let vocab = rows.len() / jobs.len();
        let sampled = jobs
            .into_iter()
            .zip(rows.chunks_mut(vocab))
            .map(|(job, row)| self.begin(job, row, started))
            .collect();
        self.emit_from(first, sampled);
    }

    /// Reads the next chunk of the long prompt, if there is one; after the
    /// last chunk the sequence joins the batch with its first token.
    fn prefill_next_chunk(&mut self) {
        let Some(mut chunked) = self.chunked.take() else {
            return;
        };
        let slot = self.running.len();
        let prompt = &chunked.job.prompt_ids;
        let end = (chunked.done + self.max_prefill_tokens).min(prompt.len());
        let logits = self.model.prefill_chunk(
            &prompt[chunked.done..end],
            &mut self.cache,
            slot,
            chunked.done,
        );
        let logits = match logits {
            Ok(logits) => logits,
            Err(e) => return self.fail(chunked.job, &e.to_string()),
        };
        chunked.done = end;
        if end < prompt.len() {
            self.chunked = Some(chunked);
            return;
        }
        Stats::add(&self.stats.prefills, 1);
        let mut row = match Vec::<f32>::try_from(&logits) {
            Ok(row) => row,
            Err(e) => return self.fail(chunked.job, &e.to_string()),
        };
        let sampled = self.begin(chunked.job, &mut row, chunked.started);
        if let Some(seq) = self.running.last_mut() {
            seq.resumed = chunked.resumed;
        }
        self.emit_from(slot, vec![sampled]);
    }

    /// Adds a job whose prompt is in the cache (at slot `running.len()`) to
    /// the batch, and samples its first token from `row`.
    fn begin(&mut self, job: Job, row: &mut [f32], started: Instant) -> Sampled {
        let mut sampler = Sampler::new(job.params.clone());
        let sampled = sampler.sample(row, &job.prompt_ids);
        self.running.push(Sequence {
            sampler,
            history: job.prompt_ids.clone(),
            cached: job.prompt_ids.len(),
            next: 0,
            generated: 0,
            text: TextStream::new(job.stops.clone(), &job.prompt_ids, self.tokenizer.as_ref()),
            started,
            first_token: None,
            resumed: None,
            finished: false,
            job,
        });
        sampled
    }

    /// One decode step over the whole batch.
    fn decode_step(&mut self) {
        let tokens: Vec<u32> = self.running.iter().map(|s| s.next).collect();
        let positions: Vec<usize> = self.running.iter().map(|s| s.cached).collect();
        let batch = tokens.len();
        let sampled = self
            .model
            .decode(&tokens, &positions, &mut self.cache)
            .and_then(|logits| self.sample_batch(&logits));
        let sampled = match sampled {
            Ok(s) => s,
            Err(e) => {
                // The chunked prompt's slot follows the batch: it goes too.
                let message = e.to_string();
                for seq in std::mem::take(&mut self.running) {
                    self.fail(seq.job, &message);
                }
                if let Some(chunked) = self.chunked.take() {
                    self.fail(chunked.job, &message);
                }
                return;
            }
        };
        self.stats.record_step(batch);
        for seq in &mut self.running {
            seq.cached += 1;
        }
        self.emit_from(0, sampled);
    }

    /// Emits `sampled[i]` for the sequence in slot `first + i` and removes
    /// the sequences that finished.
    fn emit_from(&mut self, first: usize, sampled: Vec<Sampled>) {
        // Taken out while emitting so that `emit` may borrow the scheduler.
        let mut running = std::mem::take(&mut self.running);
        let mut done = Vec::new();
        for (i, (seq, s)) in running[first..].iter_mut().zip(sampled).enumerate() {
            if self.emit(seq, s) {
                seq.finished = true;
                done.push(first + i);
            }
        }
        self.running = running;
        if !done.is_empty() {
            // Published before the removals (which may copy prefixes into
            // the prefix cache): a client that saw its stream end reads a
            // count without it.
            self.publish_admitted(done.len());
        }
        for i in done.into_iter().rev() {
            if !self.remove(i) {
                break;
            }
        }
    }

    /// Publishes how many requests are admitted: decoding, being read, or
    /// next in line, less `leaving` that finished this step.
    fn publish_admitted(&self, leaving: usize) {
        let admitted = self.running.len() + self.pending.len() + self.chunked.iter().count();
        self.stats
            .running
            .store(admitted.saturating_sub(leaving) as u32, Relaxed);
    }

    /// Samples one token per row of `logits` (`[B, vocab]`, float32). Plain
    /// greedy batches take an argmax on the device and copy only the ids.
    fn sample_batch(&mut self, logits: &Tensor) -> Result<Vec<Sampled>, tch::TchError> {
        if self
            .running
            .iter()
            .all(|s| s.sampler.params().is_plain_argmax())
        {
            let ids = Vec::<i64>::try_from(&logits.f_argmax(-1, false)?.f_to_kind(Kind::Int64)?)?;
            return Ok(ids
                .into_iter()
                .map(|t| Sampled {
                    token: t as u32,
                    logprob: None,
                    top: Vec::new(),
                })
                .collect());
        }
        let vocab = logits.size()[1] as usize;
        let mut all = Vec::<f32>::try_from(&logits.f_flatten(0, -1)?)?;
        Ok(self
            .running
            .iter_mut()
            .zip(all.chunks_mut(vocab))
            .map(|(seq, row)| seq.sampler.sample(row, &seq.history))
            .collect())
    }

    /// Records a sampled token and sends it. Returns true when the sequence
    /// is finished (or its client is gone).
    fn emit(&mut self, seq: &mut Sequence, sampled: Sampled) -> bool {
        let token = sampled.token;
        seq.generated += 1;
        seq.history.push(token);
        seq.next = token;
        Stats::add(&self.stats.tokens_generated, 1);
        let now = Instant::now();
        let first = *seq.first_token.get_or_insert(now);

        let tokenizer: &dyn Decode = self.tokenizer.as_ref();
        let mut chunk = Chunk {
            token_ids: vec![token],
            ..Default::default()
        };
        if let Some(logprob) = sampled.logprob {
            // Decoded after the text so far, as the chosen token is.
            let ids: Vec<u32> = sampled.top.iter().map(|&(id, _)| id).collect();
            let texts = seq.text.next_texts(&ids, tokenizer);
            let top = sampled
                .top
                .iter()
                .zip(texts)
                .map(|(&(id, lp), text)| (id, text, lp))
                .collect();
            chunk.logprobs.push(TokenLogprob {
                token_id: token,
                logprob,
                top,
            });
        }
        let eos = !seq.job.ignore_eos && self.model.eos_token_ids.contains(&token);
        let mut reason = None;
        let mut stop_sequence = None;
        if eos {
            chunk.text = seq.text.finish(tokenizer);
            reason = Some(FinishReason::EndOfSequence);
        } else {
            let delta = seq.text.push(token, tokenizer);
            chunk.text = delta.text;
            if delta.stop.is_some() {
                stop_sequence = delta.stop;
                reason = Some(FinishReason::StopSequence);
            } else if seq.generated >= seq.job.max_new_tokens {
                chunk.text.push_str(&seq.text.finish(tokenizer));
                reason = Some(FinishReason::Length);
            }
        }
        let finish = reason.map(|reason| {
            let arrived = seq.job.arrived;
            let finish = Finish {
                reason,
                stop_sequence,
                prompt_tokens: seq.job.prompt_ids.len(),
                completion_tokens: seq.generated,
                queue: seq.started.saturating_duration_since(arrived),
                time_to_first_token: first.saturating_duration_since(arrived),
                total: now.saturating_duration_since(arrived),
            };
            self.log_finish(&seq.job, &finish);
            Stats::add(&self.stats.finished, 1);
            finish
        });
        let done = finish.is_some();
        if seq.job.events.send(Event::Step { chunk, finish }).is_err() && !done {
            self.log_cancel(&seq.job, seq.generated);
            return true;
        }
        done
    }

    /// Removes sequences whose client has gone away, freeing their slots.
    fn drop_cancelled(&mut self) {
        for i in (0..self.running.len()).rev() {
            if self.running[i].job.events.is_closed() {
                let generated = self.running[i].generated;
                self.log_cancel(&self.running[i].job, generated);
                if !self.remove(i) {
                    break;
                }
            }
        }
        if self
            .chunked
            .as_ref()
            .is_some_and(|c| c.job.events.is_closed())
        {
            if let Some(chunked) = self.chunked.take() {
                self.log_cancel(&chunked.job, 0);
            }
        }
    }

    /// Takes sequence `i` out of the batch; the last sequence moves into its
    /// slot, and a chunked prompt after the batch moves down one. Returns
    /// false when a move failed: the cache no longer matches the slots, so
    /// every request in the batch got INTERNAL and the batch is empty (the
    /// engine serves on); callers stop using indices into it.
    fn remove(&mut self, i: usize) -> bool {
        self.keep_prefix(i);
        let last = self.running.len() - 1;
        self.running.swap_remove(i);
        let mut moved = Ok(());
        if i != last {
            moved = self.move_slot(last, i);
        }
        if let (Ok(()), Some(chunked)) = (&moved, &self.chunked) {
            moved = self.cache.move_slot(last + 1, last, chunked.done);
        }
        let Err(e) = moved else {
            return true;
        };
        let message = format!("moving a KV cache slot: {e}");
        for seq in std::mem::take(&mut self.running) {
            // Those about to leave had their last message already.
            if !seq.finished {
                self.fail(seq.job, &message);
            }
        }
        if let Some(chunked) = self.chunked.take() {
            self.fail(chunked.job, &message);
        }
        self.publish_admitted(0);
        false
    }

    /// Moves the rows of the sequence now at `running[to]` from slot `from`.
    fn move_slot(&mut self, from: usize, to: usize) -> Result<(), tch::TchError> {
        #[cfg(debug_assertions)]
        if let Some(fault) = &self.fault {
            let prompt = &self.running[to].job.prompt_ids;
            fault.on_slot_move(|| Decode::decode(self.tokenizer.as_ref(), prompt))?;
        }
        self.cache.move_slot(from, to, self.running[to].cached)
    }

    /// Offers the rows of the sequence in slot `i` (every token but the
    /// last sampled one, which has no keys and values yet) to the prefix cache.
    fn keep_prefix(&mut self, i: usize) {
        let seq = &self.running[i];
        let tokens = &seq.history[..seq.cached];
        let prompt = seq.job.prompt_ids.len();
        self.prefix
            .store(&self.cache, i, tokens, prompt, seq.resumed);
    }

    /// Publishes how much of the KV cache is in use, for the metrics.
    fn publish_cache_use(&self) {
        let chunked = self.chunked.as_ref();
        let slots = self.running.len() + chunked.iter().count();
        let tokens: usize =
            self.running.iter().map(|s| s.cached).sum::<usize>() + chunked.map_or(0, |c| c.done);
        self.stats.kv_slots_used.store(slots as u32, Relaxed);
        self.stats.kv_tokens.store(tokens as u64, Relaxed);
    }

    fn fail(&self, job: Job, message: &str) {
        tracing::error!(model = %self.name, request_id = %job.request_id, error = %message, "request failed");
        let err = ServerError::Compute {
            model: self.name.clone(),
            message: message.to_string(),
        };
        let _ = job.events.send(Event::Failed(err));
    }

    /// The request's one info line is the API's, written where its span and
    /// metrics end; this one is for debugging the engine.
    fn log_finish(&self, job: &Job, f: &Finish) {
        tracing::debug!(
            request_id = %job.request_id,
            model = %self.name,
            prompt_tokens = f.prompt_tokens,
            completion_tokens = f.completion_tokens,
            queue_ms = ms(f.queue),
            ttft_ms = ms(f.time_to_first_token),
            total_ms = ms(f.total),
            finish_reason = f.reason.as_str(),
            "request finished"
        );
    }

    fn log_cancel(&self, job: &Job, generated: usize) {
        Stats::add(&self.stats.cancelled, 1);
        tracing::debug!(request_id = %job.request_id, model = %self.name, completion_tokens = generated, "request cancelled by the client");
    }
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// How many prompts of the given lengths (ascending) go into the next
/// prefill: as many as fit `budget` tokens once padded to the longest, and
/// at least one.
fn prefill_group_len(lengths: impl Iterator<Item = usize>, budget: usize) -> usize {
    let mut n = 0;
    for len in lengths {
        if n > 0 && (n + 1) * len > budget {
            break;
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::Event;
    use crate::model::LoadOptions;
    use tokio::sync::mpsc::UnboundedReceiver;

    const CONTEXT: usize = 256;

    /// A scheduler over the bundled model on the CPU, and its queue.
    fn scheduler(max_batch: usize, max_prefill_tokens: usize) -> (Scheduler, mpsc::Sender<Command>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/torchwire-tiny");
        let model = Llama::load(
            &dir,
            LoadOptions {
                device: tch::Device::Cpu,
                kind: Kind::Float,
                max_positions: CONTEXT,
            },
        )
        .unwrap();
        let cache = KvCache::new(
            model.num_layers(),
            max_batch,
            model.kv_heads(),
            CONTEXT,
            model.head_dim(),
            tch::Device::Cpu,
            Kind::Float,
        )
        .unwrap();
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let (tx, rx) = mpsc::channel(64);
        let inbox = Inbox {
            jobs: rx,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let stats = Arc::new(Stats::default());
        let s = Scheduler::new(
            "test".into(),
            model,
            cache,
            Arc::new(tokenizer),
            inbox,
            stats,
            max_prefill_tokens,
        );
        (s, tx)
    }

    /// A greedy job for `prompt` (the bundled tokenizer's ids) that
    /// generates exactly `tokens` tokens.
    fn job(s: &Scheduler, prompt: &str, tokens: usize) -> (Job, UnboundedReceiver<Event>) {
        let ids = s.tokenizer.encode(prompt, false).unwrap().get_ids().to_vec();
        let (events, rx) = mpsc::unbounded_channel();
        let job = Job {
            request_id: prompt.chars().take(16).collect(),
            prompt_ids: ids,
            params: Default::default(),
            max_new_tokens: tokens,
            stops: Vec::new(),
            ignore_eos: true,
            arrived: Instant::now(),
            events,
        };
        (job, rx)
    }

    /// Steps until nothing is left to do (a step with nothing to do would
    /// block on the queue).
    fn run_until_idle(s: &mut Scheduler, queue: &mpsc::Sender<Command>) {
        for _ in 0..1000 {
            if s.idle() && queue.capacity() == queue.max_capacity() {
                return;
            }
            assert!(s.step());
        }
        panic!("still busy after 1000 steps");
    }

    fn submit(queue: &mpsc::Sender<Command>, job: Job) {
        queue.try_send(Command::Generate(job)).unwrap();
    }

    /// What a request got so far: tokens, and whether it finished or failed.
    #[derive(Debug, Default, PartialEq)]
    struct Outcome {
        tokens: usize,
        finished: bool,
        failed: Option<tonic::Code>,
    }

    fn drain(rx: &mut UnboundedReceiver<Event>, into: &mut Outcome) {
        while let Ok(event) = rx.try_recv() {
            match event {
                Event::Step { chunk, finish } => {
                    into.tokens += chunk.token_ids.len();
                    into.finished |= finish.is_some();
                }
                Event::Failed(e) => into.failed = Some(tonic::Status::from(e).code()),
            }
        }
    }

    fn outcome(rx: &mut UnboundedReceiver<Event>) -> Outcome {
        let mut o = Outcome::default();
        drain(rx, &mut o);
        o
    }

    #[test]
    fn a_failed_slot_move_fails_the_batch_and_the_engine_serves_on() {
        let (mut s, queue) = scheduler(4, 512);
        s.fault = Some(crate::engine::fault::Fault::FailSlotMove("MOVE".into()));
        // One prefill puts them in slots 0..4 in this order; the first two
        // finish at the same (second) step, so slot 3 (MOVE) moves into
        // slot 1 and fails while slot 0 still has to leave.
        let prompts = ["one two three", "four five six", "seven eight nine", "ten MOVE ten"];
        let tokens = [3, 3, 8, 8];
        let mut rxs = Vec::new();
        for (prompt, n) in prompts.iter().zip(tokens) {
            let (j, rx) = job(&s, prompt, n);
            submit(&queue, j);
            rxs.push(rx);
        }
        assert!(s.step());
        let order: Vec<&str> = s.running.iter().map(|q| q.job.request_id.as_str()).collect();
        assert_eq!(order, prompts, "the slots are in submission order");
        run_until_idle(&mut s, &queue);
        let outcomes: Vec<Outcome> = rxs.iter_mut().map(outcome).collect();
        let ok = |tokens| Outcome {
            tokens,
            finished: true,
            failed: None,
        };
        assert_eq!(outcomes[0], ok(3));
        assert_eq!(outcomes[1], ok(3));
        for o in &outcomes[2..] {
            assert_eq!(o.failed, Some(tonic::Code::Internal), "{outcomes:?}");
            assert!(!o.finished);
        }
        assert!(s.running.is_empty());
        assert_eq!(s.stats.running.load(Relaxed), 0);

        // The next request is served as usual.
        let (j, mut rx) = job(&s, "eleven twelve", 3);
        submit(&queue, j);
        run_until_idle(&mut s, &queue);
        assert_eq!(outcome(&mut rx), ok(3));
    }

    #[test]
    fn prefill_groups_fill_the_padded_budget() {
        let group = |lens: &[usize], budget| prefill_group_len(lens.iter().copied(), budget);
        assert_eq!(group(&[32; 16], 4096), 16);
        assert_eq!(group(&[32; 16], 100), 3);
        // Padded to the longest: 3 x 40 > 100 stops at two.
        assert_eq!(group(&[10, 20, 40, 40], 100), 2);
        // A prompt longer than the budget still runs, alone.
        assert_eq!(group(&[5000, 6000], 4096), 1);
        assert_eq!(group(&[7], 1), 1);
    }
}
