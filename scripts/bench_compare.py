"""torchwire next to Hugging Face transformers, on one machine, in one run.

    python scripts/bench_compare.py [--model models/torchwire-tiny] [--threads 2]
        [--prompt-tokens 32] [--output-tokens 128] [--batch 16] [--bin-dir target/release]

(a) transformers: `LlamaForCausalLM.generate` on the checkpoint, greedy, EOS
    ignored (min_new_tokens = max_new_tokens), at batch 1 and at a static batch
    of --batch identical prompts; a warm-up call first, then --repeats timed
    calls, the median kept.
(b) torchwire: starts `<bin-dir>/torchwire-server --listen 127.0.0.1:0 --model
    DIR --threads T`, waits for `torchwire health`, runs `torchwire bench
    --concurrency 1,<batch>` with the same lengths (one gRPC stream per
    request, tokens timed as they arrive), and stops the server with SIGTERM.

Both sides use the same torch intra-op thread count and see prompts of the
same token length. Prints one table with the ratios (torchwire / HF) and
writes everything (both sides, the machine, torchwire's JSON and chart) to
--out (default bench-results/, git-ignored).

ms/step is wall time / output tokens for one sequence: for HF, generate's
time / max_new_tokens (prefill included); for torchwire, the median time per
output token after the first (TPOT). With --bandwidth-bound-ms, each side's
step time is also given as a fraction of that lower bound (weights read once
per decode step at the device's memory bandwidth).
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prose the HF prompt is tokenized from (cycled to the exact length).
TEXT = (
    "The old lighthouse keeper climbed the winding stairs every evening to light the lamp. "
    "Ships passing in the night relied on its steady beam to find their way around the rocky coast. "
)


def log(msg):
    print(f"[bench-compare] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# (a) Hugging Face transformers


def hf_prompt_ids(tokenizer, tokens):
    """Exactly `tokens` ids: the tokenizer's special prefix (BOS) + cycled prose."""
    ids = tokenizer(TEXT, add_special_tokens=True).input_ids
    prefix = tokenizer("", add_special_tokens=True).input_ids
    body = [i for i in ids[len(prefix):]]
    out = list(prefix)
    while len(out) < tokens:
        out.extend(body)
    return out[:tokens]


def run_hf(args):
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else ("auto" if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    n = args.output_tokens
    eos = model.generation_config.eos_token_id
    pad = eos if isinstance(eos, int) else (eos or [0])[0]

    def gen_config(tokens):
        return GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=tokens,
            min_new_tokens=tokens,  # never stop at EOS, like torchwire's ignore_eos
            eos_token_id=eos,
            pad_token_id=pad,
        )

    prompt = hf_prompt_ids(tokenizer, args.prompt_tokens)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    for batch in (1, args.batch):
        input_ids = torch.tensor([prompt] * batch, device=device)
        attention_mask = torch.ones_like(input_ids)
        log(f"HF batch {batch}: warm-up")
        model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config(min(n, 16)))
        times = []
        for r in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config(n))
            sync()
            times.append(time.perf_counter() - t0)
            assert out.shape == (batch, len(prompt) + n), out.shape
            log(f"HF batch {batch}: run {r + 1}/{args.repeats}: {times[-1]:.3f} s")
        t = statistics.median(times)
        results[str(batch)] = {
            "batch": batch,
            "seconds": times,
            "median_s": t,
            "output_tokens_per_s": batch * n / t,
            "ms_per_step": t / n * 1e3,
        }
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results, meta


# ---------------------------------------------------------------------------
# (b) torchwire over gRPC


