//! The CPU decode step against the tensor-op step on the bundled model.

use super::*;

/// The CPU step and the libtorch-op step, on the bundled model, in float32
/// and int8, on one thread and on a team of two, with the KV cache in
/// float32, float16 and bfloat16: the same logits and the same cache, for
/// sequences at different positions (a mask in the op step) and at one
/// (none); the CPU step asked for greedy ids alone picks the logits'
/// argmax.
#[test]
fn the_cpu_step_matches_the_op_step() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/torchwire-tiny");
    for threads in [1, 2] {
        for quantization in [Quantization::None, Quantization::Int8] {
            for kv in [Kind::Float, Kind::Half, Kind::BFloat16] {
                cpu_step_matches_op_step(&dir, quantization, threads, kv, "torchwire-tiny");
            }
        }
    }
}

/// Loads `dir` and runs the CPU decode step and the op step side by side
/// (see `the_cpu_step_matches_the_op_step`), the KV cache stored as `kv`;
/// `what` names the case.
pub(super) fn cpu_step_matches_op_step(
    dir: &Path,
    quantization: Quantization,
    threads: usize,
    kv: Kind,
    what: &str,
) {
    let (slots, context) = (3usize, 48usize);
    // Per calling thread in OpenMP: this test's thread only.
    tch::set_num_threads(threads as i32);
    let model = Llama::load(
        dir,
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            max_positions: context,
            quantization,
        },
    )
    .unwrap();
    assert!(model.cpu_rows().is_some(), "{what}: no CPU step");
    let case = format!("{what}, {quantization:?} on {threads} threads, {kv:?} cache");
    let cache = || {
        let shape = (
            model.num_layers(),
            slots,
            model.kv_heads(),
            context,
            model.head_dim(),
        );
        KvCache::stored_as(shape, Device::Cpu, Kind::Float, kv).unwrap()
    };
    let (mut ours, mut ops, mut greedy) = (cache(), cache(), cache());
    let prompts: [&[u32]; 3] = [&[1, 2, 3, 4, 5], &[7, 8, 9], &[10, 11, 12, 13, 14, 15, 16]];
    for (slot, p) in prompts.iter().enumerate() {
        let _ = model.prefill(p, &mut ours, slot, false).unwrap();
        let _ = model.prefill(p, &mut ops, slot, false).unwrap();
        let _ = model.prefill(p, &mut greedy, slot, false).unwrap();
    }
    let mut positions: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let mut tokens = [20u32, 30, 40];
    for step in 0..8 {
        // The last steps run one sequence: one position, no mask.
        let b = if step < 5 { 3 } else { 1 };
        let a = model
            .decode(&tokens[..b], &positions[..b], &mut ours)
            .unwrap();
        let o = model
            .decode_with_ops(&tokens[..b], &positions[..b], &mut ops)
            .unwrap();
        assert_eq!(a.size(), o.size(), "{case}");
        let diff = (&a - &o).abs().max().double_value(&[]);
        assert!(diff < 1e-3, "{case}, step {step}: logits differ by {diff}");
        let next = Vec::<i64>::try_from(a.argmax(-1, false)).unwrap();
        // The same step asked for the ids alone picks the same tokens.
        let ids = model
            .decode_argmax(&tokens[..b], &positions[..b], &mut greedy)
            .unwrap();
        let want: Vec<u32> = next.iter().map(|&t| t as u32).collect();
        assert_eq!(ids, want, "{case}, step {step}");
        for (i, t) in next.into_iter().enumerate() {
            tokens[i] = t as u32;
            positions[i] += 1;
        }
    }
    for (slot, &len) in positions.iter().enumerate() {
        let (a, o) = (
            ours.copy_out(slot, len).unwrap(),
            ops.copy_out(slot, len).unwrap(),
        );
        assert_eq!(a.kind(), kv, "{case}");
        // Rounded the same way on both sides where the cache is narrower.
        let tol = if kv == Kind::Float { 1e-4 } else { 1e-2 };
        let (a, o) = (a.to_kind(Kind::Float), o.to_kind(Kind::Float));
        assert!(a.allclose(&o, tol, tol, false), "{case}, slot {slot}");
    }
}

#[test]
fn bad_tokens_and_positions_are_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/torchwire-tiny");
    let opts = LoadOptions {
        device: Device::Cpu,
        kind: Kind::Float,
        max_positions: 16,
        quantization: Quantization::None,
    };
    let model = Llama::load(&dir, opts).unwrap();
    let mut cache = KvCache::new(
        model.num_layers(),
        2,
        model.kv_heads(),
        16,
        model.head_dim(),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let vocab = model.config.vocab_size as u32;
    assert!(model.decode(&[vocab], &[0], &mut cache).is_err());
    assert!(model.decode(&[1], &[16], &mut cache).is_err());
    assert!(model.decode(&[1, 2, 3], &[0, 0, 0], &mut cache).is_err());
    assert!(model.decode(&[1], &[0, 1], &mut cache).is_err());
    assert!(model.decode(&[1], &[15], &mut cache).is_ok());
    assert!(model.decode_argmax(&[vocab], &[0], &mut cache).is_err());
    assert!(model.decode_argmax(&[1], &[0, 1], &mut cache).is_err());
    assert_eq!(
        model.decode_argmax(&[1], &[15], &mut cache).unwrap().len(),
        1
    );
}

/// Where the step runs as tensor ops (here bfloat16 on the CPU, as on a
/// GPU), greedy decoding takes one argmax of the logits on the device.
#[test]
fn greedy_ids_from_the_op_step_are_the_logits_argmax() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/torchwire-tiny");
    let opts = LoadOptions {
        device: Device::Cpu,
        kind: Kind::BFloat16,
        max_positions: 16,
        quantization: Quantization::None,
    };
    let model = Llama::load(&dir, opts).unwrap();
    assert!(model.cpu_rows().is_none());
    let cache = || {
        KvCache::new(
            model.num_layers(),
            2,
            model.kv_heads(),
            16,
            model.head_dim(),
            Device::Cpu,
            Kind::BFloat16,
        )
        .unwrap()
    };
    let (mut logits_cache, mut ids_cache) = (cache(), cache());
    for cache in [&mut logits_cache, &mut ids_cache] {
        let _ = model.prefill(&[1, 2, 3], cache, 0, false).unwrap();
        let _ = model.prefill(&[4, 5], cache, 1, false).unwrap();
    }
    let logits = model.decode(&[6, 7], &[3, 2], &mut logits_cache).unwrap();
    let want: Vec<u32> = Vec::<i64>::try_from(logits.argmax(-1, false))
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let ids = model
        .decode_argmax(&[6, 7], &[3, 2], &mut ids_cache)
        .unwrap();
    assert_eq!(ids, want);
    // Bad input is an error here too.
    let vocab = model.config.vocab_size as u32;
    assert!(model.decode_argmax(&[vocab], &[0], &mut ids_cache).is_err());
}
