"""Train torchwire-tiny, the small Llama model bundled with torchwire, from scratch.

    bash models/train/fetch_corpus.sh
    python models/train/train.py --minutes 20

Steps:
  1. read the fortune corpus (models/train/data/corpus.jsonl, one document per
     line) and split it into train/validation documents (seeded);
  2. train a byte-level BPE tokenizer on the training documents (`tokenizers`);
     its post-processor prepends <|bos|>, so encode(text, add_special_tokens=True)
     starts with BOS, both here and in the Rust `tokenizers` crate;
  3. train a `LlamaForCausalLM` (grouped-query attention, tied embeddings) on
     the stream <|bos|> doc <|eos|> <|bos|> doc <|eos|> ... with AdamW and a
     warmup + cosine learning-rate schedule, on CPU;
  4. save config.json, generation_config.json, model.safetensors,
     tokenizer.json and tokenizer_config.json to the output directory.

With --steps N the run takes exactly N optimizer steps and the cosine schedule
is laid out over them (reproducible). Without it, the schedule is laid out
over the wall-clock budget --minutes instead: training runs until the budget
is used, however fast the steps are on the machine at hand. --minutes is also
a hard limit with --steps: when it runs out, training stops and saves.
"""

import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
BOS, EOS = "<|bos|>", "<|eos|>"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(HERE, "data", "corpus.jsonl"))
    p.add_argument("--out", default=os.path.join(HERE, "..", "torchwire-tiny"))
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget for model training")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: train for --minutes, schedule over time)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.05)
    # model shape
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=704)
    # optimisation
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_tokenizer(docs, vocab_size):
    """Byte-level BPE (GPT-2 style pre-tokenization) with BOS/EOS specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    # add_special_tokens=True prepends BOS (to each sequence of a pair, too)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return tok, bos_id, eos_id


def encode_stream(tok, docs, eos_id):
    """<|bos|> doc <|eos|> for every document, concatenated."""
    ids = []
    for enc in tok.encode_batch(docs, add_special_tokens=True):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step, progress, args):
    """Linear warmup over args.warmup steps, then cosine decay to
    min_lr_ratio * lr as `progress` (0..1 of the run after warmup) goes to 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, max(0.0, progress))
    ratio = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return args.lr * ratio