class ServerProcess:
    """torchwire-server on a free port; its log goes to a file."""

    def __init__(self, binary, args, log_path):
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        self.addr = self._wait_for_address(timeout=300)

    def _wait_for_address(self, timeout):
        found = {}

        def read():
            for line in self.proc.stdout:
                if line.startswith("torchwire-server listening on "):
                    found["addr"] = line.split(" on ", 1)[1].strip()
                    break
            # Keep draining stdout so the server never blocks on a full pipe.
            for _ in self.proc.stdout:
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while "addr" not in found:
            if self.proc.poll() is not None:
                raise SystemExit(f"torchwire-server exited with {self.proc.returncode}; see {self.log_file.name}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"torchwire-server printed no address within {timeout} s")
            reader.join(0.05)
        return found["addr"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def run_torchwire(args, out_dir, stamp):
    server_bin = os.path.join(args.bin_dir, "torchwire-server")
    cli_bin = os.path.join(args.bin_dir, "torchwire")
    for b in (server_bin, cli_bin):
        if not os.access(b, os.X_OK):
            raise SystemExit(f"{b} not found: build it with `cargo build --release --bins` (or pass --bin-dir)")
    server_args = ["--model", args.model, "--threads", str(args.threads), "--max-batch-size", str(args.batch)]
    if args.device != "cpu":
        server_args += ["--device", args.device]
    if args.dtype:
        server_args += ["--dtype", args.dtype]
    server_args += args.server_arg
    log_path = os.path.join(out_dir, f"server-{stamp}.log")
    log(f"starting torchwire-server {' '.join(server_args)} (log: {log_path})")
    server = ServerProcess(server_bin, server_args, log_path)
    try:
        url = f"http://{server.addr}"
        subprocess.run([cli_bin, "--addr", url, "health", "--wait", "300"], check=True, stdout=subprocess.DEVNULL)
        models = json.loads(subprocess.run([cli_bin, "--addr", url, "models", "--json"], check=True,
                                           capture_output=True, text=True).stdout)
        json_path = os.path.join(out_dir, f"torchwire-{stamp}.json")
        chart_path = os.path.join(out_dir, f"torchwire-{stamp}.svg")
        cmd = [
            cli_bin, "--addr", url, "bench",
            "--concurrency", f"1,{args.batch}",
            "--rounds", str(args.rounds),
            "--warmup", str(args.batch),
            "--prompt-tokens", str(args.prompt_tokens),
            "--output-tokens", str(args.output_tokens),
            "--temperature", "0",
            "--label", args.label,
            "--json", json_path,
            "--chart", chart_path,
        ]
        log("running " + " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd[3:]))
        subprocess.run(cmd, check=True)
    finally:
        server.stop()
    with open(json_path) as f:
        report = json.load(f)
    return report, models, json_path, chart_path


# ---------------------------------------------------------------------------
# Report


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - machine info is best effort
        pass
    return info


def table(args, hf, tw_levels):
    high = args.batch
    rows = []
    for n, target in ((1, 2.0), (high, 1.5)):
        h = hf.get(str(n)) if hf else None
        t = tw_levels.get(n)
        tw_tps = t["output_tokens_per_s"] if t else None
        tw_step = t["tpot_ms"]["p50"] if t and t.get("tpot_ms") else None
        ratio = tw_tps / h["output_tokens_per_s"] if (h and tw_tps) else None
        rows.append({
            "size": n,
            "hf_tok_s": h["output_tokens_per_s"] if h else None,
            "hf_ms_step": h["ms_per_step"] if h else None,
            "tw_tok_s": tw_tps,
            "tw_ms_step": tw_step,
            "tw_ttft_ms": t["ttft_ms"]["p50"] if t and t.get("ttft_ms") else None,
            "ratio": ratio,
            "target": target,
            "meets_target": (ratio >= target) if ratio is not None else None,
        })
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(args, rows):
    bound = args.bandwidth_bound_ms
    head = ["batch / concurrency", "HF tok/s", "HF ms/step", "torchwire tok/s", "torchwire ms/step",
            "torchwire TTFT p50 ms", "ratio", "target"]
    if bound:
        head += ["HF % of bound", "torchwire % of bound"]
    lines = [head]
    for r in rows:
        line = [
            str(r["size"]),
            fmt(r["hf_tok_s"], ",.0f"),
            fmt(r["hf_ms_step"], ".2f"),
            fmt(r["tw_tok_s"], ",.0f"),
            fmt(r["tw_ms_step"], ".2f"),
            fmt(r["tw_ttft_ms"], ".1f"),
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
            f">= {r['target']}x" + ("" if r["meets_target"] is None else (" ok" if r["meets_target"] else " MISSED")),
        ]
        if bound:
            line += [
                "-" if not r["hf_ms_step"] else f"{100 * bound / r['hf_ms_step']:.1f}%",
                "-" if not r["tw_ms_step"] else f"{100 * bound / r['tw_ms_step']:.1f}%",
            ]
        lines.append(line)
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    out = []
    for i, l in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(l, widths))) + " |")
        if i == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description="torchwire vs Hugging Face transformers, same machine, same settings")
    p.add_argument("--model", default=os.path.join(REPO, "models", "torchwire-tiny"), help="checkpoint directory")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both sides")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="HF static batch = torchwire concurrency")
    p.add_argument("--repeats", type=int, default=5, help="timed HF generate calls per batch size")
    p.add_argument("--rounds", type=int, default=4,
                   help="torchwire requests per level = rounds x concurrency")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, the checkpoint's on CUDA)")
    p.add_argument("--bin-dir", default=os.path.join(REPO, "target", "release"), help="where torchwire and torchwire-server are")
    p.add_argument("--server-arg", action="append", default=[], help="extra torchwire-server flag (repeatable)")
    p.add_argument("--out", default=os.path.join(REPO, "bench-results"), help="results directory")
    p.add_argument("--label", default=None, help="name of this run (default: model and device)")
    p.add_argument("--bandwidth-bound-ms", type=float, default=None,
                   help="lower bound of one decode step (ms) to report each side against")
    p.add_argument("--skip-hf", action="store_true", help="only run torchwire")
    args = p.parse_args()
    args.model = os.path.abspath(args.model)
    args.label = args.label or f"{os.path.basename(args.model)} {args.device} {args.threads} threads"
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load_before[0]:.2f} before the run; other work on this machine will skew the numbers")
    hf, hf_meta = (None, None)
    if not args.skip_hf:
        hf, hf_meta = run_hf(args)
    tw_report, models, json_path, chart_path = run_torchwire(args, args.out, stamp)
    tw_levels = {lvl["load"]["concurrency"]: lvl for lvl in tw_report["levels"] if "concurrency" in lvl["load"]}
    rows = table(args, hf, tw_levels)

    summary = {
        "when": stamp,
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "settings": {
            "model": os.path.relpath(args.model, REPO) if args.model.startswith(REPO) else args.model,
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "batch": args.batch,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "device": args.device,
            "bandwidth_bound_ms": args.bandwidth_bound_ms,
        },
        "hf": {"meta": hf_meta, "results": hf},
        "torchwire": {"models": models, "report": os.path.basename(json_path), "chart": os.path.basename(chart_path),
                      "levels": tw_report["levels"]},
        "comparison": rows,
    }
    summary_path = os.path.join(args.out, f"compare-{stamp}.json")
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)

    m = summary["machine"]
    print()
    print(f"{args.label}: {args.prompt_tokens} prompt tokens, {args.output_tokens} output tokens, greedy, "
          f"{args.threads} torch threads, {m.get('gpu') or m['cpu']} ({m['cores']} cores)")
    if hf_meta:
        print(f"HF: torch {hf_meta['torch']}, transformers {hf_meta['transformers']}, {hf_meta['dtype']}, "
              f"{hf_meta['parameters']:,} parameters")
    print()
    print(print_table(args, rows))
    print()
    print(f"wrote {summary_path}, {json_path}, {chart_path}")


if __name__ == "__main__":
    main()
