"""A Llama checkpoint with random weights and a matching tokenizer, for
benchmarks that need a model of a given shape but not a trained one.

    python scripts/make_random_checkpoint.py --preset llama-3.2-1b --out /tmp/llama-1b-random
    python scripts/make_random_checkpoint.py --preset tiny --out /tmp/tiny-random
    python scripts/make_random_checkpoint.py --preset agent-100m --out /tmp/agent-100m-random
    python scripts/make_random_checkpoint.py --preset smollm-135m --out /tmp/smollm-135m-random
    python scripts/make_random_checkpoint.py --preset vocab-128k --out /tmp/vocab-128k-random
    # any other Llama shape: a preset with fields overridden
    python scripts/make_random_checkpoint.py --preset agent-100m --hidden 1024 --heads 8 --kv-heads 2 --out /tmp/hd128

Writes, in the Hugging Face layout that both transformers and torchwire-server
load: config.json, generation_config.json, model.safetensors (save_pretrained),
tokenizer.json and tokenizer_config.json.

The tokenizer is a byte-level BPE built without any corpus or download: the 256
byte tokens, <|bos|> and <|eos|>, then merges of byte pairs (and pair + byte)
ordered so that common English letters merge first, until the vocabulary has
exactly --vocab ids. Every id is a real token that encodes and decodes, and
encode(text) prepends <|bos|> like the bundled model's tokenizer.
"""

import argparse
import json
import os
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS = "<|bos|>", "<|eos|>"

PRESETS = {
    # Llama-3.2-1B's shape (random weights): 1.24 B parameters.
    "llama-3.2-1b": dict(
        hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
        context=4096, rope_theta=500000.0, dtype="bfloat16",
    ),
    # About 100 M parameters and 4,096 tokens of context: prefill is slow
    # enough on a CPU to see what prefix reuse saves (scripts/prefix_reuse_bench.py).
    "agent-100m": dict(
        hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000,
        context=4096, rope_theta=10000.0, dtype="float32",
    ),
    # The same context at a third of the cost, for a busy machine.
    "agent-30m": dict(
        hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=16000,
        context=4096, rope_theta=10000.0, dtype="float32",
    ),
    # agent-30m's body under Llama 3's 128,256-token vocabulary (89 M
    # parameters, 66 M of them the tied embedding): a decode step whose
    # logits are as wide as a Llama 3 model's, for timing sampling against
    # it on a CPU (device_sampler_bench, step_bench).
    "vocab-128k": dict(
        hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=128256,
        context=2048, rope_theta=500000.0, dtype="float32",
    ),
    # SmolLM-135M's shape (random weights): 134.5 M parameters, tied embeddings.
    # The model of the llama.cpp comparison (scripts/bench_llamacpp.py).
    "smollm-135m": dict(
        hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
        context=2048, rope_theta=10000.0, dtype="float32",
    ),
    # The bundled model's shape, for quick checks on a CPU.
    "tiny": dict(
        hidden=256, layers=6, heads=8, kv_heads=4, intermediate=768, vocab=8192,
        context=512, rope_theta=10000.0, dtype="float32",
    ),
}


def byte_alphabet():
    """GPT-2's byte -> printable character table (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_order():
    """Bytes from most to least common in English text."""
    common = b" etaoinshrdlucmfwypvbgkjqxz" + b"ETAOINSHRDLUCMFWYPVBGKJQXZ" + b"0123456789" + b".,'\"-\n:;!?()"
    seen = list(dict.fromkeys(common))
    return seen + [b for b in range(256) if b not in seen]


def build_tokenizer(vocab_size):
    """A byte-level BPE with exactly `vocab_size` ids (2 of them special)."""
    if vocab_size < 258:
        raise SystemExit("--vocab must be at least 258 (256 bytes + BOS + EOS)")
    chars = byte_alphabet()
    order = byte_order()
    rank = {b: i for i, b in enumerate(order)}
    vocab = {chars[b]: i for i, b in enumerate(order)}
    merges = []
    budget = vocab_size - 2 - len(vocab)

    # Pairs of bytes, then pair + byte, each ordered by how common the parts are.
    pairs = sorted(((a, b) for a in range(256) for b in range(256)), key=lambda p: (rank[p[0]] + rank[p[1]], rank[p[0]]))
    for a, b in pairs[:budget]:
        left, right = chars[a], chars[b]
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    budget -= min(budget, len(pairs))
    if budget > 0:
        triples = sorted(
            ((a, b, c) for a in order[:40] for b in order[:40] for c in range(256)),
            key=lambda t: (rank[t[0]] + rank[t[1]] + rank[t[2]], rank[t[0]], rank[t[1]]),
        )
        if budget > len(triples):
            raise SystemExit(f"--vocab {vocab_size} is larger than this construction supports")
        for a, b, c in triples[:budget]:
            left, right = chars[a] + chars[b], chars[c]
            vocab[left + right] = len(vocab)
            merges.append((left, right))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return tok, bos_id, eos_id


SHAPE_KEYS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "context", "rope_theta", "dtype")


def main():
    p = argparse.ArgumentParser(description="random-weight Llama checkpoint with a matching tokenizer")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to initialize")
    p.add_argument("--seed", type=int, default=0)
    for key in SHAPE_KEYS:
        p.add_argument(f"--{key.replace('_', '-')}", type=type(PRESETS["tiny"][key]), dest=key,
                       help=f"override the preset's {key}")
    args = p.parse_args()
    shape = dict(PRESETS[args.preset])
    shape.update({k: getattr(args, k) for k in SHAPE_KEYS if getattr(args, k) is not None})
    for key in SHAPE_KEYS:
        if key != "dtype" and shape[key] <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive, got {shape[key]}")
    if shape["vocab"] < 258:
        p.error(f"--vocab must hold the 256 byte tokens and 2 special ones (at least 258), got {shape['vocab']}")
    if shape["dtype"] not in ("float32", "float16", "bfloat16"):
        p.error(f"--dtype must be float32, float16 or bfloat16, got {shape['dtype']!r}")
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        p.error(f"hidden ({shape['hidden']}) must divide by heads ({shape['heads']}), "
                f"and heads by kv_heads ({shape['kv_heads']})")
    t0 = time.time()

    tok, bos_id, eos_id = build_tokenizer(shape["vocab"])
    sample = "The lighthouse keeper climbed the stairs."
    ids = tok.encode(sample).ids
    assert ids[0] == bos_id and tok.decode(ids, skip_special_tokens=True) == sample, "tokenizer round trip"

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=shape["context"],
        rope_theta=shape["rope_theta"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        hidden_act="silu",
    )
    dtype = getattr(torch, shape["dtype"])
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)  # model.safetensors, config.json, generation_config.json

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=shape["context"]
    )
    fast.save_pretrained(args.out)
    params = sum(t.numel() for t in model.parameters())
    print(
        json.dumps(
            {
                "out": args.out,
                "preset": args.preset,
                "parameters": params,
                "shape": shape,
                "seconds": round(time.time() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
