"""Server thread settings alone and beside busy processes on the same cores.

    python scripts/contention_bench.py [--setting NAME ...] [--competitors 0,1]
        [--trials 3] [--rounds 3] [--concurrency 1,16] [--prompt-tokens 32]
        [--output-tokens 128] [--model models/torchwire-tiny]
        [--server-arg FLAG ...] [--bin-dir target/release]

A server whose OpenMP threads spin while they wait for work, and that has
more of them than the CPUs it really gets, stalls whenever another process
holds one of those CPUs (a neighbour on the node, or the throttling of a CPU
quota). This measures how much each server setting loses to that.

For every trial, every setting and every condition (0 competitors = alone;
N = N busy processes, each a Python loop spinning on one core, at this
script's nice level and not pinned), it starts torchwire-server on the model
with the setting's environment and flags (plus --max-batch-size of the
highest concurrency and every --server-arg), waits for ListModels, starts the
competitors, runs `torchwire bench --concurrency 1,16` (one gRPC stream per
request, greedy, EOS ignored, tokens timed as they arrive), then kills the
competitors and stops the server. OpenMP, GOMP, KMP and TORCHWIRE_THREADS
variables of this shell are not passed on, so each setting gets only its own.

Trials interleave everything: the order of the settings rotates from trial to
trial and the order of the conditions alternates, so drift on a shared
machine hits all cells alike. Per cell the best and the median trial are
reported (output tok/s, and TPOT p50: the median time per output token after
the first). The slowdown is alone / contended tok/s per setting and
concurrency (best over best, medians in brackets); a setting meets the goal
when it is at most --max-slowdown (2x) slower with the competitors and its
speed alone is within --near-best (10%) of the best setting's alone.

Built-in settings (--setting NAME, repeatable; default: threads2,
threads2-fixed, threads2-passive, threads1):

    auto               no --threads: the server's default, the CPUs its
                       affinity mask and cgroup CPU quota allow
    threads2           --threads 2, OpenMP's defaults (active waiting), the
                       thread governor on (the server's default)
    threads2-fixed     the same with --adaptive-threads=false
    threads2-passive   --threads 2, OMP_WAIT_POLICY=PASSIVE
    threads2-spin10k   --threads 2, GOMP_SPINCOUNT=10000
    threads2-spin100k  --threads 2, GOMP_SPINCOUNT=100000
    threads1           --threads 1

A setting of your own: --setting 'NAME=ENV...:FLAGS...', e.g.
--setting 'spin1k=GOMP_SPINCOUNT=1000 OMP_PROC_BIND=false:--threads 2'
(environment assignments separated by spaces, then a colon, then the server
flags; either part may be empty).

Prints a Markdown table and writes everything (settings, every trial, the
machine, the CPU budget of this process, load averages before and after) to
--out/contention-<time>.json (default bench-results/, git-ignored), next to
each run's `torchwire bench` JSON and server log.
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_compare import REPO, ServerProcess, machine, markdown_table  # noqa: E402


def log(msg):
    print(f"[contention] {msg}", file=sys.stderr, flush=True)


@dataclass
class Setting:
    name: str
    env: dict = field(default_factory=dict)
    flags: list = field(default_factory=list)

    def describe(self):
        parts = [f"{k}={v}" for k, v in self.env.items()] + self.flags
        return " ".join(parts) or "(server defaults)"


BUILT_IN = {
    "auto": Setting("auto"),
    "threads2": Setting("threads2", {}, ["--threads", "2"]),
    "threads2-fixed": Setting("threads2-fixed", {}, ["--threads", "2", "--adaptive-threads=false"]),
    "threads2-passive": Setting("threads2-passive", {"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", "2"]),
    "threads2-spin10k": Setting("threads2-spin10k", {"GOMP_SPINCOUNT": "10000"}, ["--threads", "2"]),
    "threads2-spin100k": Setting("threads2-spin100k", {"GOMP_SPINCOUNT": "100000"}, ["--threads", "2"]),
    "threads1": Setting("threads1", {}, ["--threads", "1"]),
}
DEFAULT_SETTINGS = ["threads2", "threads2-fixed", "threads2-passive", "threads1"]

# Variables of this shell that would change every setting: not passed on.
STRIPPED_ENV = re.compile(r"^(OMP_|GOMP_|KMP_|TORCHWIRE_THREADS$)")

BUSY_LOOP = "while True: pass"


def parse_setting(spec, parser):
    """A built-in name, or 'NAME=ENV...:FLAGS...'."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    name, eq, rest = spec.partition("=")
    if not eq or not name or name in BUILT_IN:
        parser.error(f"--setting: expected one of {', '.join(BUILT_IN)} or NAME=ENV...:FLAGS..., got {spec!r}")
    env_part, _, flags_part = rest.partition(":")
    env = {}
    for item in env_part.split():
        key, eq, value = item.partition("=")
        if not eq or not key:
            parser.error(f"--setting {name}: {item!r} is not VAR=VALUE (put server flags after a colon)")
        env[key] = value
    return Setting(name, env, shlex.split(flags_part))


