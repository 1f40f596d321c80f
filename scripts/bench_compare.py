"""torchwire next to Hugging Face transformers, on one machine, in one run.

    python scripts/bench_compare.py [--model models/torchwire-tiny] [--threads 2]
        [--prompt-tokens 32] [--output-tokens 128] [--batch 16] [--bin-dir target/release]

(a) transformers: `LlamaForCausalLM.generate` on the checkpoint, greedy, EOS
    ignored (min_new_tokens = max_new_tokens), at batch 1 and at a static batch
    of --batch identical prompts.
(b) torchwire: starts `<bin-dir>/torchwire-server --listen 127.0.0.1:0 --model
    DIR --threads T`, waits for `torchwire health`, runs `torchwire bench
    --concurrency 1,<batch>` with the same lengths (one gRPC stream per
    request, tokens timed as they arrive), and at the end stops the server
    with SIGTERM.

After a warm-up of each side, --trials rounds alternate between them: one
timed `generate` per batch size, then one `torchwire bench`. Each side's best
trial is compared (other work on the machine only ever slows a trial down;
alternating exposes both sides to the same conditions), and the medians are
reported too.

Both sides use the same torch intra-op thread count and see prompts of the
same token length. Prints one table with the ratios (torchwire / HF) and
writes everything (both sides, every trial, the machine, torchwire's JSON and
charts) to --out (default bench-results/, git-ignored).

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


class HfRunner:
    """The checkpoint loaded in transformers, timed one `generate` at a time."""

    def __init__(self, args):
        import torch
        import transformers
        from transformers import AutoTokenizer, LlamaForCausalLM

        self.torch = torch
        torch.set_num_threads(args.threads)
        torch.set_grad_enabled(False)
        self.device = torch.device(args.device)
        dtype = getattr(torch, args.dtype) if args.dtype else ("auto" if self.device.type == "cuda" else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.model = LlamaForCausalLM.from_pretrained(args.model, dtype=dtype).to(self.device).eval()
        self.prompt = hf_prompt_ids(tokenizer, args.prompt_tokens)
        self.n = args.output_tokens
        eos = self.model.generation_config.eos_token_id
        self.eos = eos
        self.pad = eos if isinstance(eos, int) else (eos or [0])[0]
        self.meta = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": str(self.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def _generate(self, batch, tokens):
        from transformers import GenerationConfig

        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=tokens,
            min_new_tokens=tokens,  # never stop at EOS, like torchwire's ignore_eos
            eos_token_id=self.eos,
            pad_token_id=self.pad,
        )
        input_ids = self.torch.tensor([self.prompt] * batch, device=self.device)
        attention_mask = self.torch.ones_like(input_ids)
        self._sync()
        t0 = time.perf_counter()
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        self._sync()
        elapsed = time.perf_counter() - t0
        assert out.shape == (batch, len(self.prompt) + tokens), out.shape
        return elapsed

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def warm_up(self, batch):
        self._generate(batch, min(self.n, 16))

    def measure(self, batch):
        """Seconds for one full-length generate at `batch`."""
        return self._generate(batch, self.n)


# ---------------------------------------------------------------------------
# (b) torchwire over gRPC


class ServerProcess:
    """torchwire-server on a free port; its log goes to a file. `env`: the
    server's whole environment (default: this process's)."""

    def __init__(self, binary, args, log_path, env=None):
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--admin-listen", "off", *args],
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=env,
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


class TorchwireRunner:
    """torchwire-server started once; `torchwire bench` run once per trial."""

    def __init__(self, args, out_dir, stamp):
        self.args, self.out_dir, self.stamp = args, out_dir, stamp
        server_bin = os.path.join(args.bin_dir, "torchwire-server")
        self.cli = os.path.join(args.bin_dir, "torchwire")
        for b in (server_bin, self.cli):
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
        self.server = ServerProcess(server_bin, server_args, log_path)
        self.url = f"http://{self.server.addr}"
        subprocess.run([self.cli, "--addr", self.url, "health", "--wait", "300"], check=True, stdout=subprocess.DEVNULL)
        listed = subprocess.run([self.cli, "--addr", self.url, "models", "--json"], check=True,
                                capture_output=True, text=True)
        self.models = json.loads(listed.stdout)

    def bench(self, name, rounds, warmup):
        """Runs `torchwire bench`; returns its JSON report and the files it wrote."""
        a = self.args
        json_path = os.path.join(self.out_dir, f"torchwire-{self.stamp}-{name}.json")
        chart_path = os.path.join(self.out_dir, f"torchwire-{self.stamp}-{name}.svg")
        cmd = [
            self.cli, "--addr", self.url, "bench",
            "--concurrency", f"1,{a.batch}",
            "--rounds", str(rounds),
            "--warmup", str(warmup),
            "--prompt-tokens", str(a.prompt_tokens),
            "--output-tokens", str(a.output_tokens),
            "--temperature", "0",
            "--label", f"{a.label} ({name})",
            "--json", json_path,
            "--chart", chart_path,
            "--no-progress",
        ]
        log("torchwire " + " ".join(cmd[3:]))
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        with open(json_path) as f:
            report = json.load(f)
        return report, json_path, chart_path

    def close(self):
        self.server.stop()


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


def compare(args, hf_seconds, tw_reports):
    """Per size: each side's best and median trial, and their ratios."""
    n = args.output_tokens
    rows = []
    for size in (1, args.batch):
        target = args.ratio_targets.get(size)
        row = {"size": size, "target": target, "tok_s_target": args.tok_s_targets.get(size)}
        times = hf_seconds.get(size) or []
        if times:
            best, median = min(times), statistics.median(times)
            row["hf"] = {
                "seconds": times,
                "output_tokens_per_s": size * n / best,
                "ms_per_step": best / n * 1e3,
                "median_output_tokens_per_s": size * n / median,
            }
        levels = [lvl for r in tw_reports for lvl in r["levels"] if lvl["load"].get("concurrency") == size]
        if levels:
            best = max(levels, key=lambda lvl: lvl["output_tokens_per_s"])
            row["torchwire"] = {
                "output_tokens_per_s": best["output_tokens_per_s"],
                "ms_per_step": (best.get("tpot_ms") or {}).get("p50"),
                "ttft_p50_ms": (best.get("ttft_ms") or {}).get("p50"),
                "median_output_tokens_per_s": statistics.median(lvl["output_tokens_per_s"] for lvl in levels),
                "trials": [lvl["output_tokens_per_s"] for lvl in levels],
            }
        if "hf" in row and "torchwire" in row:
            row["ratio"] = row["torchwire"]["output_tokens_per_s"] / row["hf"]["output_tokens_per_s"]
            row["median_ratio"] = (row["torchwire"]["median_output_tokens_per_s"]
                                   / row["hf"]["median_output_tokens_per_s"])
            if target is not None:
                row["meets_target"] = row["ratio"] >= target
        if "torchwire" in row and row["tok_s_target"] is not None:
            row["meets_tok_s_target"] = row["torchwire"]["output_tokens_per_s"] >= row["tok_s_target"]
        rows.append(row)
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(args, rows):
    bound = args.bandwidth_bound_ms
    head = ["batch / concurrency", "HF tok/s", "HF ms/step", "torchwire tok/s", "torchwire ms/step",
            "torchwire TTFT p50 ms", "ratio", "target", "median ratio"]
    if bound:
        head += ["HF % of bound", "torchwire % of bound"]
    if args.tok_s_targets:
        head += ["torchwire tok/s target"]
    lines = [head]
    for r in rows:
        h, t = r.get("hf") or {}, r.get("torchwire") or {}
        met = r.get("meets_target")
        line = [
            str(r["size"]),
            fmt(h.get("output_tokens_per_s"), ",.0f"),
            fmt(h.get("ms_per_step"), ".2f"),
            fmt(t.get("output_tokens_per_s"), ",.0f"),
            fmt(t.get("ms_per_step"), ".2f"),
            fmt(t.get("ttft_p50_ms"), ".1f"),
            "-" if "ratio" not in r else f"{r['ratio']:.2f}x",
            "-" if r["target"] is None else f">= {r['target']}x" + ("" if met is None else (" ok" if met else " MISSED")),
            "-" if "median_ratio" not in r else f"{r['median_ratio']:.2f}x",
        ]
        if bound:
            line += [
                "-" if not h.get("ms_per_step") else f"{100 * bound / h['ms_per_step']:.1f}%",
                "-" if not t.get("ms_per_step") else f"{100 * bound / t['ms_per_step']:.1f}%",
            ]
        if args.tok_s_targets:
            goal, ok = r.get("tok_s_target"), r.get("meets_tok_s_target")
            line.append("-" if goal is None else f">= {goal:,.0f}" + ("" if ok is None else (" ok" if ok else " MISSED")))
        lines.append(line)
    return markdown_table(lines)


