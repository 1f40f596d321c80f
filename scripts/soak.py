"""Soak: one torchwire-server on the bundled model under a mixed load for
--minutes, with its resident memory sampled all along.

    python scripts/soak.py [--minutes 10] [--streams 64] [--nats-streams 8]
        [--threads 2] [--bin-dir target/release] [--out bench-results]

Starts a real nats-server (JetStream) and torchwire-server with `--nats-url`.
--streams client threads each send one request after another over gRPC,
drawn at random: a streamed Generate read to the end, a stream cancelled by
the client after its first tokens, a Complete with a deadline too short to
finish, a request with a bad field (top_p 1.5, an unknown chat role, a
hostile session id), a stateless ChatComplete, and a turn of one of eight
shared sessions (turns of one session race: ABORTED is expected).
--nats-streams publishers do the same with GenerateRequests over the work
queue (nats-py), each waiting up to 60 s for its final response before
sending the next (later answers are counted as `nats_late`; at the end the
soak waits for every answer still due). Every outcome is
counted by gRPC status code; codes other than the expected ones for their
kind are listed as unexpected. The server's RSS (VmRSS of /proc/PID/status)
is sampled every --sample-secs: the report gives it at start (models loaded),
after the warm-up (--warmup-secs) and at the end, and the growth after the
warm-up (the target is under 5%). Writes --out/soak-<time>.json and prints a
Markdown summary for RELIABILITY.md.
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_compare import REPO, ServerProcess, machine  # noqa: E402
from grpc_harness import Nats, grpc_stubs, log as _log, wait_serving  # noqa: E402

# Kinds of gRPC request, their weights and the codes each may end with.
KINDS = {
    "stream": (30, {"OK"}),
    "cancel": (12, {"CANCELLED", "OK"}),
    "deadline": (10, {"DEADLINE_EXCEEDED", "OK"}),
    "bad_top_p": (5, {"INVALID_ARGUMENT"}),
    "bad_role": (4, {"INVALID_ARGUMENT"}),
    "bad_session": (3, {"INVALID_ARGUMENT"}),
    "chat": (16, {"OK"}),
    "session": (20, {"OK", "ABORTED"}),
}
# A full queue may refuse anything that would be queued.
QUEUED = {"stream", "cancel", "deadline", "chat", "session"}
WORDS = "the quick brown fox jumps over a lazy dog while the model keeps streaming tokens".split()


def log(msg):
    _log("soak", msg)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.codes = Counter()
        self.unexpected = Counter()

    def add(self, kind, code):
        expected = KINDS[kind][1] if kind in KINDS else {"OK"}
        if kind in QUEUED or kind in ("nats", "nats_late"):
            expected = expected | {"RESOURCE_EXHAUSTED"}
        with self.lock:
            self.codes[(kind, code)] += 1
            if code not in expected:
                self.unexpected[(kind, code)] += 1


def grpc_worker(pb, stub, grpc, tally, stop, seed):
    rng = random.Random(seed)
    names, weights = zip(*[(k, w) for k, (w, _) in KINDS.items()])

    def prompt():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24)))

    def msg(role, content):
        return pb.ChatMessage(role=role, content=content)

    while not stop.is_set():
        kind = rng.choices(names, weights)[0]
        code = "OK"
        try:
            if kind == "stream":
                for _ in stub.Generate(pb.GenerateRequest(prompt=prompt(), max_new_tokens=rng.randint(8, 64)), timeout=300):
                    pass
            elif kind == "cancel":
                call = stub.Generate(pb.GenerateRequest(prompt=prompt(), max_new_tokens=200, ignore_eos=True), timeout=300)
                for i, _ in enumerate(call):
                    if i >= 1:
                        call.cancel()
                        break
                code = "CANCELLED"
            elif kind == "deadline":
                stub.Complete(pb.GenerateRequest(prompt=prompt(), max_new_tokens=400, ignore_eos=True), timeout=0.05)
            elif kind == "bad_top_p":
                stub.Complete(pb.GenerateRequest(prompt=prompt(), top_p=1.5), timeout=60)
            elif kind == "bad_role":
                stub.ChatComplete(pb.ChatRequest(messages=[msg("wizard", prompt())]), timeout=60)
            elif kind == "bad_session":
                stub.ChatComplete(pb.ChatRequest(messages=[msg("user", "hi")], session_id="x\r\nInjected: 1"), timeout=60)
            elif kind == "chat":
                stub.ChatComplete(
                    pb.ChatRequest(
                        messages=[msg("system", "Be brief."), msg("user", prompt())],
                        options=pb.GenerationOptions(max_new_tokens=rng.randint(4, 32)),
                    ),
                    timeout=300,
                )
            elif kind == "session":
                # Truncation keeps long-lived sessions within the context.
                stub.ChatComplete(
                    pb.ChatRequest(
                        messages=[msg("user", prompt())],
                        session_id=f"soak-{rng.randint(0, 7)}",
                        truncate_history=True,
                        options=pb.GenerationOptions(max_new_tokens=16),
                    ),
                    timeout=300,
                )
        except grpc.RpcError as e:
            code = e.code().name
        tally.add(kind, code)


def run_nats(url, pb, tally, stop, count, codes_by_number):
    """`count` publishers of GenerateRequests, each waiting up to 60 s for
    the final answer before it sends the next; an answer that comes later
    (the replica takes queue work only into free batch slots, so a gRPC
    flood holds it back) is counted as `nats_late`. After `stop`, waits up to
    240 s for every answer still due; what never comes is NO_ANSWER."""
    import nats

    async def main():
        nc = await nats.connect(url)
        js = nc.jetstream()
        due = {}  # reply subject -> future of its final code
        overdue = set()

        async def on_reply(m):
            if (m.headers or {}).get("Torchwire-Final") != "true":
                return
            resp = pb.GenerateResponse.FromString(m.data)
            code = codes_by_number.get(resp.error.code, "OK") if resp.HasField("error") else "OK"
            fut = due.pop(m.subject, None)
            if fut is not None and not fut.done():
                fut.set_result(code)
            elif m.subject in overdue:
                overdue.discard(m.subject)
                tally.add("nats_late", code)

        await nc.subscribe("replies.soak.>", cb=on_reply)
        await nc.flush()

        async def publisher(seed):
            rng = random.Random(seed)
            n = 0
            while not stop.is_set():
                n += 1
                reply = f"replies.soak.{seed}.{n}"
                req = pb.GenerateRequest(
                    prompt=" ".join(rng.choice(WORDS) for _ in range(8)), max_new_tokens=rng.randint(8, 48)
                )
                fut = asyncio.get_running_loop().create_future()
                due[reply] = fut
                try:
                    await js.publish(
                        "torchwire.generate",
                        req.SerializeToString(),
                        headers={"Torchwire-Reply-To": reply, "Torchwire-Request-Id": f"soak-{seed}-{n}"},
                    )
                except Exception as e:  # noqa: BLE001 - a refused publish is an outcome
                    due.pop(reply, None)
                    tally.add("nats", f"PUBLISH_FAILED ({type(e).__name__})")
                    continue
                try:
                    tally.add("nats", await asyncio.wait_for(asyncio.shield(fut), 60))
                except asyncio.TimeoutError:
                    if due.pop(reply, None) is not None:
                        overdue.add(reply)

        await asyncio.gather(*(publisher(1000 + i) for i in range(count)))
        deadline = time.monotonic() + 240
        while overdue and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        for _ in overdue:
            tally.add("nats", "NO_ANSWER")
        await nc.drain()

    asyncio.run(main())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(REPO, "models/torchwire-tiny"))
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--warmup-secs", type=float, default=60)
    p.add_argument("--sample-secs", type=float, default=5)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--nats-streams", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--bin-dir", default=os.path.join(REPO, "target/release"))
    p.add_argument("--out", default=os.path.join(REPO, "bench-results"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tmp = tempfile.mkdtemp(prefix="soak-")
    pb, rpc = grpc_stubs(tmp)
    import grpc

    codes_by_number = {c.value[0]: c.name for c in grpc.StatusCode}
    nats = Nats(tmp)
    server = ServerProcess(
        os.path.join(args.bin_dir, "torchwire-server"),
        ["--model", args.model, "--threads", str(args.threads), "--nats-url", nats.url(),
         "--max-batch-size", str(args.max_batch_size)],
        os.path.join(args.out, f"soak-{stamp}.server.log"),
    )
    pid = server.proc.pid
    samples = []
    tally = Tally()
    stop = threading.Event()
    try:
        channel = grpc.insecure_channel(server.addr)
        grpc.channel_ready_future(channel).result(timeout=300)
        stub = rpc.InferenceStub(channel)
        wait_serving(stub, pb)
        start = time.monotonic()
        samples.append((0.0, rss_kib(pid)))
        log(f"server pid {pid}, RSS at start {samples[0][1] / 1024:.1f} MiB; {args.streams} gRPC + {args.nats_streams} NATS streams for {args.minutes} min")
        workers = [
            threading.Thread(target=grpc_worker, args=(pb, stub, grpc, tally, stop, i), daemon=True)
            for i in range(args.streams)
        ]
        workers.append(
            threading.Thread(target=run_nats, args=(nats.url(), pb, tally, stop, args.nats_streams, codes_by_number), daemon=True)
        )
        for w in workers:
            w.start()
        end = start + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(args.sample_secs)
            if server.proc.poll() is not None:
                raise SystemExit(f"the server exited with {server.proc.returncode} during the soak")
            samples.append((round(time.monotonic() - start, 1), rss_kib(pid)))
            done = sum(tally.codes.values())
            log(f"{samples[-1][0]:>6.0f} s  RSS {samples[-1][1] / 1024:7.1f} MiB  requests {done}  unexpected {sum(tally.unexpected.values())}")
        stop.set()
        for w in workers:
            w.join(timeout=330)
        samples.append((round(time.monotonic() - start, 1), rss_kib(pid)))
        channel.close()
    finally:
        stop.set()
        server.stop()
        nats.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    warm = [kib for t, kib in samples if t >= args.warmup_secs]
    warm_rss = warm[0] if warm else samples[-1][1]
    end_rss = samples[-1][1]
    by_code = Counter()
    for (_, code), n in tally.codes.items():
        by_code[code] += n
    report = {
        "machine": machine(),
        "args": vars(args),
        "requests": sum(tally.codes.values()),
        "by_kind_and_code": {f"{k}/{c}": n for (k, c), n in sorted(tally.codes.items())},
        "by_code": dict(by_code.most_common()),
        "unexpected": {f"{k}/{c}": n for (k, c), n in sorted(tally.unexpected.items())},
        "rss_mib": {
            "start": round(samples[0][1] / 1024, 1),
            "after_warmup": round(warm_rss / 1024, 1),
            "end": round(end_rss / 1024, 1),
            "max": round(max(k for _, k in samples) / 1024, 1),
            "median_after_warmup": round(statistics.median(warm or [end_rss]) / 1024, 1),
        },
        "rss_growth_after_warmup_pct": round((end_rss - warm_rss) / warm_rss * 100, 2),
        "samples": samples,
    }
    path = os.path.join(args.out, f"soak-{stamp}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    r = report["rss_mib"]
    print(f"requests: {report['requests']} in {args.minutes} min; by code: "
          + ", ".join(f"{c} {n}" for c, n in report["by_code"].items()))
    print("unexpected: " + (", ".join(f"{k} {n}" for k, n in report["unexpected"].items()) or "none"))
    print(f"RSS: start {r['start']} MiB, after warm-up {r['after_warmup']} MiB, end {r['end']} MiB, "
          f"max {r['max']} MiB; growth after warm-up {report['rss_growth_after_warmup_pct']}%")
    log(f"wrote {path}; CPU: {report['machine']['cpu']}")
    if report["unexpected"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
