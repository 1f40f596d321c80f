"""Prefix reuse on a multi-turn agent workload: time to first token of the
last turn with the prefix cache on, against the same turn with it off, from
one run.

    python scripts/prefix_reuse_bench.py [--checkpoint DIR] [--preset agent-100m]
        [--turns 8] [--user-tokens 100] [--output-tokens 64] [--concurrency 1,8]
        [--trials 3] [--threads 2] [--cache-mib 1024] [--bin-dir target/release]

A session is a conversation of --turns turns. Each turn adds about
--user-tokens tokens of user text and generates --output-tokens tokens
(greedy, EOS ignored); the client keeps the conversation as text and sends
it whole every turn, as an agent that renders its own history does: turn N+1's
prompt is turn N's prompt, the answer's text and the next user message. At
concurrency C, C sessions run at once, each turn sent when the session's
previous turn has ended. Every request is one `torchwire generate --json`
call (the Generate RPC); time to first token is the server's, from the
request's arrival to its first token (queueing included), as reported on the
last response message.

Two servers run side by side on the same random-weight checkpoint (made with
scripts/make_random_checkpoint.py when --checkpoint does not exist yet), one
with `--prefix-cache-mib --cache-mib`, one with `--prefix-cache-mib 0`, each
with --threads torch threads; they take turns: for each trial and concurrency,
the sessions run on one server, then the same sessions (same text, fresh for
every trial so that no trial finds another's prefixes) on the other, the
order alternating between trials. The table gives the median over every
session and trial of the last turn's TTFT (and of turn 1's, which has nothing
to reuse), and the ratio reuse / no reuse. Everything (every request's TTFT,
the servers' prefix cache stats, the machine) goes to
--out/prefix-reuse-<time>.json.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_compare import REPO, ServerProcess, machine  # noqa: E402

WORDS = (
    "the agent reads a file and writes a short plan before it calls a tool with the path of the "
    "log then it checks the result counts the errors and asks the user whether to retry the build "
    "on another node because the cache was cold and the tests took too long to finish today"
).split()


def log(msg):
    print(f"[prefix-reuse] {msg}", file=sys.stderr, flush=True)


class Tokens:
    """Counts tokens with the checkpoint's own tokenizer."""

    def __init__(self, checkpoint):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json"))

    def count(self, text):
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    def user_message(self, rng, tokens):
        """Random words, cut to about `tokens` tokens."""
        words = []
        while self.count(" ".join(words)) < tokens:
            words.append(rng.choice(WORDS))
        return " ".join(words)


def make_sessions(tokens, args, trial, concurrency):
    """The user messages of every session: distinct per trial and level, so
    no session finds another's prefixes in the cache."""
    sessions = []
    for s in range(concurrency):
        rng = random.Random(f"{trial}-{concurrency}-{s}")
        opening = f"Session {trial}.{concurrency}.{s}: you are a coding agent."
        turns = [tokens.user_message(rng, args.user_tokens) for _ in range(args.turns)]
        sessions.append((opening, turns))
    return sessions


def generate(cli, addr, prompt, args):
    """One Generate call; returns (answer text, server TTFT ms, prompt tokens)."""
    out = subprocess.run(
        [cli, "--addr", f"http://{addr}", "generate", "--json", "-q", "--ignore-eos",
         "--max-new-tokens", str(args.output_tokens), "-"],
        input=prompt, capture_output=True, text=True, check=True,
    )
    messages = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    text = "".join(m.get("text", "") for m in messages)
    last = messages[-1]
    timings = last.get("timings", {})
    ttft = timings.get("timeToFirstTokenMs", timings.get("time_to_first_token_ms"))
    usage = last.get("usage", {})
    prompt_tokens = usage.get("promptTokens", usage.get("prompt_tokens"))
    return text, float(ttft), prompt_tokens


def run_session(cli, addr, session, args):
    """One conversation, turn after turn; returns each turn's (TTFT, prompt tokens)."""
    opening, user_turns = session
    history = opening + "\n"
    results = []
    for user in user_turns:
        history += f"User: {user}\nAssistant:"
        answer, ttft, prompt_tokens = generate(cli, addr, history, args)
        results.append({"ttft_ms": ttft, "prompt_tokens": prompt_tokens})
        history += answer + "\n"
    return results


def run_level(cli, addr, sessions, args):
    with ThreadPoolExecutor(max_workers=len(sessions)) as pool:
        return list(pool.map(lambda s: run_session(cli, addr, s, args), sessions))