def markdown_table(lines):
    """Rows of cells (the first row the header) as a Markdown table, columns
    padded to their widest cell: the first left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    out = []
    for i, row in enumerate(lines):
        cells = (c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
        out.append("| " + " | ".join(cells) + " |")
        if i == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def parse_targets(text, batch, parser):
    """'1=2.0,batch=1.5' -> {1: 2.0, batch: 1.5}; 'none' -> {}."""
    if text.strip().lower() == "none":
        return {}
    goals = {}
    for part in text.split(","):
        size, _, goal = part.partition("=")
        try:
            key = batch if size.strip() == "batch" else int(size)
            goals[key] = float(goal)
        except ValueError:
            parser.error(f"targets: expected SIZE=NUMBER[,...] (SIZE an integer or 'batch'), got {part!r}")
    return goals


def main():
    p = argparse.ArgumentParser(description="torchwire vs Hugging Face transformers, same machine, same settings")
    p.add_argument("--model", default=os.path.join(REPO, "models", "torchwire-tiny"), help="checkpoint directory")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both sides")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="HF static batch = torchwire concurrency")
    p.add_argument("--trials", type=int, default=5,
                   help="alternating trials: one HF generate per batch size, then one torchwire bench")
    p.add_argument("--rounds", type=int, default=3,
                   help="torchwire requests per level and trial = rounds x concurrency")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, the checkpoint's on CUDA)")
    p.add_argument("--bin-dir", default=os.path.join(REPO, "target", "release"), help="where torchwire and torchwire-server are")
    p.add_argument("--server-arg", action="append", default=[], help="extra torchwire-server flag (repeatable)")
    p.add_argument("--out", default=os.path.join(REPO, "bench-results"), help="results directory")
    p.add_argument("--label", default=None, help="name of this run (default: model and device)")
    p.add_argument("--bandwidth-bound-ms", type=float, default=None,
                   help="lower bound of one decode step (ms) to report each side against")
    p.add_argument("--skip-hf", action="store_true", help="only run torchwire")
    p.add_argument("--ratio-targets", default="1=2.0,batch=1.5",
                   help="torchwire/HF tok/s ratio goals per size, e.g. 1=2.0,batch=1.5 ('none' for no goals)")
    p.add_argument("--tok-s-targets", default="none",
                   help="torchwire output tok/s goals per concurrency, e.g. 1=300,64=10000")
    args = p.parse_args()
    args.ratio_targets = parse_targets(args.ratio_targets, args.batch, p)
    args.tok_s_targets = parse_targets(args.tok_s_targets, args.batch, p)
    args.model = os.path.abspath(args.model)
    args.label = args.label or f"{os.path.basename(args.model)} {args.device} {args.threads} threads"
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load_before[0]:.2f} before the run; other work on this machine will skew the numbers")
    hf = None if args.skip_hf else HfRunner(args)
    tw = TorchwireRunner(args, args.out, stamp)
    sizes = (1, args.batch)
    hf_seconds = {size: [] for size in sizes}
    tw_reports, tw_files = [], []
    try:
        log("warm-up")
        if hf:
            for size in sizes:
                hf.warm_up(size)
        tw.bench("warmup", rounds=1, warmup=args.batch)
        for trial in range(1, args.trials + 1):
            if hf:
                for size in sizes:
                    hf_seconds[size].append(hf.measure(size))
                    log(f"trial {trial}/{args.trials}: HF batch {size}: {hf_seconds[size][-1]:.3f} s")
            report, json_path, chart_path = tw.bench(f"trial{trial}", rounds=args.rounds, warmup=0)
            tw_reports.append(report)
            tw_files += [os.path.basename(json_path), os.path.basename(chart_path)]
            tps = ", ".join(f"c={lvl['load']['concurrency']}: {lvl['output_tokens_per_s']:.0f} tok/s"
                            for lvl in report["levels"])
            log(f"trial {trial}/{args.trials}: torchwire {tps}")
    finally:
        tw.close()
    rows = compare(args, hf_seconds if hf else {}, tw_reports)

    summary = {
        "when": stamp,
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "settings": {
            "model": os.path.relpath(args.model, REPO) if args.model.startswith(REPO) else args.model,
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "batch": args.batch,
            "trials": args.trials,
            "rounds": args.rounds,
            "device": args.device,
            "bandwidth_bound_ms": args.bandwidth_bound_ms,
        },
        "hf": {"meta": hf.meta if hf else None},
        "torchwire": {"models": tw.models, "files": tw_files, "trials": [r["levels"] for r in tw_reports]},
        "comparison": rows,
    }
    summary_path = os.path.join(args.out, f"compare-{stamp}.json")
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)

    m = summary["machine"]
    print()
    print(f"{args.label}: {args.prompt_tokens} prompt tokens, {args.output_tokens} output tokens, greedy, "
          f"{args.threads} torch threads, {m.get('gpu') or m['cpu']} ({m['cores']} cores)")
    if hf:
        meta = hf.meta
        print(f"HF: torch {meta['torch']}, transformers {meta['transformers']}, {meta['dtype']}, "
              f"{meta['parameters']:,} parameters")
    print(f"best of {args.trials} alternating trials per side (median ratio: medians of both sides)")
    print()
    print(print_table(args, rows))
    print()
    print(f"wrote {summary_path} and torchwire-{stamp}-*.json/.svg in {args.out}")


if __name__ == "__main__":
    main()
