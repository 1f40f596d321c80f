//! The model thread's loop: continuous batching. At every step waiting
//! requests join the batch (their prompts run as one batched prefill and
//! their first tokens are sampled at once), requests whose client is gone
//! leave it, and one decode step runs every running sequence together. The
//! prompt tokens read per step are bounded (`max_prefill_tokens`), so the
//! running streams keep getting tokens however many prompts arrive; a longer
//! prompt is read in chunks, in a slot of its own, while others join.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Instant;

use tch::Tensor;
use tokio::sync::mpsc;

use super::device_sampler::{self, SamplerChoice};
use super::kv_cache::KvCache;
use super::prefix_cache::{Hit, PrefixCache};
use super::request::{Chunk, Event, Finish, FinishReason, Job, TokenLogprob};
use super::sampler::{Sampled, Sampler};
use super::stats::Stats;
use super::text::{Decode, TextStream};
use super::thread_governor::{StepClock, ThreadGovernor};
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
    /// Its rows were offered to the prefix cache already.
    prefix_kept: bool,
}

/// What emitting a sampled token did to its sequence.
enum Emitted {
    /// It goes on: this message is sent with the rest of the step's.
    More(Event),
    /// It finished: this last message is sent once it has left the counts
    /// and its prefix is stored.
    Last(Event),
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
    /// A long prompt being read in chunks; it owns the last slot.
    chunked: Option<Chunked>,
    /// Taken from the queue (each holds a slot), in arrival order, waiting
    /// for their prompt's turn within a step's prefill budget.
    pending: VecDeque<Job>,
    /// Prefixes of finished sequences, for prompts that start with one.
    prefix: PrefixCache,
    /// Decode steps sample on the logits' device (`device_sampler`), not
    /// from a copy of every row on the host.
    sample_on_device: bool,
    /// Intra-op threads under contention (CPU models with more than one).
    governor: Option<ThreadGovernor>,
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
            sample_on_device: false,
            governor: None,
            #[cfg(debug_assertions)]
            fault: super::fault::Fault::from_env(),
        }
    }

    /// Keeps finished sequences' prefixes in `prefix` (off by default).
    pub fn with_prefix_cache(mut self, prefix: PrefixCache) -> Self {
        self.prefix = prefix;
        self
    }

    /// Samples decode steps where `choice` says for the model's device.
    pub fn with_sampler(mut self, choice: SamplerChoice) -> Self {
        self.sample_on_device = choice.on_device(self.model.device);
        self
    }

    /// Lowers the intra-op threads while the model thread is crowded off
    /// its cores (`thread_governor.rs`), on CPU models when `enabled`.
    pub fn with_thread_governor(mut self, enabled: bool) -> Self {
        self.governor = (enabled && self.model.device == tch::Device::Cpu)
            .then(|| ThreadGovernor::new(tch::get_num_threads().max(1) as usize))
            .flatten();
        self
    }

    /// Serves jobs until told to stop, or until every sender is gone and the
    /// batch has drained.
    pub fn run(mut self) {
        while self.step() {}
        tracing::info!(model = %self.name, "model thread stopped");
    }

    /// One turn of the loop: admit, prefill within the step's budget, decode.
    /// Blocks while there is nothing to do; false once the thread should stop.
    fn step(&mut self) -> bool {
        if !self.admit() {
            return false;
        }
        self.drop_cancelled();
        self.start_prompts();
        if !self.running.is_empty() {
            self.decode_step();
        }
        self.publish_counts();
        self.publish_cache_use();
        self.stats.heartbeat.beat();
        true
    }

    /// Takes waiting jobs from the queue while slots are free (each job
    /// taken holds one); blocks when there is nothing to do. Returns false
    /// once told to stop, or once the queue is closed and nothing is left.
    fn admit(&mut self) -> bool {
        if self.idle() {
            self.stats.heartbeat.idle();
            let command = self.inbox.jobs.blocking_recv();
            self.stats.heartbeat.busy();
            match command {
                Some(Command::Generate(job)) => self.pending.push_back(job),
                Some(Command::Stop) => {}
                None => return false,
            }
        }
        if self.inbox.stop.load(SeqCst) {
            return self.stop();
        }
        while self.slots_held() < self.cache.max_batch() {
            match self.inbox.jobs.try_recv() {
                Ok(Command::Generate(job)) => self.pending.push_back(job),
                Ok(Command::Stop) => {}
                Err(_) => break,
            }
        }
        true
    }

    /// Nothing running, being read or taken from the queue.
    fn idle(&self) -> bool {
        self.running.is_empty() && self.chunked.is_none() && self.pending.is_empty()
    }

    /// Slots running sequences, the chunked prompt and taken jobs hold.
    fn slots_held(&self) -> usize {
        self.running.len() + usize::from(self.chunked.is_some()) + self.pending.len()
    }

    /// The slot a prompt read in chunks fills: the last one, so that others
    /// may join the batch (slots `0..B`) meanwhile.
    fn chunk_slot(&self) -> usize {
        self.cache.max_batch() - 1
    }

    /// Ends every request still here, running or queued, with UNAVAILABLE.
    fn stop(&mut self) -> bool {
        let running = std::mem::take(&mut self.running).into_iter().map(|s| s.job);
        let chunked = self.chunked.take().map(|c| c.job);
        let pending = std::mem::take(&mut self.pending);
        let mut ended = 0;
        for job in running.chain(chunked).chain(pending) {
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

    /// Reads prompts within one step's budget of `max_prefill_tokens`
    /// (padded) tokens, so that the running streams get their next token
    /// after at most that much prefill however many prompts arrive. New
    /// prompts go first; while a long prompt is read in chunks they take at
    /// most half the budget, and the chunk takes the rest.
    fn start_prompts(&mut self) {
        let budget = self.max_prefill_tokens;
        let share = if self.chunked.is_some() {
            budget / 2
        } else {
            budget
        };
        let used = self.start_new(share);
        self.prefill_next_chunk(budget.saturating_sub(used));
    }

    /// Starts the taken jobs that fit `share` tokens, in arrival order: new
    /// prompts as one batched prefill (padded to the longest), prompts that
    /// start with a cached prefix by reading only the rest, and the first
    /// prompt longer than the budget as the chunked one when there is none.
    /// Jobs that do not fit wait, in order, for the next steps. Returns the
    /// tokens used.
    fn start_new(&mut self, share: usize) -> usize {
        let mut used = 0;
        let mut group: Vec<Job> = Vec::new();
        let mut longest = 0;
        let mut waiting = VecDeque::new();
        while let Some(job) = self.pending.pop_front() {
            if job.events.is_closed() {
                Stats::add(&self.stats.cancelled, 1);
                continue;
            }
            let reusable = self.prefix.reusable(&job.prompt_ids);
            let rest = job.prompt_ids.len() - reusable;
            let group_cost = group.len() * longest;
            if rest > self.max_prefill_tokens {
                if self.chunked.is_some() {
                    waiting.push_back(job);
                } else {
                    self.start_chunked(job, reusable);
                }
            } else if reusable > 0 {
                if used + group_cost + rest <= share {
                    used += rest;
                    self.start_resumed(job);
                } else {
                    waiting.push_back(job);
                }
            } else {
                let wider = longest.max(rest);
                if used + (group.len() + 1) * wider <= share {
                    longest = wider;
                    group.push(job);
                } else {
                    waiting.push_back(job);
                }
            }
        }
        self.pending = waiting;
        let group_cost = group.len() * longest;
        if !group.is_empty() {
            self.prefill(group);
        }
        used + group_cost
    }

    /// On the model thread, as a request starts: the debug faults that
    /// stall or panic on a prompt.
    fn on_start(&self, job: &Job) {
        #[cfg(debug_assertions)]
        if let Some(fault) = &self.fault {
            fault.on_prompt(|| Decode::decode(self.tokenizer.as_ref(), &job.prompt_ids));
        }
        #[cfg(not(debug_assertions))]
        let _ = job;
    }

    /// Makes `job` the prompt read in chunks, in the chunk slot, after the
    /// first `reusable` tokens copied from the prefix cache.
    fn start_chunked(&mut self, job: Job, reusable: usize) {
        self.on_start(&job);
        let slot = self.chunk_slot();
        let (done, resumed) = if reusable > 0 {
            match self.prefix.resume(&job.prompt_ids, &mut self.cache, slot) {
                Ok(Some(hit)) => (hit.reused, Some(hit)),
                Ok(None) => (0, None),
                Err(e) => return self.fail(job, &e.to_string()),
            }
        } else {
            self.prefix.record_miss();
            (0, None)
        };
        self.chunked = Some(Chunked {
            job,
            done,
            started: Instant::now(),
            resumed,
        });
    }

    /// Starts a job whose prompt begins with a cached prefix: the prefix's
    /// keys and values are copied into the next free slot and only the rest
    /// of the prompt is read.
    fn start_resumed(&mut self, job: Job) {
        self.on_start(&job);
        let started = Instant::now();
        let slot = self.running.len();
        let hit = match self.prefix.resume(&job.prompt_ids, &mut self.cache, slot) {
            Ok(hit) => hit,
            Err(e) => return self.fail(job, &e.to_string()),
        };
        // None only if the entry went in between: then the whole prompt.
        let done = hit.map_or(0, |h| h.reused);
        let row = self
            .model
            .prefill_chunk(&job.prompt_ids[done..], &mut self.cache, slot, done)
            .and_then(|logits| Vec::<f32>::try_from(&logits));
        let mut row = match row {
            Ok(row) => row,
            Err(e) => return self.fail(job, &e.to_string()),
        };
        Stats::add(&self.stats.prefills, 1);
        let sampled = self.begin(job, &mut row, started);
        if let Some(seq) = self.running.last_mut() {
            seq.resumed = hit;
        }
        self.emit_from(slot, vec![sampled]);
    }

    /// One batched prefill of new prompts: the jobs take the next free
    /// slots, in order.
    fn prefill(&mut self, jobs: Vec<Job>) {
        for job in &jobs {
            self.on_start(job);
            self.prefix.record_miss();
        }
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

    /// Reads up to `allowance` more tokens of the long prompt, if there is
    /// one; after the last chunk its rows move to the batch's next slot and
    /// it joins the batch with its first token.
    fn prefill_next_chunk(&mut self, allowance: usize) {
        if allowance == 0 {
            return;
        }
        let Some(mut chunked) = self.chunked.take() else {
            return;
        };
        let slot = self.chunk_slot();
        let prompt = &chunked.job.prompt_ids;
        let end = (chunked.done + allowance.min(self.max_prefill_tokens)).min(prompt.len());
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
        let to = self.running.len();
        if let Err(e) = self.cache.move_slot(slot, to, end) {
            return self.fail(chunked.job, &format!("moving a KV cache slot: {e}"));
        }
        let sampled = self.begin(chunked.job, &mut row, chunked.started);
        if let Some(seq) = self.running.last_mut() {
            seq.resumed = chunked.resumed;
        }
        self.emit_from(to, vec![sampled]);
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
            prefix_kept: false,
            job,
        });
        sampled
    }

    /// One decode step over the whole batch.
    fn decode_step(&mut self) {
        let clock = StepClock::start();
        let tokens: Vec<u32> = self.running.iter().map(|s| s.next).collect();
        let positions: Vec<usize> = self.running.iter().map(|s| s.cached).collect();
        let batch = tokens.len();
        let greedy = self
            .running
            .iter()
            .all(|s| s.sampler.params().is_plain_argmax());
        let sampled = if greedy {
            self.model
                .decode_argmax(&tokens, &positions, &mut self.cache)
                .map(|ids| ids.into_iter().map(Sampled::token).collect())
        } else {
            self.model
                .decode(&tokens, &positions, &mut self.cache)
                .and_then(|logits| self.sample_batch(&logits))
        };
        let sampled = match sampled {
            Ok(s) => s,
            Err(e) => {
                // The chunked prompt's slot is apart: it goes on.
                let message = e.to_string();
                for seq in std::mem::take(&mut self.running) {
                    self.fail(seq.job, &message);
                }
                return;
            }
        };
        self.stats.record_step(batch);
        if let Some(governor) = &mut self.governor {
            governor.after_step(clock, &self.name);
        }
        for seq in &mut self.running {
            seq.cached += 1;
        }
        self.emit_from(0, sampled);
    }

    /// Emits `sampled[i]` for the sequence in slot `first + i` and removes
    /// the sequences that finished. A finished sequence's prefix is stored
    /// and the decoding count published before its last message goes out:
    /// a client that saw its stream end reads stats that include both.
    fn emit_from(&mut self, first: usize, sampled: Vec<Sampled>) {
        // Taken out while emitting so that `emit` may borrow the scheduler.
        let mut running = std::mem::take(&mut self.running);
        let mut done = Vec::new();
        let mut more = Vec::with_capacity(sampled.len());
        let mut last = Vec::new();
        for (i, (seq, s)) in running[first..].iter_mut().zip(sampled).enumerate() {
            match self.emit(seq, s) {
                Emitted::More(event) => more.push((first + i, event)),
                Emitted::Last(event) => {
                    Self::keep_prefix_of(&mut self.prefix, &self.cache, first + i, seq);
                    last.push((seq.job.events.clone(), event));
                    seq.finished = true;
                    done.push(first + i);
                }
            }
        }
        // The step's messages go out together, once every row's text is
        // decoded: the runtime's threads then wake once for the whole batch
        // (and the connection writes it at once) rather than once a row,
        // each wake taking the core from the model thread in mid-emission.
        for (i, event) in more {
            let seq = &mut running[i];
            if seq.job.events.send(event).is_err() {
                // Its client has gone: it leaves the batch.
                self.log_cancel(&seq.job, seq.generated);
                seq.finished = true;
                done.push(i);
            }
        }
        done.sort_unstable();
        self.running = running;
        if !done.is_empty() {
            self.publish_running(done.len());
        }
        for (events, event) in last {
            // A client gone meanwhile needs nothing more.
            let _ = events.send(event);
        }
        for i in done.into_iter().rev() {
            if !self.remove(i) {
                break;
            }
        }
    }

    /// Publishes how many sequences are decoding, less `leaving` that
    /// finished this step.
    fn publish_running(&self, leaving: usize) {
        let decoding = self.running.len().saturating_sub(leaving);
        self.stats.running.store(decoding as u32, Relaxed);
    }

    /// Publishes the decoding sequences and the taken jobs that are not
    /// decoding yet (being read in chunks or waiting for their turn).
    fn publish_counts(&self) {
        self.publish_running(0);
        let prefilling = self.pending.len() + usize::from(self.chunked.is_some());
        self.stats.prefilling.store(prefilling as u32, Relaxed);
    }

    /// Samples one token per row of `logits` (`[B, vocab]`, float32), on
    /// the device when so configured, else from a copy of every row on the
    /// host. (Plain greedy batches take `decode_argmax` instead.)
    fn sample_batch(&mut self, logits: &Tensor) -> Result<Vec<Sampled>, tch::TchError> {
        if self.sample_on_device {
            let uniforms: Vec<f32> = self
                .running
                .iter_mut()
                .map(|s| s.sampler.next_uniform())
                .collect();
            let rows: Vec<device_sampler::Row<'_>> = self
                .running
                .iter()
                .zip(uniforms)
                .map(|(s, uniform)| device_sampler::Row {
                    params: s.sampler.params(),
                    history: &s.history,
                    uniform,
                })
                .collect();
            return device_sampler::sample(logits, &rows);
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

    /// Records a sampled token and makes its message: the last one when
    /// the sequence is finished, else one for `emit_from` to send.
    fn emit(&mut self, seq: &mut Sequence, sampled: Sampled) -> Emitted {
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
        if finish.is_some() {
            return Emitted::Last(Event::Step { chunk, finish });
        }
        Emitted::More(Event::Step { chunk, finish })
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
    /// slot. Returns false when the move failed: the cache no longer matches
    /// the slots, so every unfinished request of the batch got INTERNAL and
    /// the batch is empty (the engine serves on; the chunked prompt, in its
    /// own slot, goes on); callers stop using indices into it.
    fn remove(&mut self, i: usize) -> bool {
        self.keep_prefix(i);
        let last = self.running.len() - 1;
        self.running.swap_remove(i);
        if i == last {
            return true;
        }
        let Err(e) = self.move_slot(last, i) else {
            return true;
        };
        let message = format!("moving a KV cache slot: {e}");
        for seq in std::mem::take(&mut self.running) {
            // Those about to leave had their last message already.
            if !seq.finished {
                self.fail(seq.job, &message);
            }
        }
        self.publish_running(0);
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
        let seq = &mut self.running[i];
        Self::keep_prefix_of(&mut self.prefix, &self.cache, i, seq);
    }

    /// Offers `seq`'s rows, in slot `slot` of `cache`, to `prefix` once.
    fn keep_prefix_of(prefix: &mut PrefixCache, cache: &KvCache, slot: usize, seq: &mut Sequence) {
        if std::mem::replace(&mut seq.prefix_kept, true) {
            return;
        }
        let tokens = &seq.history[..seq.cached];
        prefix.store(cache, slot, tokens, seq.job.prompt_ids.len(), seq.resumed);
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

#[cfg(test)]
mod tests;
