"""What a session costs: a chat turn with `session_id` (the server reads the
conversation from NATS and stores it back with the answer) against the same
turn with the whole history sent inline, the prefix cache off on the server,
so both turns do the same model work and the difference is the key-value
round trip.

    python scripts/session_bench.py [--model models/torchwire-tiny] [--sessions 16]
        [--turns 6] [--output-tokens 8] [--threads 2] [--bin-dir target/release]

Starts a real nats-server (JetStream, in a temporary directory) and one
torchwire-server with `--nats-url` and `--prefix-cache-mib 0`. Each session
alternates: a turn through the session, then the same conversation sent
inline with no session (the history taken from GetSession, so both render
to the same prompt token for token, checked), and for the next turn the
order flips. Each call is one unary ChatComplete on one open gRPC channel,
timed by the client. The table gives the median latency of each kind and the
median of the per-pair difference (session - inline): the session's load and
compare-and-set store. grpcio and grpcio-tools are installed into the venv
on first use (they are not needed by the test suite). Everything goes to
--out/session-bench-<time>.json.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_compare import REPO, ServerProcess, machine  # noqa: E402
from grpc_harness import Nats, grpc_stubs, wait_serving  # noqa: E402

USER_TEXTS = [
    "Read the build log and list the failing tests.",
    "Which of them failed on the last three runs?",
    "Open the newest failure and summarise the stack trace.",
    "Propose a fix for the first one.",
    "Write the patch as a unified diff.",
    "Now explain the risk of that change in two sentences.",
    "Retry the build with the patch applied.",
    "Report the result.",
]


def log(msg):
    print(f"[session-bench] {msg}", file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(REPO, "models/torchwire-tiny"))
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=6, help=f"turns per session (at most {len(USER_TEXTS)})")
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bin-dir", default=os.path.join(REPO, "target/release"))
    p.add_argument("--out", default=os.path.join(REPO, "bench-results"))
    args = p.parse_args()
    args.turns = min(args.turns, len(USER_TEXTS))
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tmp = tempfile.mkdtemp(prefix="session-bench-")
    pb, rpc = grpc_stubs(tmp)
    import grpc

    nats = Nats(tmp)
    server = ServerProcess(
        os.path.join(args.bin_dir, "torchwire-server"),
        ["--model", args.model, "--threads", str(args.threads), "--nats-url", nats.url(), "--prefix-cache-mib", "0"],
        os.path.join(args.out, f"session-bench-{stamp}.server.log"),
    )
    try:
        channel = grpc.insecure_channel(server.addr)
        grpc.channel_ready_future(channel).result(timeout=300)
        stub = rpc.InferenceStub(channel)
        wait_serving(stub, pb)
        options = pb.GenerationOptions(max_new_tokens=args.output_tokens, ignore_eos=True)

        def timed(request):
            start = time.perf_counter()
            response = stub.ChatComplete(request, timeout=120)
            return time.perf_counter() - start, response

        # Warm up: the first calls pay for connection and allocation.
        for i in range(3):
            timed(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="warm up")], options=options))
            timed(
                pb.ChatRequest(
                    messages=[pb.ChatMessage(role="user", content="warm up")],
                    options=options,
                    session_id=f"warm-{stamp}-{i}",
                )
            )
        pairs = []
        for s in range(args.sessions):
            sid = f"bench-{stamp}-{s}"
            history = []
            for t in range(args.turns):
                user = pb.ChatMessage(role="user", content=USER_TEXTS[t])
                session_req = pb.ChatRequest(session_id=sid, messages=[user], options=options)
                inline_req = pb.ChatRequest(messages=[*history, user], options=options)
                order = ["session", "inline"] if (s + t) % 2 == 0 else ["inline", "session"]
                got = {}
                for kind in order:
                    got[kind] = timed(session_req if kind == "session" else inline_req)
                (ts, rs), (ti, ri) = got["session"], got["inline"]
                if rs.usage.prompt_tokens != ri.usage.prompt_tokens:
                    raise SystemExit(
                        f"session {sid} turn {t}: prompts differ ({rs.usage.prompt_tokens} vs {ri.usage.prompt_tokens} tokens)"
                    )
                pairs.append(
                    {"session": sid, "turn": t + 1, "prompt_tokens": rs.usage.prompt_tokens, "session_s": ts, "inline_s": ti}
                )
                history = list(stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.messages)
        channel.close()
    finally:
        server.stop()
        nats.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    ms = lambda xs: round(statistics.median(xs) * 1000, 2)  # noqa: E731
    summary = {
        "pairs": len(pairs),
        "session_ms_p50": ms([p["session_s"] for p in pairs]),
        "inline_ms_p50": ms([p["inline_s"] for p in pairs]),
        "overhead_ms_p50": ms([p["session_s"] - p["inline_s"] for p in pairs]),
        "overhead_ms_p90": round(
            statistics.quantiles([p["session_s"] - p["inline_s"] for p in pairs], n=10)[8] * 1000, 2
        ),
    }
    report = {"machine": machine(), "args": vars(args), "summary": summary, "pairs": pairs}
    path = os.path.join(args.out, f"session-bench-{stamp}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"| pairs | turn with session p50 | same turn inline p50 | session - inline p50 | p90 |")
    print("|---|---|---|---|---|")
    print(
        f"| {summary['pairs']} | {summary['session_ms_p50']} ms | {summary['inline_ms_p50']} ms "
        f"| {summary['overhead_ms_p50']} ms | {summary['overhead_ms_p90']} ms |"
    )
    log(f"wrote {path}; CPU: {report['machine']['cpu']}")


if __name__ == "__main__":
    main()