def condition_name(competitors):
    return "alone" if competitors == 0 else f"+{competitors} busy"


# ---------------------------------------------------------------------------
# The machine


def cpu_seconds(pid):
    """User + system CPU seconds of a process (all its threads) so far, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lscpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), None)


def cpu_budget():
    """The CPUs this process may use: its affinity mask and its cgroup (v2) CPU quota."""
    budget = {"affinity": len(os.sched_getaffinity(0)), "online": os.cpu_count()}
    try:
        with open("/proc/self/cgroup") as f:
            path = next(line.split("::", 1)[1].strip() for line in f if line.startswith("0::"))
        with open(f"/sys/fs/cgroup{path}/cpu.max") as f:
            quota, period = f.read().split()
        budget["cgroup_cpu_max"] = f"{quota} {period}"
        if quota != "max":
            budget["cgroup_cpus"] = int(quota) / int(period)
    except (OSError, StopIteration, ValueError):
        pass
    return budget


class Competitors:
    """`n` processes spinning one core each; stop() says how much CPU they got."""

    def __init__(self, n):
        self.procs = [subprocess.Popen([sys.executable, "-S", "-c", BUSY_LOOP], stdin=subprocess.DEVNULL)
                      for _ in range(n)]
        self.started = time.monotonic()

    def stop(self):
        """Kills them; returns each one's CPU share (CPU seconds / wall seconds)."""
        wall = time.monotonic() - self.started
        shares = []
        for p in self.procs:
            cpu = cpu_seconds(p.pid)
            shares.append(None if cpu is None or wall <= 0 else round(cpu / wall, 3))
            p.kill()
            p.wait()
        return shares


# ---------------------------------------------------------------------------
# One run: a server with one setting, under one condition


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def server_threads(log_path):
    """threads, usable_cpus and online_cpus from the server's start-up line."""
    try:
        with open(log_path) as f:
            text = ANSI.sub("", f.read())
    except OSError:
        return {}
    line = next((l for l in text.splitlines() if "usable_cpus" in l), "")
    return {k: int(v) for k, v in re.findall(r"\b(threads|usable_cpus|online_cpus)=(\d+)", line)}


def server_env(setting):
    env = {k: v for k, v in os.environ.items() if not STRIPPED_ENV.match(k)}
    env.update(setting.env)
    return env


