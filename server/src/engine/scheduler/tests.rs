use super::*;
use crate::engine::request::Event;
use crate::model::LoadOptions;
use tch::Kind;
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
            quantization: crate::model::Quantization::None,
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
    let ids = s
        .tokenizer
        .encode(prompt, false)
        .unwrap()
        .get_ids()
        .to_vec();
    greedy_job(prompt.chars().take(16).collect(), ids, tokens)
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

/// A greedy job for exactly these prompt ids.
fn job_ids(ids: Vec<u32>, tokens: usize) -> (Job, UnboundedReceiver<Event>) {
    greedy_job(format!("{} tokens", ids.len()), ids, tokens)
}

/// A greedy job named `request_id` that generates exactly `tokens` tokens
/// after `ids`, EOS ignored.
fn greedy_job(request_id: String, ids: Vec<u32>, tokens: usize) -> (Job, UnboundedReceiver<Event>) {
    let (events, rx) = mpsc::unbounded_channel();
    let job = Job {
        request_id,
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

/// `n` prompt ids of ordinary text (different texts for different `seed`s).
fn prompt(s: &Scheduler, n: usize, seed: usize) -> Vec<u32> {
    let words = [
        "river", "stone", "light", "garden", "window", "summer", "paper",
    ];
    let text: Vec<&str> = (0..n)
        .map(|i| words[(i * 3 + seed) % words.len()])
        .collect();
    let ids = s.tokenizer.encode(text.join(" "), false).unwrap();
    assert!(ids.len() >= n);
    ids.get_ids()[..n].to_vec()
}

/// Every token id a request got so far (greedy outputs to compare).
fn token_ids(rx: &mut UnboundedReceiver<Event>) -> Vec<u32> {
    let mut ids = Vec::new();
    while let Ok(event) = rx.try_recv() {
        if let Event::Step { chunk, .. } = event {
            ids.extend(chunk.token_ids);
        }
    }
    ids
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
    let prompts = [
        "one two three",
        "four five six",
        "seven eight nine",
        "ten MOVE ten",
    ];
    let tokens = [3, 3, 8, 8];
    let mut rxs = Vec::new();
    for (prompt, n) in prompts.iter().zip(tokens) {
        let (j, rx) = job(&s, prompt, n);
        submit(&queue, j);
        rxs.push(rx);
    }
    assert!(s.step());
    let order: Vec<&str> = s
        .running
        .iter()
        .map(|q| q.job.request_id.as_str())
        .collect();
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
fn many_prompts_arriving_together_are_read_a_budget_per_step() {
    let (mut s, queue) = scheduler(8, 64);
    let (running, mut running_rx) = job_ids(prompt(&s, 5, 0), 40);
    submit(&queue, running);
    assert!(s.step());
    assert_eq!(
        outcome(&mut running_rx).tokens,
        2,
        "first token and one step"
    );

    // Five prompts of 50 tokens: one fits a 64-token step, two do not.
    let mut rxs: Vec<_> = (0..5)
        .map(|i| {
            let (j, rx) = job_ids(prompt(&s, 50, i + 1), 20);
            submit(&queue, j);
            rx
        })
        .collect();
    let mut started = [false; 5];
    for step in 1..=5 {
        let prefills = Stats::get(&s.stats.prefills);
        assert!(s.step());
        // One prompt read per step, and the running stream's next token.
        assert_eq!(Stats::get(&s.stats.prefills), prefills + 1, "step {step}");
        assert_eq!(outcome(&mut running_rx).tokens, 1, "step {step}");
        for (i, rx) in rxs.iter_mut().enumerate() {
            started[i] |= outcome(rx).tokens > 0;
        }
        assert_eq!(started.iter().filter(|&&s| s).count(), step);
        assert_eq!(s.stats.prefilling.load(Relaxed) as usize, 5 - step);
        assert_eq!(s.stats.running.load(Relaxed) as usize, 1 + step);
    }
    run_until_idle(&mut s, &queue);
}

#[test]
fn short_prompts_join_while_a_long_one_is_read_in_chunks() {
    let (mut s, queue) = scheduler(4, 32);
    let long_ids = prompt(&s, 150, 0);
    let (long, mut long_rx) = job_ids(long_ids.clone(), 6);
    submit(&queue, long);
    assert!(s.step());
    // Being read, not decoding.
    assert_eq!(s.stats.running.load(Relaxed), 0);
    assert_eq!(s.stats.prefilling.load(Relaxed), 1);

    let (short, mut short_rx) = job_ids(prompt(&s, 5, 1), 12);
    submit(&queue, short);
    assert!(s.step());
    let short_tokens = outcome(&mut short_rx).tokens;
    assert_eq!(short_tokens, 2, "the short prompt joined and decodes");
    assert!(s.chunked.is_some(), "the long prompt is still being read");
    assert_eq!(s.stats.running.load(Relaxed), 1);
    assert_eq!(s.stats.prefilling.load(Relaxed), 1);
    let mut steps = 0;
    while s.chunked.is_some() {
        assert!(s.step());
        steps += 1;
        assert_eq!(
            outcome(&mut short_rx).tokens,
            1,
            "one token a step meanwhile"
        );
    }
    assert!(steps >= 3, "{steps} steps to read 150 tokens in chunks");
    run_until_idle(&mut s, &queue);
    let chunked = token_ids(&mut long_rx);
    assert_eq!(chunked.len(), 6);

    // Greedy: the same tokens as the prompt read in one go, alone.
    let (mut alone, queue) = scheduler(1, 512);
    let (long, mut rx) = job_ids(long_ids, 6);
    submit(&queue, long);
    run_until_idle(&mut alone, &queue);
    assert_eq!(chunked, token_ids(&mut rx));
}

#[test]
fn decode_steps_sampled_on_the_device_pick_the_host_tokens() {
    use crate::engine::sampler::SamplingParams;
    let settings = [
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            repetition_penalty: 1.3,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_p: 0.8,
            min_p: 0.05,
            logprobs: 2,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.9,
            top_k: 1,
            ..Default::default()
        },
    ];
    let run = |choice: SamplerChoice| {
        let (s, queue) = scheduler(4, 512);
        let mut s = s.with_sampler(choice);
        assert_eq!(s.sample_on_device, choice == SamplerChoice::Device);
        let mut rxs = Vec::new();
        for (i, p) in settings.iter().enumerate() {
            let (mut j, rx) = job_ids(prompt(&s, 6, i), 12);
            j.params = SamplingParams {
                seed: 40 + i as u64,
                ..p.clone()
            };
            submit(&queue, j);
            rxs.push(rx);
        }
        run_until_idle(&mut s, &queue);
        rxs.iter_mut().map(token_ids).collect::<Vec<_>>()
    };
    let (host, device) = (run(SamplerChoice::Host), run(SamplerChoice::Device));
    assert!(host.iter().all(|t| t.len() == 12), "{host:?}");
    // Float round-off at a boundary may part one sequence, never more.
    let same = host.iter().zip(&device).filter(|(h, d)| h == d).count();
    assert!(
        same + 1 >= settings.len(),
        "host {host:?}, device {device:?}"
    );
    assert_eq!(host[3], device[3], "top_k 1 is the argmax");
}
