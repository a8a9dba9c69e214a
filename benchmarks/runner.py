"""
``python -m benchmarks``: runs every scenario and baseline, each in a fresh process, and reports.

The exit status is 0 if every scenario ran and every delivery verified, 1 if a delivery failed
verification, and 2 if a scenario crashed or timed out. Speed never changes the exit status:
the targets are reported as met or missed, nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks._harness import event_bytes, machine

EXIT_OK = 0
EXIT_UNVERIFIED = 1
EXIT_CRASHED = 2


def _sizes(quick: bool) -> dict[str, Any]:
    """How big each scenario is, in quick and in full mode."""
    if quick:
        return {
            "throughput": 100_000,
            "send_only": 100_000,
            "sqlite_rows": 100_000,
            "latency": 200,
            "drain": 200_000,
            # Large enough for the probes even at FASTEST_DRAIN (see the loaded scenario).
            "loaded": 500_000,
            "memory_pending": 100_000,
            # In quick mode the down targets retry after 60 s instead of 2 s, so that the run is
            # not spent probing 5,000 dead targets; full mode keeps the default backoff.
            "memory_down_backoff": 60.0,
            "scale_10k": 10_000,
            "scale_small": 1_000,
            "fanout": 10_000,
            "fair_targets": 2_000,
            "fair_seconds": 8.0,
            "timeout": 120,
        }
    return {
        "throughput": 1_000_000,
        "send_only": 500_000,
        "sqlite_rows": 1_000_000,
        "latency": 2_000,
        "drain": 1_000_000,
        "loaded": 1_000_000,
        "memory_pending": 1_000_000,
        "memory_down_backoff": None,
        "scale_10k": 1_000_000,
        "scale_small": 200_000,
        "fanout": 100_000,
        "fair_targets": 10_000,
        "fair_seconds": 20.0,
        "timeout": 900,
    }


#: Events per second: faster than any machine drains the loaded scenario's backlog. The quick
#: backlog must last, draining at this pace, for its warm-up and its fewest probes: at 200k
#: events it was gone after 91 probes on a fast 2-core machine (the drain went at 128k
#: events/s; the send-only baseline, the transport's ceiling, at 480k).
FASTEST_DRAIN = 400_000

#: What ``--only`` takes: a scenario, a single run of one, or postgres.
ONLY_CHOICES = (
    "throughput",
    "throughput_encoded",
    "send_only",
    "sqlite_insert",
    "latency",
    "loaded",
    "drain",
    "memory",
    "scale",
    "scale_1",
    "scale_100",
    "scale_10000",
    "fanout",
    "fanout_1",
    "fanout_10",
    "listing",
    "listing_100k",
    "listing_1m",
    "fair",
    "postgres",
    "pg_throughput",
)

#: The fan-out scenario's target counts: its figures, and the same bytes stored per event
#: with a single target, to show that they do not grow with the number of targets.
FANOUT_TARGETS = (10, 1)

#: The fairness scenario's share of targets that fail and recover, its offered load (events per
#: second, spread over every target), the seconds of load before healthy events are timed, and
#: the failing targets' cycle: seconds failing, then seconds accepting.
FAIR_FAILING = 0.2
FAIR_RATE = 150
FAIR_WARMUP = 2.0
FAIR_CYCLE = (2.0, 2.0)

#: The listing scenario's sizes, in quick mode as in full mode: the events of one target, all
#: listed; their peak RSS must not grow from one size to the next.
LISTING_EVENTS = (100_000, 1_000_000)

#: The events on a page of the listing scenario: Scheduler.MAX_EVENTS_PAGE.
LISTING_PAGE = 1000

#: The dead letters on a page of the listing scenario's dead-letter listing: each holds its
#: events' bytes, ``batch`` of them, so a page holds 10 transactions of events.
LISTING_DEAD_PAGE = 10


def size_suffix(n: int) -> str:
    """``100k`` for 100,000, ``1m`` for 1,000,000: how keys name a listing's size."""
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def plan(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """The runs to make: ``(key, scenario, params)``, in order."""
    size = _sizes(args.quick)
    common = {
        "synchronous": args.synchronous,
        "batch": args.batch,
        "chunk": args.chunk,
        "window": args.window,
        "submit_mode": args.submit_mode,
        "db_dir": args.db_dir,
        "gc_freeze": args.gc_freeze,
    }
    tp = {**common, "targets": 10, "events": size["throughput"]}
    lat = {**common, "events": size["latency"], "warmup": 20, "gap": 0.002}
    runs: list[tuple[str, str, dict[str, Any]]] = []
    for i in range(args.repeat):
        # The baseline and relayer's throughput alternate, so that both see the same load.
        runs.append((f"send_only#{i}", "send_only", {**tp, "events": size["send_only"]}))
        runs.append((f"throughput#{i}", "throughput", tp))
        if getattr(args, "postgres", None):
            # The same scenario on PostgreSQL, beside SQLite's runs: see pg_vs_sqlite.
            runs.append((f"pg_throughput#{i}", "pg_throughput", {**tp, "database": args.postgres}))
    for i in range(args.repeat):
        # The same, with each event submitted as its JSON bytes (checked, not encoded).
        runs.append((f"throughput_encoded#{i}", "throughput", {**tp, "encoded": True}))
    rows = {**common, "events": size["sqlite_rows"], "commits": 500}
    runs.append(("sqlite_insert", "sqlite_insert", rows))
    runs.append(("latency", "latency", lat))
    # Latency under load: single events to an idle target, 5 ms apart, while another target
    # drains a backlog; the probes stop before the backlog is gone.
    loaded = {**common, "events": size["loaded"], "warmup": 20, "probes": 5000, "gap": 0.005}
    runs.append(("loaded", "loaded", loaded))
    runs.append(("drain", "drain", {**common, "events": size["drain"]}))
    memory = {**common, "targets": 10_000, "pending": size["memory_pending"]}
    if size["memory_down_backoff"]:
        memory["down_backoff"] = size["memory_down_backoff"]
    runs.append(("memory", "memory", memory))
    # Every target count sends transactions of the same size: what 10k targets get from the
    # events given to them.
    scale_batch = max(1, min(args.batch, size["scale_10k"] // 10_000))
    for n in (1, 100, 10_000):
        events = size["scale_10k"] if n == 10_000 else size["scale_small"]
        scale = {**common, "targets": n, "events": events, "batch": scale_batch}
        runs.append((f"scale_{n}", "scale", scale))
    for n in FANOUT_TARGETS:
        runs.append((f"fanout_{n}", "fanout", {**common, "targets": n, "events": size["fanout"]}))
    for n in LISTING_EVENTS:
        listing = {
            **common,
            "events": n,
            "limit": LISTING_PAGE,
            "dead_letters": True,
            "dead_limit": LISTING_DEAD_PAGE,
            "child_timeout": size["timeout"],
        }
        runs.append((f"listing_{size_suffix(n)}", "listing", listing))
    fair = {
        **common,
        "targets": size["fair_targets"],
        "flaky_names": FAIR_FAILING,
        "rate": FAIR_RATE,
        "seconds": size["fair_seconds"],
        "warmup": FAIR_WARMUP,
        "down_s": FAIR_CYCLE[0],
        "up_s": FAIR_CYCLE[1],
    }
    # The baseline first, then the same with a fifth of the targets failing and recovering.
    runs.append(("fair_baseline", "fair", {**fair, "failing": 0.0}))
    runs.append(("fair", "fair", {**fair, "failing": FAIR_FAILING}))
    if args.compare_sync:
        # The other synchronous setting than the main runs'.
        other = "FULL" if args.synchronous != "FULL" else "NORMAL"
        runs.append((f"throughput_{other}", "throughput", {**tp, "synchronous": other}))
        runs.append((f"latency_{other}", "latency", {**lat, "synchronous": other}))
        runs.append((f"sqlite_insert_{other}", "sqlite_insert", {**rows, "synchronous": other}))
    if args.only:
        runs = [r for r in runs if r[1] in args.only or r[0].split("#")[0] in args.only]
    return runs


def _cpu_busy() -> float:
    """Seconds of CPU time the whole machine has been busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(
    key: str, scenario: str, params: dict[str, Any], timeout: float, log_dir: str
) -> dict[str, Any]:
    """Run one scenario in a fresh process; return its result, with how loaded the machine was."""
    params = {**params, "log": os.path.join(log_dir, f"{key.replace('#', '-')}.log")}
    busy0, ours0, t0 = _cpu_busy(), _children_cpu(), time.monotonic()
    load0 = os.getloadavg()[0]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks._run", scenario, json.dumps(params)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"crashed": f"timed out after {timeout:g}s", "problems": []}
    wall = time.monotonic() - t0
    busy, ours = _cpu_busy() - busy0, _children_cpu() - ours0
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        return {"crashed": f"exit status {done.returncode}", "output": tail, "problems": []}
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = wall
    # What the rest of the machine used meanwhile, in cores (2.0 is all of a 2-core machine).
    result["other_load_cores"] = max(0.0, (busy - ours) / wall) if wall > 0 else None
    result["load_average"] = round((load0 + os.getloadavg()[0]) / 2, 2)
    return result


def _median(results: list[dict[str, Any]], field: str) -> float:
    return statistics.median(r[field] for r in results)


#: (label, key in the summary, format, target, met(value, summary))
_TARGETS: list[tuple[str, str, str, str, Callable[[float, dict[str, Any]], bool]]] = [
    (
        "throughput (10 targets)",
        "throughput_events_per_s",
        "{:,.0f} ev/s",
        ">= 100,000 ev/s",
        lambda v, s: v >= 100_000,
    ),
    ("  vs send-only", "throughput_vs_send_only", "{:.0%}", ">= 60%", lambda v, s: v >= 0.6),
    ("latency p50", "latency_p50_ms", "{:.2f} ms", "<= 3 ms", lambda v, s: v <= 3),
    ("latency p99", "latency_p99_ms", "{:.2f} ms", "<= 15 ms", lambda v, s: v <= 15),
    (
        "latency p99 under load",
        "loaded_latency_p99_ms",
        "{:.2f} ms",
        "<= 15 ms",
        lambda v, s: v <= 15,
    ),
    (
        "drain",
        "drain_events_per_s",
        "{:,.0f} ev/s",
        ">= 80% of throughput",
        lambda v, s: v >= 0.8 * s["throughput_events_per_s"],
    ),
    ("  vs throughput", "drain_vs_throughput", "{:.0%}", ">= 80%", lambda v, s: v >= 0.8),
    (
        "drain first delivery",
        "drain_first_delivery_ms",
        "{:.1f} ms",
        "<= 100 ms",
        lambda v, s: v <= 100,
    ),
    (
        "RSS, 10k targets + backlog",
        "rss_mb_backlog",
        "{:.0f} MB",
        "<= 200 MB",
        lambda v, s: v <= 200,
    ),
    (
        "cost 10k vs 1 target",
        "cost_ratio_10k_vs_1_targets",
        "{:.2f}x",
        "<= 1.5x",
        lambda v, s: v <= 1.5,
    ),
    (
        "listing speed, 1M vs 100k",
        "list_speed_1m_vs_100k",
        "{:.0%}",
        ">= 50%",
        lambda v, s: v >= 0.5,
    ),
    (
        "fair p50 vs none failing",
        "fair_p50_ratio",
        "{:.2f}x",
        "<= 2x",
        lambda v, s: v <= 2,
    ),
    (
        "fair p99 vs none failing",
        "fair_p99_ratio",
        "{:.2f}x",
        "<= 2x",
        lambda v, s: v <= 2,
    ),
]


def summarise(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The headline figures, their ratios to the baselines, and the targets met or missed."""
    s: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "batch_size": args.batch,
        "synchronous": args.synchronous,
        "submit_mode": args.submit_mode,
        "gc_freeze": args.gc_freeze,
        "event_bytes": event_bytes(),
    }

    def ok(key: str) -> bool:
        return key in results and "crashed" not in results[key]

    tp = [results[k] for k in results if k.startswith("throughput#") and ok(k)]
    so = [results[k] for k in results if k.startswith("send_only#") and ok(k)]
    if tp:
        s["throughput_events_per_s"] = _median(tp, "events_per_s")
        s["throughput_runs_events_per_s"] = [r["events_per_s"] for r in tp]
        s["throughput_cpu_us_per_event"] = _median(tp, "cpu_us_per_event")
        for key in (
            "disk_bytes_written_per_event",
            "deliver_while_storing_events_per_s",
            "deliver_after_storing_events_per_s",
        ):
            if all(r.get(key) is not None for r in tp):
                s[f"throughput_{key}"] = _median(tp, key)
    pg = [results[k] for k in results if k.startswith("pg_throughput#") and ok(k)]
    if pg:
        s["pg_throughput_events_per_s"] = _median(pg, "events_per_s")
        s["pg_throughput_runs_events_per_s"] = [r["events_per_s"] for r in pg]
        s["pg_throughput_cpu_us_per_event"] = _median(pg, "cpu_us_per_event")
        if all(r.get("server_cpu_us_per_event") is not None for r in pg):
            s["pg_throughput_server_cpu_us_per_event"] = _median(pg, "server_cpu_us_per_event")
        if tp:
            s["pg_vs_sqlite"] = s["pg_throughput_events_per_s"] / s["throughput_events_per_s"]
    if so:
        s["send_only_events_per_s"] = _median(so, "events_per_s")
        s["send_only_runs_events_per_s"] = [r["events_per_s"] for r in so]
    if tp and so:
        s["throughput_vs_send_only"] = s["throughput_events_per_s"] / s["send_only_events_per_s"]
    encoded = [results[k] for k in results if k.startswith("throughput_encoded#") and ok(k)]
    if encoded:
        s["throughput_encoded_events_per_s"] = _median(encoded, "events_per_s")
        if so:
            s["throughput_encoded_vs_send_only"] = (
                s["throughput_encoded_events_per_s"] / s["send_only_events_per_s"]
            )
    if ok("sqlite_insert"):
        s["sqlite_insert_rows_per_s"] = results["sqlite_insert"]["rows_per_s"]
        s["sqlite_commits_per_s"] = results["sqlite_insert"]["commits_per_s"]
        if tp:
            s["throughput_vs_sqlite_insert"] = (
                s["throughput_events_per_s"] / s["sqlite_insert_rows_per_s"]
            )
    if ok("latency"):
        s["latency_p50_ms"] = results["latency"]["p50_ms"]
        s["latency_p99_ms"] = results["latency"]["p99_ms"]
    if ok("loaded"):
        loaded = results["loaded"]
        s["loaded_latency_p50_ms"] = loaded["p50_ms"]
        s["loaded_latency_p99_ms"] = loaded["p99_ms"]
        if loaded.get("drain_events_per_s_while_probing") is not None:
            s["loaded_drain_events_per_s"] = loaded["drain_events_per_s_while_probing"]
        if ok("latency"):
            s["loaded_vs_idle_p99"] = loaded["p99_ms"] / results["latency"]["p99_ms"]
    if ok("drain"):
        s["drain_events_per_s"] = results["drain"]["events_per_s"]
        s["drain_first_delivery_ms"] = results["drain"]["first_delivery_ms"]
        if tp:
            s["drain_vs_throughput"] = s["drain_events_per_s"] / s["throughput_events_per_s"]
        if so:
            s["drain_vs_send_only"] = s["drain_events_per_s"] / s["send_only_events_per_s"]
    if ok("memory"):
        s["rss_mb_backlog"] = results["memory"]["peak_rss_mb"]
    if ok("scale_1") and ok("scale_10000"):
        one = results["scale_1"]["cpu_us_per_event"]
        s["cost_us_per_event"] = {
            n: results[f"scale_{n}"]["cpu_us_per_event"]
            for n in (1, 100, 10_000)
            if ok(f"scale_{n}")
        }
        s["cost_ratio_10k_vs_1_targets"] = results["scale_10000"]["cpu_us_per_event"] / one
        if ok("scale_100"):
            s["cost_ratio_100_vs_1_targets"] = results["scale_100"]["cpu_us_per_event"] / one
    if ok("fanout_10"):
        fanout = results["fanout_10"]
        s["fanout_deliveries_per_s"] = fanout["deliveries_per_s"]
        s["fanout_stored_bytes_per_event"] = fanout["stored_bytes_per_event"]
        s["fanout_stored_bytes_method"] = fanout["stored_bytes_method"]
        if fanout.get("disk_bytes_written_per_event") is not None:
            s["fanout_disk_bytes_written_per_event"] = fanout["disk_bytes_written_per_event"]
    for n in FANOUT_TARGETS:
        if ok(f"fanout_{n}"):
            suffix = "1_target" if n == 1 else f"{n}_targets"
            s[f"fanout_stored_bytes_per_event_{suffix}"] = results[f"fanout_{n}"][
                "stored_bytes_per_event"
            ]
    for n in LISTING_EVENTS:
        key = f"listing_{size_suffix(n)}"
        if not ok(key):
            continue
        listing = results[key]
        suffix = size_suffix(n)
        s[f"list_rss_mb_{suffix}"] = listing["list_peak_rss_mb"]
        s[f"list_baseline_rss_mb_{suffix}"] = listing["list_baseline_rss_mb"]
        s[f"list_events_per_s_{suffix}"] = listing["list_events_per_s"]
        if "dead_peak_rss_mb" in listing:
            s[f"dead_list_rss_mb_{suffix}"] = listing["dead_peak_rss_mb"]
            s[f"dead_list_baseline_rss_mb_{suffix}"] = listing["dead_baseline_rss_mb"]
            s[f"dead_list_events_per_s_{suffix}"] = listing["dead_events_per_s"]
    small, large = (size_suffix(n) for n in LISTING_EVENTS)
    if f"list_events_per_s_{small}" in s and f"list_events_per_s_{large}" in s:
        # A listing reads each page by key: ten times the events, the same speed.
        s[f"list_speed_{large}_vs_{small}"] = (
            s[f"list_events_per_s_{large}"] / s[f"list_events_per_s_{small}"]
        )
    if ok("fair") and ok("fair_baseline"):
        for q in ("p50", "p99"):
            s[f"fair_healthy_{q}_ms"] = results["fair"][f"healthy_{q}_ms"]
            s[f"fair_baseline_{q}_ms"] = results["fair_baseline"][f"healthy_{q}_ms"]
            s[f"fair_{q}_ratio"] = s[f"fair_healthy_{q}_ms"] / s[f"fair_baseline_{q}_ms"]
    for key, r in results.items():
        if "crashed" in r:
            continue
        for other in ("FULL", "NORMAL"):
            if key == f"throughput_{other}":
                s[f"{other.lower()}_sync_throughput_events_per_s"] = r["events_per_s"]
            elif key == f"latency_{other}":
                s[f"{other.lower()}_sync_latency_p50_ms"] = r["p50_ms"]
                s[f"{other.lower()}_sync_latency_p99_ms"] = r["p99_ms"]
            elif key == f"sqlite_insert_{other}":
                s[f"{other.lower()}_sync_sqlite_commits_per_s"] = r["commits_per_s"]
    loads = [
        r["other_load_cores"] for r in results.values() if r.get("other_load_cores") is not None
    ]
    if loads:
        s["other_load_cores_mean"] = statistics.fmean(loads)
        s["other_load_cores_max"] = max(loads)
    s["targets"] = {
        key: {"value": s[key], "target": target, "met": met(s[key], s)}
        for label, key, fmt, target, met in _TARGETS
        if key in s
    }
    return s


def _table(summary: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'measure':<28} {'value':>16}  {'target':<22} result"]
    lines.append("-" * len(lines[0]))
    for label, key, fmt, target, met in _TARGETS:
        if key in summary:
            v = summary[key]
            lines.append(
                f"{label:<28} {fmt.format(v):>16}  {target:<22} "
                f"{'met' if met(v, summary) else 'MISSED'}"
            )
    lines.append("")
    for label, key, fmt in (
        ("send-only baseline", "send_only_events_per_s", "{:,.0f} ev/s"),
        ("throughput, events as bytes", "throughput_encoded_events_per_s", "{:,.0f} ev/s"),
        ("  vs send-only", "throughput_encoded_vs_send_only", "{:.0%}"),
        ("PostgreSQL throughput", "pg_throughput_events_per_s", "{:,.0f} ev/s"),
        ("  vs SQLite throughput", "pg_vs_sqlite", "{:.0%}"),
        ("  relayer CPU per event", "pg_throughput_cpu_us_per_event", "{:.1f} us"),
        ("  PostgreSQL CPU per event", "pg_throughput_server_cpu_us_per_event", "{:.1f} us"),
        ("SQLite insert baseline", "sqlite_insert_rows_per_s", "{:,.0f} rows/s"),
        ("  throughput vs it", "throughput_vs_sqlite_insert", "{:.0%}"),
        ("SQLite commits", "sqlite_commits_per_s", "{:,.0f} /s"),
        ("drain vs send-only", "drain_vs_send_only", "{:.0%}"),
        ("latency p50 under load", "loaded_latency_p50_ms", "{:.2f} ms"),
        ("  p99 vs idle", "loaded_vs_idle_p99", "{:.2f}x"),
        ("  drain meanwhile", "loaded_drain_events_per_s", "{:,.0f} ev/s"),
        ("relayer CPU per event", "throughput_cpu_us_per_event", "{:.1f} us"),
        ("disk bytes written per event", "throughput_disk_bytes_written_per_event", "{:,.0f}"),
        (
            "delivery while submitting",
            "throughput_deliver_while_storing_events_per_s",
            "{:,.0f} ev/s",
        ),
        (
            "delivery after submitting",
            "throughput_deliver_after_storing_events_per_s",
            "{:,.0f} ev/s",
        ),
        ("cost 100 vs 1 target", "cost_ratio_100_vs_1_targets", "{:.2f}x"),
        ("fan-out (10 targets)", "fanout_deliveries_per_s", "{:,.0f} del/s"),
        ("  bytes stored per event", "fanout_stored_bytes_per_event", "{:,.0f}"),
        ("  with 1 target", "fanout_stored_bytes_per_event_1_target", "{:,.0f}"),
        ("  disk bytes written/event", "fanout_disk_bytes_written_per_event", "{:,.0f}"),
        ("listing 100k: peak RSS", "list_rss_mb_100k", "{:.1f} MB"),
        ("listing 100k: RSS before", "list_baseline_rss_mb_100k", "{:.1f} MB"),
        ("listing 100k: speed", "list_events_per_s_100k", "{:,.0f} ev/s"),
        ("listing 1M: peak RSS", "list_rss_mb_1m", "{:.1f} MB"),
        ("listing 1M: RSS before", "list_baseline_rss_mb_1m", "{:.1f} MB"),
        ("listing 1M: speed", "list_events_per_s_1m", "{:,.0f} ev/s"),
        ("dead list 100k: peak RSS", "dead_list_rss_mb_100k", "{:.1f} MB"),
        ("dead list 100k: RSS before", "dead_list_baseline_rss_mb_100k", "{:.1f} MB"),
        ("dead list 100k: speed", "dead_list_events_per_s_100k", "{:,.0f} ev/s"),
        ("dead list 1M: peak RSS", "dead_list_rss_mb_1m", "{:.1f} MB"),
        ("dead list 1M: RSS before", "dead_list_baseline_rss_mb_1m", "{:.1f} MB"),
        ("dead list 1M: speed", "dead_list_events_per_s_1m", "{:,.0f} ev/s"),
        ("fair: healthy p50", "fair_healthy_p50_ms", "{:.2f} ms"),
        ("fair: healthy p99", "fair_healthy_p99_ms", "{:.2f} ms"),
        ("fair: baseline p50", "fair_baseline_p50_ms", "{:.2f} ms"),
        ("fair: baseline p99", "fair_baseline_p99_ms", "{:.2f} ms"),
        ("FULL sync: throughput", "full_sync_throughput_events_per_s", "{:,.0f} ev/s"),
        ("FULL sync: latency p50", "full_sync_latency_p50_ms", "{:.2f} ms"),
        ("FULL sync: latency p99", "full_sync_latency_p99_ms", "{:.2f} ms"),
        ("FULL sync: SQLite commits", "full_sync_sqlite_commits_per_s", "{:,.0f} /s"),
        ("NORMAL sync: throughput", "normal_sync_throughput_events_per_s", "{:,.0f} ev/s"),
        ("NORMAL sync: latency p50", "normal_sync_latency_p50_ms", "{:.2f} ms"),
        ("NORMAL sync: latency p99", "normal_sync_latency_p99_ms", "{:.2f} ms"),
        ("other load (mean, cores)", "other_load_cores_mean", "{:.2f}"),
        ("other load (max, cores)", "other_load_cores_max", "{:.2f}"),
    ):
        if key in summary:
            lines.append(f"{label:<28} {fmt.format(summary[key]):>16}")
    if "cost_us_per_event" in summary:
        costs = ", ".join(f"{n}: {v:.1f}" for n, v in summary["cost_us_per_event"].items())
        lines.append(f"{'CPU us/event by targets':<28} {costs}")
    for n, v in summary.get("postgres_events_per_s", {}).items():
        lines.append(f"{f'PostgreSQL, {n} processes':<28} {v:>11,.0f} ev/s")
    lines.append("")
    lines.append(f"{'run':<16} {'wall s':>7} {'other load':>10}  verification")
    for key, r in results.items():
        if "crashed" in r:
            status = f"CRASHED: {r['crashed']}"
        elif r["problems"]:
            status = f"FAILED: {r['problems'][0]}"
        else:
            status = "ok"
        load = r.get("other_load_cores")
        load_text = f"{load:.2f}" if load is not None else "-"
        lines.append(f"{key:<16} {r.get('wall_s', 0):7.1f} {load_text:>10}  {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="relayer's benchmarks: every scenario in a fresh process, against a sink "
        "process on 127.0.0.1, with baselines measured in the same run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, but 1M events for the listing scenario; about two minutes",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    parser.add_argument(
        "--synchronous",
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="SQLite's synchronous setting for relayer and the SQLite baseline (default FULL, "
        "relayer's own default: what is acknowledged survives a power loss; NORMAL survives a "
        "crash of the process, kill -9 included, but not of the machine)",
    )
    parser.add_argument(
        "--compare-sync",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run throughput, latency and SQLite commits with the other synchronous "
        "setting (default: in full mode only)",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="call gc.freeze() in relayer's process once it has started, as an application "
        "tuned for throughput may (default: no)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1000,
        metavar="N",
        help="events per transaction, max_events (default 1000)",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=1000,
        metavar="N",
        help="events per submit_many call (default 1000)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=32,
        metavar="N",
        help="submit calls waiting for their commit at most (default 32)",
    )
    parser.add_argument(
        "--submit-mode",
        choices=["many", "single"],
        default="many",
        help="submit_many per chunk (default) or one submit call per event",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="N",
        help="runs of throughput and send-only each (default 1 quick, 3 full)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="SCENARIO",
        choices=ONLY_CHOICES,
        help="run only this scenario (repeatable): " + ", ".join(ONLY_CHOICES) + "; "
        "postgres runs the PostgreSQL scale-out scenario alone, and pg_throughput the "
        "throughput scenario on PostgreSQL, with --postgres URL",
    )
    parser.add_argument(
        "--db-dir",
        default=None,
        metavar="DIR",
        help="where the SQLite files go (default: the system's temp folder)",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=None,
        help="also run the throughput scenario on PostgreSQL (pg_throughput, one process) and "
        "the PostgreSQL scale-out scenario (1, 2 and 4 processes sharing the targets through "
        "leases) on this database, in schemas of its own",
    )
    args = parser.parse_args(argv)
    for needs in ("postgres", "pg_throughput"):
        if args.only and needs in args.only and not args.postgres:
            parser.error(f"--only {needs} needs --postgres URL")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.compare_sync is None:
        args.compare_sync = not args.quick
    size = _sizes(args.quick)
    log_dir = tempfile.mkdtemp(prefix="relayer-bench-logs-")
    started = time.monotonic()
    info = machine()
    print(
        f"relayer benchmarks ({'quick' if args.quick else 'full'} mode): {info['cpu']}, "
        f"{info['cores']} cores, Python {info['python']}, SQLite {info['sqlite']}, "
        f"synchronous={args.synchronous}, batch={args.batch}; load average "
        f"{info['load_average'][0]:.2f}",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    for key, scenario, params in plan(args):
        print(f"  {key:<16} ...", end="", flush=True)
        result = run_one(key, scenario, params, size["timeout"], log_dir)
        results[key] = result
        if "crashed" in result:
            print(f" CRASHED ({result['crashed']})", flush=True)
            for line in result.get("output", []):
                print(f"      {line}", flush=True)
        else:
            verdict = "ok" if not result["problems"] else "FAILED VERIFICATION"
            print(f" {result['wall_s']:.1f}s, {verdict}", flush=True)
    if args.postgres and (not args.only or "postgres" in args.only):
        from benchmarks import postgres

        events = 50_000 if args.quick else 200_000
        for n in (1, 2, 4):
            key = f"postgres_x{n}"
            print(f"  {key:<16} ...", end="", flush=True)
            try:
                result = postgres.run(args.postgres, n, events, 100, 100)
            except Exception as e:  # a crash of the scenario, reported as one
                result = {"crashed": f"{type(e).__name__}: {e}", "problems": []}
                print(f" CRASHED ({result['crashed']})", flush=True)
            else:
                verdict = "ok" if not result["problems"] else "FAILED VERIFICATION"
                print(
                    f" {result['seconds']:.1f}s, {result['events_per_s']:,.0f} events/s, {verdict}",
                    flush=True,
                )
            if "seconds" in result:
                result["wall_s"] = result["seconds"]
            results[key] = result
    summary = summarise(results, args)
    summary["postgres_events_per_s"] = {
        key.split("_x")[1]: r["events_per_s"]
        for key, r in results.items()
        if key.startswith("postgres_x") and "events_per_s" in r
    }
    summary["machine"] = info
    summary["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    summary["wall_s"] = time.monotonic() - started
    summary["logs"] = log_dir
    print()
    print(_table(summary, results))
    print(f"\ntotal {summary['wall_s']:.1f}s; relayer logs in {log_dir}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "runs": results}, f, indent=2, sort_keys=True)
            f.write("\n")
    if any("crashed" in r for r in results.values()):
        return EXIT_CRASHED
    if any(r["problems"] for r in results.values()):
        for key, r in results.items():
            for problem in r["problems"][:10]:
                print(f"{key}: {problem}")
        return EXIT_UNVERIFIED
    return EXIT_OK