def run_cell(args, setting, competitors, trial, stamp):
    """Starts the server, loads it with `torchwire bench` beside `competitors`
    busy processes, stops everything; returns the levels and what was seen."""
    tag = f"contention-{stamp}-t{trial}-{setting.name}-busy{competitors}"
    log_path = os.path.join(args.out, f"{tag}.log")
    json_path = os.path.join(args.out, f"{tag}.json")
    flags = ["--model", args.model]
    if not any(f.split("=", 1)[0] == "--max-batch-size" for f in setting.flags + args.server_arg):
        flags += ["--max-batch-size", str(max(args.concurrency))]
    flags += setting.flags + args.server_arg
    cli = os.path.join(args.bin_dir, "torchwire")
    t0 = time.monotonic()
    server = ServerProcess(os.path.join(args.bin_dir, "torchwire-server"), flags, log_path, env=server_env(setting))
    try:
        url = f"http://{server.addr}"
        subprocess.run([cli, "--addr", url, "health", "--wait", "300"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([cli, "--addr", url, "models", "--json"], check=True, stdout=subprocess.DEVNULL)
        started_s = time.monotonic() - t0
        busy = Competitors(competitors)
        try:
            cpu0, b0 = cpu_seconds(server.proc.pid), time.monotonic()
            subprocess.run([
                cli, "--addr", url, "bench",
                "--concurrency", ",".join(map(str, args.concurrency)),
                "--rounds", str(args.rounds),
                "--warmup", str(args.warmup),
                "--prompt-tokens", str(args.prompt_tokens),
                "--output-tokens", str(args.output_tokens),
                "--temperature", "0",
                "--label", f"{setting.name}, {condition_name(competitors)}, trial {trial}",
                "--json", json_path,
                "--no-progress",
            ], check=True, stdout=subprocess.DEVNULL)
            cpu1, bench_s = cpu_seconds(server.proc.pid), time.monotonic() - b0
        finally:
            shares = busy.stop()
    finally:
        server.stop()
    with open(json_path) as f:
        report = json.load(f)
    levels = [{
        "concurrency": lvl["load"]["concurrency"],
        "output_tokens_per_s": lvl["output_tokens_per_s"],
        "tpot_ms_p50": (lvl.get("tpot_ms") or {}).get("p50"),
        "ttft_ms_p50": (lvl.get("ttft_ms") or {}).get("p50"),
    } for lvl in report["levels"]]
    return {
        "trial": trial,
        "setting": setting.name,
        "competitors": competitors,
        "levels": levels,
        "server": server_threads(log_path),
        "server_cpu_per_s": None if None in (cpu0, cpu1) else round((cpu1 - cpu0) / bench_s, 3),
        "competitor_cpu_shares": shares,
        "start_s": round(started_s, 2),
        "bench_s": round(bench_s, 2),
        "files": [os.path.basename(json_path), os.path.basename(log_path)],
    }


# ---------------------------------------------------------------------------
# Summary


def summarize(runs, setting, competitors, concurrency):
    """Best and median trial of one cell."""
    levels = [lvl for r in runs if r["setting"] == setting and r["competitors"] == competitors
              for lvl in r["levels"] if lvl["concurrency"] == concurrency]
    if not levels:
        return None
    best = max(levels, key=lambda lvl: lvl["output_tokens_per_s"])
    tpots = [lvl["tpot_ms_p50"] for lvl in levels if lvl["tpot_ms_p50"] is not None]
    return {
        "output_tokens_per_s": best["output_tokens_per_s"],
        "tpot_ms_p50": best["tpot_ms_p50"],
        "median_output_tokens_per_s": statistics.median(lvl["output_tokens_per_s"] for lvl in levels),
        "median_tpot_ms_p50": statistics.median(tpots) if tpots else None,
        "trials": [lvl["output_tokens_per_s"] for lvl in levels],
    }


def compare(args, runs):
    """One row per setting and concurrency: every condition, the slowdowns and the goals."""
    rows = []
    for c in args.concurrency:
        alone = {s.name: summarize(runs, s.name, 0, c) for s in args.settings}
        best_alone = max((a["output_tokens_per_s"] for a in alone.values() if a), default=None)
        for s in args.settings:
            row = {"setting": s.name, "concurrency": c,
                   "conditions": {n: summarize(runs, s.name, n, c) for n in args.competitors}}
            a = alone[s.name]
            if a and best_alone:
                row["of_best_alone"] = a["output_tokens_per_s"] / best_alone
                row["near_best"] = row["of_best_alone"] >= 1 - args.near_best
            row["slowdown"] = {}
            for n in args.competitors:
                b = row["conditions"][n]
                if n == 0 or not a or not b:
                    continue
                row["slowdown"][n] = {
                    "best": a["output_tokens_per_s"] / b["output_tokens_per_s"],
                    "median": a["median_output_tokens_per_s"] / b["median_output_tokens_per_s"],
                }
                row["slowdown"][n]["meets"] = row["slowdown"][n]["best"] <= args.max_slowdown
            rows.append(row)
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(args, rows):
    head = ["setting", "c"]
    for n in args.competitors:
        head += [f"tok/s {condition_name(n)}", f"TPOT p50 ms {condition_name(n)}"]
    head += [f"slowdown {condition_name(n)}" for n in args.competitors if n]
    if 0 in args.competitors:
        head.append("alone vs best alone")
    lines = [head]
    for r in rows:
        line = [r["setting"], str(r["concurrency"])]
        for n in args.competitors:
            cell = r["conditions"][n] or {}
            line += [f"{fmt(cell.get('output_tokens_per_s'), ',.0f')} ({fmt(cell.get('median_output_tokens_per_s'), ',.0f')})",
                     f"{fmt(cell.get('tpot_ms_p50'), '.2f')} ({fmt(cell.get('median_tpot_ms_p50'), '.2f')})"]
        for n in args.competitors:
            if not n:
                continue
            sd = r["slowdown"].get(n)
            line.append("-" if not sd else
                        f"{sd['best']:.2f}x ({sd['median']:.2f}x) " + ("ok" if sd["meets"] else "MISSED"))
        if 0 in args.competitors:
            of = r.get("of_best_alone")
            line.append("-" if of is None else
                        ("best" if of >= 1 else f"{100 * (of - 1):+.0f}%") + (" ok" if r["near_best"] else " MISSED"))
        lines.append(line)
    return markdown_table(lines)


def verdict(args, rows):
    """Settings that meet both goals at every concurrency."""
    good = []
    for s in args.settings:
        mine = [r for r in rows if r["setting"] == s.name]
        if mine and all(r.get("near_best") and r["slowdown"] and all(sd["meets"] for sd in r["slowdown"].values())
                        for r in mine):
            good.append(s.name)
    return good


def main():
    p = argparse.ArgumentParser(description="torchwire-server thread settings alone and beside busy processes",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="built-in settings: " + ", ".join(f"{s.name} ({s.describe()})"
                                                                         for s in BUILT_IN.values()))
    p.add_argument("--setting", action="append", default=[],
                   help="a built-in setting, or NAME=ENV...:FLAGS... (repeatable; default: "
                        + ", ".join(DEFAULT_SETTINGS) + ")")
    p.add_argument("--competitors", default="0,1",
                   help="conditions: busy processes beside the server, e.g. 0,1,2 (0 = alone)")
    p.add_argument("--model", default=os.path.join(REPO, "models", "torchwire-tiny"), help="checkpoint directory")
    p.add_argument("--trials", type=int, default=3, help="interleaved trials of every setting and condition")
    p.add_argument("--rounds", type=int, default=3, help="requests per level and trial = rounds x concurrency")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the first level of every run")
    p.add_argument("--concurrency", default="1,16", help="closed-loop levels of `torchwire bench`")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--max-slowdown", type=float, default=2.0,
                   help="goal: alone / contended tok/s at most this")
    p.add_argument("--near-best", type=float, default=0.10,
                   help="goal: tok/s alone within this fraction of the best setting's alone")
    p.add_argument("--bin-dir", default=os.path.join(REPO, "target", "release"), help="where torchwire and torchwire-server are")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra torchwire-server flag for every setting (repeatable), e.g. --server-arg=--quantize=int8")
    p.add_argument("--out", default=os.path.join(REPO, "bench-results"), help="results directory")
    args = p.parse_args()
    args.settings = [parse_setting(s, p) for s in (args.setting or DEFAULT_SETTINGS)]
    if len({s.name for s in args.settings}) < len(args.settings):
        p.error("--setting: two settings have the same name")
    args.competitors = sorted({int(n) for n in args.competitors.split(",")})
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.model = os.path.abspath(args.model)
    for b in ("torchwire", "torchwire-server"):
        if not os.access(os.path.join(args.bin_dir, b), os.X_OK):
            p.error(f"{os.path.join(args.bin_dir, b)} not found: build it with `cargo build --release --workspace --bins`")
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load_before[0]:.2f} before the run; other work on this machine will skew the numbers")
    began = time.monotonic()
    runs = []
    for trial in range(1, args.trials + 1):
        k = (trial - 1) % len(args.settings)
        for i, setting in enumerate(args.settings[k:] + args.settings[:k]):
            conditions = args.competitors if (trial + i) % 2 else args.competitors[::-1]
            for n in conditions:
                run = run_cell(args, setting, n, trial, stamp)
                runs.append(run)
                log(f"trial {trial}/{args.trials}, {setting.name}, {condition_name(n)}: " + ", ".join(
                    f"c={lvl['concurrency']} {lvl['output_tokens_per_s']:,.0f} tok/s" for lvl in run["levels"])
                    + f" (server threads {run['server'].get('threads', '?')}, competitors' CPU {run['competitor_cpu_shares']})")
    wall_s = time.monotonic() - began
    rows = compare(args, runs)
    good = verdict(args, rows)

    summary = {
        "when": stamp,
        "wall_s": round(wall_s, 1),
        "machine": {**machine(), "lscpu_model": lscpu_model(), "cpu_budget": cpu_budget(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "settings": {
            "model": os.path.relpath(args.model, REPO) if args.model.startswith(REPO) else args.model,
            "server_settings": [{**asdict(s), "describe": s.describe()} for s in args.settings],
            "competitors": args.competitors,
            "competitor": [os.path.basename(sys.executable), "-S", "-c", BUSY_LOOP],
            "server_arg": args.server_arg,
            "concurrency": args.concurrency,
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "trials": args.trials,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "max_slowdown": args.max_slowdown,
            "near_best": args.near_best,
        },
        "runs": runs,
        "rows": rows,
        "meets_both_goals": good,
    }
    path = os.path.join(args.out, f"contention-{stamp}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)

    m = summary["machine"]
    print()
    print(f"{os.path.basename(args.model)}: {args.prompt_tokens} prompt + {args.output_tokens} output tokens, greedy; "
          f"{m['lscpu_model'] or m['cpu']} ({m['cores']} cores, {m['cpu_budget']['affinity']} usable); "
          f"load average {load_before[0]:.2f} before, {m['loadavg_after'][0]:.2f} after")
    for s in args.settings:
        print(f"  {s.name}: {s.describe()}" + (f" {' '.join(args.server_arg)}" if args.server_arg else ""))
    print(f"best (median) of {args.trials} interleaved trials, {args.rounds} x c requests per level; "
          f"a busy process spins one core; goals: at most {args.max_slowdown:g}x slower beside it, "
          f"within {100 * args.near_best:.0f}% of the best alone")
    print()
    print(table(args, rows))
    print()
    print(f"meeting both goals: {', '.join(good) or 'none'}")
    print(f"took {wall_s / 60:.1f} min; wrote {path}")


if __name__ == "__main__":
    main()