def stats(cli, addr):
    out = subprocess.run([cli, "--addr", f"http://{addr}", "stats", "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["models"][0]


def median(values):
    return statistics.median(values) if values else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="default: $TORCHWIRE_CACHE/<preset>-random")
    p.add_argument("--preset", default="agent-100m", help="make_random_checkpoint.py preset, when --checkpoint is missing")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--user-tokens", type=int, default=100)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-mib", type=int, default=1024)
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--bin-dir", default=os.path.join(REPO, "target", "release"))
    p.add_argument("--out", default=os.path.join(REPO, "bench-results"))
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if not args.checkpoint:
        cache = os.environ.get("TORCHWIRE_CACHE", os.path.expanduser("~/.cache/torchwire"))
        args.checkpoint = os.path.join(cache, f"{args.preset}-random")

    if not os.path.exists(os.path.join(args.checkpoint, "config.json")):
        log(f"making {args.preset} at {args.checkpoint}")
        subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_random_checkpoint.py"),
                        "--preset", args.preset, "--out", args.checkpoint, "--device", "cpu"], check=True)
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        shape = json.load(f)
    if shape["max_position_embeddings"] < args.max_context:
        raise SystemExit(f"{args.checkpoint} has {shape['max_position_embeddings']} positions, less than "
                         f"--max-context {args.max_context}: remake it (delete it) or lower --max-context")
    cli = os.path.join(args.bin_dir, "torchwire")
    server_bin = os.path.join(args.bin_dir, "torchwire-server")
    for b in (cli, server_bin):
        if not os.access(b, os.X_OK):
            raise SystemExit(f"{b} not found: build it with `cargo build --release --bins` (or pass --bin-dir)")
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tokens = Tokens(args.checkpoint)

    common = ["--model", args.checkpoint, "--model-name", "agent", "--threads", str(args.threads),
              "--max-batch-size", str(max(levels)), "--max-context", str(args.max_context)]
    servers = {}
    for name, mib in (("reuse", args.cache_mib), ("no reuse", 0)):
        log(f"starting the server with prefix_cache_mib = {mib}")
        servers[name] = ServerProcess(server_bin, common + ["--prefix-cache-mib", str(mib)],
                                      os.path.join(args.out, f"prefix-reuse-{stamp}-{mib}.log"))
        subprocess.run([cli, "--addr", f"http://{servers[name].addr}", "health", "--wait", "300"],
                       check=True, capture_output=True)
    try:
        # Warm-up: one short session on each.
        for name, server in servers.items():
            warm = make_sessions(tokens, argparse.Namespace(**{**vars(args), "turns": 2}), "warm", 1)
            run_level(cli, server.addr, warm, args)

        results = {name: {c: [] for c in levels} for name in servers}
        for trial in range(args.trials):
            for c in levels:
                sessions = make_sessions(tokens, args, trial, c)
                order = list(servers) if trial % 2 == 0 else list(servers)[::-1]
                for name in order:
                    t0 = time.monotonic()
                    got = run_level(cli, servers[name].addr, sessions, args)
                    results[name][c].extend(got)
                    last = [s[-1]["ttft_ms"] for s in got]
                    log(f"trial {trial + 1}/{args.trials} c={c} {name:8}: last-turn TTFT median "
                        f"{median(last):.0f} ms ({time.monotonic() - t0:.0f} s)")
        final_stats = {name: stats(cli, s.addr) for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()

    rows = []
    for c in levels:
        row = {"concurrency": c}
        for name in servers:
            sessions = results[name][c]
            row[name] = {
                "last_turn_ttft_ms": median([s[-1]["ttft_ms"] for s in sessions]),
                "first_turn_ttft_ms": median([s[0]["ttft_ms"] for s in sessions]),
                "last_turn_prompt_tokens": median([s[-1]["prompt_tokens"] for s in sessions]),
                "sessions": len(sessions),
            }
        row["ratio"] = row["reuse"]["last_turn_ttft_ms"] / row["no reuse"]["last_turn_ttft_ms"]
        rows.append(row)

    info = machine()
    print(f"\nprefix reuse, {args.turns} turns of ~{args.user_tokens} user + {args.output_tokens} output tokens, "
          f"{shape['num_hidden_layers']} layers x {shape['hidden_size']}, vocab {shape['vocab_size']}, "
          f"{args.threads} threads, {args.trials} trials; {info.get('cpu', '')}")
    print("| concurrency | turn-8 prompt tokens | TTFT turn 8, reuse (ms) | TTFT turn 8, no reuse (ms) | ratio | TTFT turn 1, reuse / no reuse (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['reuse']['last_turn_prompt_tokens']:.0f} | "
              f"{r['reuse']['last_turn_ttft_ms']:.0f} | {r['no reuse']['last_turn_ttft_ms']:.0f} | "
              f"{r['ratio']:.3f} | {r['reuse']['first_turn_ttft_ms']:.0f} / {r['no reuse']['first_turn_ttft_ms']:.0f} |")
    for name, s in final_stats.items():
        print(f"{name}: prefix cache hits {s.get('prefixCacheHits', 0)}, misses {s.get('prefixCacheMisses', 0)}, "
              f"tokens reused {s.get('prefixCacheTokensReused', 0)}, evictions {s.get('prefixCacheEvictions', 0)}, "
              f"bytes {s.get('prefixCacheBytes', 0)}, entries {s.get('prefixCacheEntries', 0)}")
    path = os.path.join(args.out, f"prefix-reuse-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"settings": vars(args), "shape": shape, "machine": info,
                   "rows": rows, "sessions": results, "stats": final_stats}, f, indent=1)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