@torch.no_grad()
def evaluate(model, data, context, batch_size=64):
    """Mean next-token loss over non-overlapping windows covering `data`."""
    model.eval()
    n = (len(data) - 1) // context
    x_all = data[: n * context].view(n, context)
    y_all = data[1 : n * context + 1].view(n, context)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        logits = model(input_ids=x_all[i : i + batch_size]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y_all[i : i + batch_size].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += y_all[i : i + batch_size].numel()
    model.train()
    return total / count


@torch.no_grad()
def sample(model, tok, prompt, max_new_tokens=40, **kw):
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=True).ids])
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **kw)
    model.train()
    return tok.decode(out[0, ids.size(1) :].tolist(), skip_special_tokens=True)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t_start = time.time()

    # 1. corpus and document-level train/validation split
    with open(args.corpus, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    order = list(range(len(docs)))
    random.Random(args.seed).shuffle(order)
    n_val = int(len(docs) * args.val_fraction)
    val_docs = [docs[i] for i in order[:n_val]]
    train_docs = [docs[i] for i in order[n_val:]]
    print(f"corpus: {len(docs)} documents, {len(train_docs)} train / {len(val_docs)} validation", flush=True)

    # 2. tokenizer
    tok, bos_id, eos_id = train_tokenizer(train_docs, args.vocab_size)
    vocab_size = tok.get_vocab_size()
    train_ids = encode_stream(tok, train_docs, eos_id)
    val_ids = encode_stream(tok, val_docs, eos_id)
    print(
        f"tokenizer: vocab {vocab_size}, bos={bos_id} eos={eos_id}, "
        f"{len(train_ids)} train / {len(val_ids)} validation tokens "
        f"({time.time() - t_start:.0f}s)",
        flush=True,
    )

    # 3. model
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    print(f"model: {n_params} parameters ({n_params * 4 / 1e6:.1f} MB float32)", flush=True)

    # AdamW; no weight decay on norms (1-D tensors)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    # batches: random windows of context+1 tokens from the training stream
    gen = torch.Generator().manual_seed(args.seed)
    max_start = len(train_ids) - args.context - 1
    offsets = torch.arange(args.context + 1)

    def batch():
        starts = torch.randint(0, max_start, (args.batch_size,), generator=gen)
        w = train_ids[starts[:, None] + offsets]
        return w[:, :-1], w[:, 1:]

    budget = args.minutes * 60
    train_budget = 0.97 * budget  # ~3% left for evaluation and saving
    total = args.steps if args.steps > 0 else None
    t_train = time.time()
    smooth, step, t_warm = None, 0, 0.0
    while total is None or step < total:
        # progress through the cosine part of the schedule: by steps with
        # --steps; otherwise by the wall-clock time used, so that the schedule
        # ends at its minimum when the budget runs out however fast or slow
        # (other load on the machine) the steps are
        if args.steps > 0:
            progress = (step - args.warmup) / max(1, total - args.warmup)
        else:
            progress = (time.time() - t_train - t_warm) / max(1e-9, train_budget - t_warm)
            if step >= args.warmup and progress >= 1.0:
                break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, args)
        x, y = batch()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        elapsed = time.time() - t_train
        if step % args.log_every == 0 or step == total:
            print(
                f"step {step}/{total or '?'} loss {loss.item():.4f} (smoothed {smooth:.4f}) "
                f"lr {opt.param_groups[0]['lr']:.2e} {elapsed:.0f}s",
                flush=True,
            )
        if step % 250 == 0:
            print(f"  val loss {evaluate(model, val_ids, args.context):.4f}", flush=True)
        if step == args.warmup:
            t_warm = elapsed
        if elapsed > budget:
            print(f"time budget of {args.minutes} min reached at step {step}", flush=True)
            break
    train_time = time.time() - t_train

    # final losses: train on a sample of windows of the same size as validation
    val_loss = evaluate(model, val_ids, args.context)
    g = torch.Generator().manual_seed(args.seed + 1)
    start = torch.randint(0, len(train_ids) - len(val_ids) - 1, (1,), generator=g).item()
    train_loss = evaluate(model, train_ids[start : start + len(val_ids) + 1], args.context)
    print(
        f"done: {step} steps in {train_time / 60:.1f} min (total {(time.time() - t_start) / 60:.1f} min); "
        f"train loss {train_loss:.4f}, validation loss {val_loss:.4f} (ppl {math.exp(val_loss):.1f})",
        flush=True,
    )

    # 4. save in the Hugging Face layout
    os.makedirs(args.out, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    model.save_pretrained(args.out)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=512
    )
    fast.save_pretrained(args.out)
    # Also write the classic top-level keys (torch_dtype, rope_theta) that
    # older transformers releases and other Llama loaders (the Rust server)
    # read; transformers 5 writes dtype / rope_parameters and accepts both.
    path = os.path.join(args.out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = "float32"
    cfg["rope_theta"] = config.rope_parameters["rope_theta"]
    with open(path, "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
        f.write("\n")
    # "PreTrainedTokenizerFast" loads in every transformers release (v5 calls
    # the class TokenizersBackend and writes that name by default)
    path = os.path.join(args.out, "tokenizer_config.json")
    with open(path) as f:
        tcfg = json.load(f)
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(tcfg, f, indent=2)
        f.write("\n")
    for prompt in ("The meaning of life is", "A wise man once said"):
        print(f"greedy  {prompt!r} -> {sample(model, tok, prompt, do_sample=False)!r}")
        print(
            f"sampled {prompt!r} -> "
            f"{sample(model, tok, prompt, do_sample=True, temperature=0.8, top_p=0.9)!r}"
        )


if __name__ == "__main__":
    main()
