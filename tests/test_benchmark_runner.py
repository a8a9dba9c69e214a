"""The benchmark command's plan and summary: every scenario at its size, and every JSON key."""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from benchmarks import loaded as loaded_scenario
from benchmarks import runner, scenarios
from benchmarks._harness import run_child, stored_bytes
from relayer.testing import open_store


def args(**overrides: Any) -> argparse.Namespace:
    values: dict[str, Any] = {
        "quick": True,
        "synchronous": "FULL",
        "batch": 1000,
        "chunk": 1000,
        "window": 32,
        "submit_mode": "many",
        "db_dir": None,
        "gc_freeze": False,
        "repeat": 1,
        "compare_sync": False,
        "only": None,
        "postgres": None,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def test_the_quick_plan_runs_every_scenario_at_its_quick_size() -> None:
    runs = {key: params for key, _, params in runner.plan(args())}
    assert set(runs) == {
        "send_only#0",
        "throughput#0",
        "throughput_encoded#0",
        "sqlite_insert",
        "latency",
        "loaded",
        "drain",
        "memory",
        "scale_1",
        "scale_100",
        "scale_10000",
        "fanout_10",
        "fanout_1",
        "listing_100k",
        "listing_1m",
        "fair_baseline",
        "fair",
    }
    assert (runs["throughput#0"]["targets"], runs["throughput#0"]["events"]) == (10, 100_000)
    assert runs["send_only#0"]["batch"] == runs["throughput#0"]["batch"] == 1000
    # The same throughput run, with the events submitted as their JSON bytes.
    assert runs["throughput_encoded#0"] == {**runs["throughput#0"], "encoded": True}
    assert "encoded" not in runs["throughput#0"]
    assert runs["drain"]["events"] == 200_000
    # The backlog drained under the probes: smaller in quick mode, so that CI stays short,
    # yet large enough that, however fast the machine drains it, it lasts for the warm-up and
    # the fewest probes, each at least the gap apart.
    loaded_run = runs["loaded"]
    assert loaded_run["events"] == 500_000
    drained = loaded_run["events"] * loaded_run.get("stop_at", loaded_scenario.STOP_AT)
    lasts_s = drained / runner.FASTEST_DRAIN
    probing = loaded_run["warmup"] + min(loaded_run["probes"], loaded_scenario.MIN_PROBES)
    assert lasts_s >= probing * loaded_run["gap"] * 1.5
    assert runs["loaded"]["synchronous"] == "FULL"
    assert runs["loaded"]["warmup"] < runs["loaded"]["probes"]
    assert (runs["memory"]["targets"], runs["memory"]["pending"]) == (10_000, 100_000)
    assert [runs[f"scale_{n}"]["targets"] for n in (1, 100, 10_000)] == [1, 100, 10_000]
    assert (runs["fanout_10"]["targets"], runs["fanout_10"]["events"]) == (10, 10_000)
    assert (runs["fanout_1"]["targets"], runs["fanout_1"]["events"]) == (1, 10_000)
    assert runs["fanout_10"]["batch"] == runs["throughput#0"]["batch"]
    assert runs["fanout_10"]["synchronous"] == "FULL"
    # Listing is quick: quick mode lists both sizes.
    assert runs["listing_100k"]["events"] == 100_000
    assert runs["listing_1m"]["events"] == 1_000_000
    assert runs["listing_1m"]["limit"] == 1000
    assert runs["listing_1m"]["dead_letters"] is True
    # Fairness: 2k targets in quick mode, a fifth of them failing, or none in the baseline.
    assert runs["fair"]["targets"] == runs["fair_baseline"]["targets"] == 2_000
    assert (runs["fair"]["failing"], runs["fair_baseline"]["failing"]) == (0.2, 0.0)
    assert runs["fair"]["flaky_names"] == runs["fair_baseline"]["flaky_names"] == 0.2
    assert runs["fair"]["rate"] == runs["fair_baseline"]["rate"]


def test_the_full_plan_uses_the_full_sizes_and_repeats_the_baseline_with_throughput() -> None:
    plan = runner.plan(args(quick=False, repeat=3, compare_sync=True))
    keys = [key for key, _, _ in plan]
    assert keys[:6] == [f"{name}#{i}" for i in range(3) for name in ("send_only", "throughput")]
    assert keys[6:9] == [f"throughput_encoded#{i}" for i in range(3)]
    runs = {key: params for key, _, params in plan}
    assert runs["throughput#0"]["events"] == runs["drain"]["events"] == 1_000_000
    assert runs["loaded"]["events"] == 1_000_000
    assert runs["memory"]["pending"] == 1_000_000
    assert runs["throughput_NORMAL"]["synchronous"] == "NORMAL"
    assert runs["fanout_10"]["events"] == runs["fanout_1"]["events"] == 100_000
    assert [runs[f"listing_{n}"]["events"] for n in ("100k", "1m")] == [100_000, 1_000_000]
    assert runs["fair"]["targets"] == runs["fair_baseline"]["targets"] == 10_000


PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.mark.parametrize("quick", [True, False])
def test_with_postgres_the_plan_runs_the_throughput_scenario_on_it_beside_each_sqlite_run(
    quick: bool,
) -> None:
    plan = runner.plan(args(quick=quick, repeat=1 if quick else 3, postgres=PG_URL))
    keys = [key for key, _, _ in plan]
    n = 1 if quick else 3
    assert keys[: 3 * n] == [
        f"{name}#{i}" for i in range(n) for name in ("send_only", "throughput", "pg_throughput")
    ]
    runs = {key: (scenario, params) for key, scenario, params in plan}
    scenario, params = runs["pg_throughput#0"]
    assert scenario == "pg_throughput"
    assert params["database"] == PG_URL
    # The same work as SQLite's throughput runs.
    sqlite = runs["throughput#0"][1]
    for key in ("targets", "events", "batch", "chunk", "window", "submit_mode"):
        assert params[key] == sqlite[key], key
    # Without --postgres, there is none.
    assert not any(k.startswith("pg_") for k, _, _ in runner.plan(args(quick=quick)))


def test_only_pg_throughput_runs_it_alone_and_beside_throughput() -> None:
    only = runner.plan(args(only=["pg_throughput"], postgres=PG_URL))
    assert [key for key, _, _ in only] == ["pg_throughput#0"]
    both = runner.plan(args(only=["throughput", "pg_throughput"], postgres=PG_URL))
    assert [key for key, _, _ in both] == [
        "throughput#0",
        "pg_throughput#0",
        "throughput_encoded#0",
    ]


def _pg_result(rate: float) -> dict[str, Any]:
    return {
        "events_per_s": rate,
        "cpu_us_per_event": 9.0,
        "server_cpu_us_per_event": 4.0,
        "problems": [],
        "wall_s": 2.0,
    }


def test_the_postgres_throughput_and_its_ratio_to_sqlite_are_top_level_keys() -> None:
    results: dict[str, dict[str, Any]] = {
        "throughput#0": {"events_per_s": 100_000.0, "cpu_us_per_event": 6.0, "problems": []},
        "throughput#1": {"events_per_s": 140_000.0, "cpu_us_per_event": 6.0, "problems": []},
        "throughput#2": {"events_per_s": 120_000.0, "cpu_us_per_event": 6.0, "problems": []},
        "pg_throughput#0": _pg_result(50_000.0),
        "pg_throughput#1": _pg_result(70_000.0),
        "pg_throughput#2": _pg_result(60_000.0),
    }
    s = runner.summarise(results, args())
    assert s["pg_throughput_events_per_s"] == 60_000.0
    assert s["pg_throughput_runs_events_per_s"] == [50_000.0, 70_000.0, 60_000.0]
    # Against the SQLite median of the same run.
    assert s["pg_vs_sqlite"] == pytest.approx(0.5)
    assert s["pg_throughput_cpu_us_per_event"] == 9.0
    assert s["pg_throughput_server_cpu_us_per_event"] == 4.0
    rows = {line[:28].strip(): line[28:].strip() for line in runner._table(s, results).splitlines()}
    assert rows["PostgreSQL throughput"] == "60,000 ev/s"
    assert rows["vs SQLite throughput"] == "50%"
    # A crashed run is left out; without SQLite's runs there is no ratio.
    alone = runner.summarise(
        {"pg_throughput#0": _pg_result(50_000.0), "pg_throughput#1": {"crashed": "x"}}, args()
    )
    assert alone["pg_throughput_events_per_s"] == 50_000.0
    assert "pg_vs_sqlite" not in alone


def test_only_keeps_the_runs_named() -> None:
    plan = runner.plan(args(only=["scale", "latency"]))
    assert [key for key, _, _ in plan] == ["latency", "scale_1", "scale_100", "scale_10000"]


def test_only_loaded_runs_the_latency_under_load_alone() -> None:
    assert [key for key, _, _ in runner.plan(args(only=["loaded"]))] == ["loaded"]
    assert "loaded" in runner.ONLY_CHOICES


def test_only_throughput_runs_it_with_dicts_and_with_bytes() -> None:
    assert [key for key, _, _ in runner.plan(args(only=["throughput"]))] == [
        "throughput#0",
        "throughput_encoded#0",
    ]
    assert [key for key, _, _ in runner.plan(args(only=["throughput_encoded"]))] == [
        "throughput_encoded#0"
    ]


def test_only_fanout_runs_it_with_10_targets_and_with_1() -> None:
    assert [key for key, _, _ in runner.plan(args(only=["fanout"]))] == ["fanout_10", "fanout_1"]
    assert [key for key, _, _ in runner.plan(args(only=["fanout_1"]))] == ["fanout_1"]


def test_only_fair_runs_the_baseline_and_the_run_with_failing_targets() -> None:
    assert [key for key, _, _ in runner.plan(args(only=["fair"]))] == ["fair_baseline", "fair"]


def test_the_fair_figures_and_their_ratios_are_in_the_summary_and_the_table() -> None:
    results: dict[str, dict[str, Any]] = {
        "fair_baseline": {"healthy_p50_ms": 4.0, "healthy_p99_ms": 20.0, "problems": []},
        "fair": {"healthy_p50_ms": 6.0, "healthy_p99_ms": 50.0, "problems": []},
    }
    s = runner.summarise(results, args())
    assert (s["fair_healthy_p50_ms"], s["fair_healthy_p99_ms"]) == (6.0, 50.0)
    assert (s["fair_baseline_p50_ms"], s["fair_baseline_p99_ms"]) == (4.0, 20.0)
    assert s["fair_p50_ratio"] == pytest.approx(1.5)
    assert s["fair_p99_ratio"] == pytest.approx(2.5)
    met = {key: t["met"] for key, t in s["targets"].items()}
    assert (met["fair_p50_ratio"], met["fair_p99_ratio"]) == (True, False)
    rows = {line[:28].strip(): line[28:].strip() for line in runner._table(s, results).splitlines()}
    assert rows["fair: healthy p50"] == "6.00 ms"
    assert rows["fair: baseline p99"] == "20.00 ms"
    assert rows["fair p50 vs none failing"].split() == ["1.50x", "<=", "2x", "met"]


def test_a_crashed_fair_run_leaves_the_fair_figures_out() -> None:
    results: dict[str, dict[str, Any]] = {
        "fair_baseline": {"healthy_p50_ms": 4.0, "healthy_p99_ms": 20.0, "problems": []},
        "fair": {"crashed": "exit status 2", "problems": []},
    }
    s = runner.summarise(results, args())
    assert not any(key.startswith("fair_") for key in s)


def test_only_listing_runs_both_sizes_and_each_can_run_alone() -> None:
    assert [key for key, _, _ in runner.plan(args(only=["listing"]))] == [
        "listing_100k",
        "listing_1m",
    ]
    assert [key for key, _, _ in runner.plan(args(only=["listing_1m"]))] == ["listing_1m"]


@pytest.mark.parametrize("only", [["nonsense"], ["postgres"], ["pg_throughput"]])
def test_a_bad_only_is_refused(only: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        runner.main([f"--only={o}" for o in only])
    assert exited.value.code == 2
    assert "--only" in capsys.readouterr().err


def test_the_summary_has_every_key_and_ratio() -> None:
    results: dict[str, dict[str, Any]] = {
        "send_only#0": {"events_per_s": 400_000.0},
        "throughput#0": {"events_per_s": 100_000.0, "cpu_us_per_event": 6.0},
        "throughput_encoded#0": {"events_per_s": 120_000.0, "cpu_us_per_event": 5.0},
        "sqlite_insert": {"rows_per_s": 250_000.0, "commits_per_s": 8000.0},
        "latency": {"p50_ms": 2.0, "p99_ms": 4.0},
        "drain": {"events_per_s": 90_000.0, "first_delivery_ms": 5.0},
        "memory": {"peak_rss_mb": 150.0},
        "scale_1": {"cpu_us_per_event": 10.0},
        "scale_100": {"cpu_us_per_event": 9.0},
        "scale_10000": {"cpu_us_per_event": 16.0},
    }
    s = runner.summarise(results, args())
    for key in (
        "throughput_events_per_s",
        "latency_p50_ms",
        "latency_p99_ms",
        "drain_events_per_s",
        "drain_first_delivery_ms",
        "rss_mb_backlog",
        "cost_ratio_10k_vs_1_targets",
        "send_only_events_per_s",
        "sqlite_insert_rows_per_s",
        "batch_size",
        "mode",
    ):
        assert key in s, key
    assert s["mode"] == "quick"
    assert s["throughput_vs_send_only"] == pytest.approx(0.25)
    assert s["throughput_encoded_events_per_s"] == 120_000.0
    assert s["throughput_encoded_vs_send_only"] == pytest.approx(0.3)
    assert s["throughput_events_per_s"] == 100_000.0  # the encoded run is not one of these
    assert s["drain_vs_throughput"] == pytest.approx(0.9)
    assert s["cost_ratio_10k_vs_1_targets"] == pytest.approx(1.6)
    met = {key: t["met"] for key, t in s["targets"].items()}
    assert met["throughput_events_per_s"] is True
    assert met["throughput_vs_send_only"] is False
    assert met["drain_vs_throughput"] is True
    assert met["cost_ratio_10k_vs_1_targets"] is False
    assert met["rss_mb_backlog"] is True


def _loaded_result(p50: float, p99: float) -> dict[str, Any]:
    return {
        "events": 200_000,
        "probes": 300,
        "p50_ms": p50,
        "p99_ms": p99,
        "backlog_delivered_before_first_probe": 20_000,
        "backlog_left_after_last_probe": 30_000,
        "drain_events_per_s_while_probing": 70_000.0,
        "problems": [],
        "wall_s": 6.0,
    }


def test_the_latency_under_load_is_a_target_beside_the_idle_latency() -> None:
    results = {
        "latency": {"p50_ms": 2.0, "p99_ms": 5.0, "problems": []},
        "loaded": _loaded_result(6.0, 20.0),
    }
    s = runner.summarise(results, args())
    assert s["loaded_latency_p50_ms"] == 6.0
    assert s["loaded_latency_p99_ms"] == 20.0
    assert s["loaded_vs_idle_p99"] == pytest.approx(4.0)
    assert s["loaded_drain_events_per_s"] == 70_000.0
    assert s["targets"]["loaded_latency_p99_ms"]["met"] is False
    rows = {line[:28].strip(): line[28:].strip() for line in runner._table(s, results).splitlines()}
    assert rows["latency p99 under load"].startswith("20.00 ms")
    assert rows["latency p99 under load"].endswith("MISSED")
    assert rows["latency p50 under load"] == "6.00 ms"
    assert rows["p99 vs idle"] == "4.00x"
    assert rows["drain meanwhile"] == "70,000 ev/s"


def test_the_latency_under_load_without_the_idle_run_has_no_ratio() -> None:
    s = runner.summarise({"loaded": _loaded_result(3.0, 9.0)}, args())
    assert s["targets"]["loaded_latency_p99_ms"]["met"] is True
    assert "loaded_vs_idle_p99" not in s


def test_a_crashed_run_is_left_out_of_the_summary() -> None:
    results = {
        "send_only#0": {"events_per_s": 400_000.0},
        "throughput#0": {"crashed": "RuntimeError: boom", "problems": []},
    }
    s = runner.summarise(results, args())
    assert "throughput_events_per_s" not in s
    assert "throughput_vs_send_only" not in s


def _fanout_result(targets: int, stored: float) -> dict[str, Any]:
    return {
        "targets": targets,
        "events": 10_000,
        "deliveries_per_s": 30_000.0 * targets,
        "stored_bytes_per_event": stored,
        "stored_bytes_method": "dbstat",
        "disk_bytes_written_per_event": 900.0 * targets,
        "problems": [],
        "wall_s": 2.0,
    }


def test_the_fanout_figures_are_top_level_keys_beside_the_throughputs() -> None:
    results: dict[str, dict[str, Any]] = {
        "throughput#0": {
            "events_per_s": 100_000.0,
            "cpu_us_per_event": 6.0,
            "disk_bytes_written_per_event": 1500.0,
            "problems": [],
        },
        "fanout_10": _fanout_result(10, 310.0),
        "fanout_1": _fanout_result(1, 305.0),
    }
    s = runner.summarise(results, args())
    assert s["throughput_disk_bytes_written_per_event"] == 1500.0
    assert s["fanout_deliveries_per_s"] == 300_000.0
    assert s["fanout_stored_bytes_per_event"] == 310.0
    assert s["fanout_stored_bytes_per_event_10_targets"] == 310.0
    assert s["fanout_stored_bytes_per_event_1_target"] == 305.0
    assert s["fanout_stored_bytes_method"] == "dbstat"
    assert s["fanout_disk_bytes_written_per_event"] == 9000.0


def test_the_table_lists_the_fanout_figures() -> None:
    results = {"fanout_10": _fanout_result(10, 310.0), "fanout_1": _fanout_result(1, 305.0)}
    table = runner._table(runner.summarise(results, args()), results)
    # Each figure's line: its label in the first 28 columns, then its value.
    rows = {line[:28].strip(): line[28:].strip() for line in table.splitlines()}
    assert rows["fan-out (10 targets)"] == "300,000 del/s"
    assert rows["bytes stored per event"] == "310"
    assert rows["with 1 target"] == "305"


def test_a_crashed_fanout_run_leaves_only_its_own_figures_out() -> None:
    results = {
        "fanout_10": {"crashed": "exit status 2", "problems": []},
        "fanout_1": _fanout_result(1, 305.0),
    }
    s = runner.summarise(results, args())
    assert "fanout_deliveries_per_s" not in s
    assert "fanout_stored_bytes_per_event" not in s
    assert "fanout_stored_bytes_per_event_10_targets" not in s
    assert s["fanout_stored_bytes_per_event_1_target"] == 305.0
    rows = {line[:28].strip(): line[28:].strip() for line in runner._table(s, results).splitlines()}
    assert "fan-out (10 targets)" not in rows
    assert "bytes stored per event" not in rows
    assert rows["with 1 target"] == "305"


def test_stored_bytes_counts_relayers_tables_and_their_indexes_only(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE relayer_things (id INTEGER PRIMARY KEY, body BLOB)")
    conn.execute("CREATE INDEX relayer_things_body ON relayer_things (body)")
    conn.execute("CREATE TABLE other (id INTEGER PRIMARY KEY, body BLOB)")
    empty = stored_bytes(path, checkpoint=False)
    conn.executemany("INSERT INTO other (body) VALUES (?)", [(b"x" * 1000,)] * 1000)
    after_other = stored_bytes(path, checkpoint=False)
    conn.executemany("INSERT INTO relayer_things (body) VALUES (?)", [(b"y" * 1000,)] * 100)
    conn.close()
    after = stored_bytes(path)
    if empty["tables"] is None:
        pytest.skip("this SQLite has no dbstat table")
    assert set(after["tables"]) == {"relayer_things"}
    assert after_other["table_bytes"] == empty["table_bytes"]
    # Each row is in the table and in the index: twice its body at least.
    assert after["table_bytes"] - empty["table_bytes"] >= 2 * 100 * 1000
    assert after["database_bytes"] > after_other["database_bytes"] > empty["database_bytes"]
    # Checkpointed: the file holds everything, and its WAL is empty.
    assert after["file_bytes"] == after["database_bytes"] == path.stat().st_size


def _listing_result(events: int, peak: float, rate: float) -> dict[str, Any]:
    return {
        "events": events,
        "list_peak_rss_mb": peak,
        "list_baseline_rss_mb": 70.0,
        "list_events_per_s": rate,
        "dead_peak_rss_mb": peak + 8.0,
        "dead_baseline_rss_mb": 70.5,
        "dead_events_per_s": 4 * rate,
        "problems": [],
        "wall_s": 3.0,
    }


def test_the_listing_figures_are_top_level_keys_and_lines_of_the_table() -> None:
    results = {
        "listing_100k": _listing_result(100_000, 73.0, 250_000.0),
        "listing_1m": _listing_result(1_000_000, 73.5, 300_000.0),
    }
    s = runner.summarise(results, args())
    assert s["list_rss_mb_100k"] == 73.0
    assert s["list_rss_mb_1m"] == 73.5
    assert s["list_baseline_rss_mb_1m"] == 70.0
    assert s["list_events_per_s_1m"] == 300_000.0
    assert s["dead_list_rss_mb_1m"] == 81.5
    assert s["dead_list_events_per_s_100k"] == 1_000_000.0
    rows = {line[:28].strip(): line[28:].strip() for line in runner._table(s, results).splitlines()}
    assert rows["listing 100k: peak RSS"] == "73.0 MB"
    assert rows["listing 1M: peak RSS"] == "73.5 MB"
    assert rows["listing 1M: RSS before"] == "70.0 MB"
    assert rows["listing 1M: speed"] == "300,000 ev/s"
    assert rows["dead list 1M: peak RSS"] == "81.5 MB"


@pytest.mark.parametrize(("rate_1m", "met"), [(200_000.0, True), (60_000.0, False)])
def test_a_listing_that_slows_down_with_the_events_misses_its_target(
    rate_1m: float, met: bool
) -> None:
    results = {
        "listing_100k": _listing_result(100_000, 73.0, 250_000.0),
        "listing_1m": _listing_result(1_000_000, 73.5, rate_1m),
    }
    s = runner.summarise(results, args())
    assert s["list_speed_1m_vs_100k"] == pytest.approx(rate_1m / 250_000.0)
    assert s["targets"]["list_speed_1m_vs_100k"]["met"] is met
    rows = {line[:28].strip(): line[28:].strip() for line in runner._table(s, results).splitlines()}
    want = f"{rate_1m / 250_000.0:.0%} >= 50% {'met' if met else 'MISSED'}"
    assert rows["listing speed, 1M vs 100k"].split() == want.split()


def test_a_crashed_listing_run_leaves_only_its_own_figures_out() -> None:
    results = {
        "listing_100k": _listing_result(100_000, 73.0, 250_000.0),
        "listing_1m": {"crashed": "exit status 2", "problems": []},
    }
    s = runner.summarise(results, args())
    assert s["list_rss_mb_100k"] == 73.0
    assert not any(key.endswith("_1m") or "_1m_" in key for key in s)


@pytest.mark.integration
def test_the_loaded_scenario_probes_while_the_backlog_drains(tmp_path: Path) -> None:
    # Transactions of 10 events: the backlog takes hundreds of them, the probes a few.
    params = {
        "events": 5000,
        "batch": 10,
        "chunk": 1000,
        "window": 8,
        "warmup": 2,
        "probes": 5,
        "gap": 0.001,
        "synchronous": "NORMAL",
        "db_dir": str(tmp_path),
        "log": str(tmp_path / "loaded.log"),
    }
    result = run_child("loaded", params, 120)
    assert result["problems"] == []
    assert result["probes"] == 5
    assert result["backlog_delivered_before_first_probe"] > 0
    assert result["backlog_left_after_last_probe"] > 0
    assert result["p99_ms"] >= result["p50_ms"] > 0


@pytest.mark.integration
def test_the_listing_scenario_lists_every_event_and_dead_letter(tmp_path: Path) -> None:
    # Pages of 1,000 events end inside transactions of 300; pages of 4 dead letters end
    # with a short one.
    result = scenarios.listing(
        {
            "events": 2500,
            "batch": 300,
            "limit": 1000,
            "dead_letters": True,
            "dead_limit": 4,
            "db_dir": str(tmp_path),
        }
    )
    assert result["problems"] == []
    assert (result["list_events"], result["list_pages"]) == (2500, 3)
    assert result["transactions"] == 9
    assert (result["dead_events"], result["dead_letters"], result["dead_pages"]) == (2500, 9, 3)
    assert result["list_peak_rss_mb"] >= result["list_baseline_rss_mb"] > 0
    # The folder with the database is gone.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_a_listing_that_does_not_find_every_event_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "relayer.db"
    store = open_store(Clock(), path)
    store.open()
    store.register_targets(["listed", "dead"])
    filled = scenarios._fill(store, "listed", 1500, 500, time.time(), dead=False)
    store.close()
    # The listing expects one more event than there is.
    params = {
        "path": str(path),
        "targets": ["listed", "dead"],
        "events": 1501,
        "limit": 1000,
        **filled,
        "last_seq": filled["last_seq"] + 1,
    }
    result = run_child("list_events", params, 120)
    assert result["events"] == 1500
    assert result["problems"] == [
        "1500 events listed, not 1501",
        f"the last event listed is seq {filled['last_seq']}, not {filled['last_seq'] + 1}",
    ]


@pytest.mark.integration
@pytest.mark.postgres_only
def test_the_postgres_throughput_scenario_delivers_every_event_on_postgresql() -> None:
    from conftest import DATABASE_URL

    params = {
        "synchronous": "FULL",
        "batch": 100,
        "chunk": 100,
        "window": 4,
        "submit_mode": "many",
        "db_dir": None,
        "gc_freeze": False,
        "targets": 4,
        "events": 2000,
        "database": DATABASE_URL,
    }
    result = run_child("pg_throughput", params, 300)
    assert result["problems"] == []
    assert result["store"] == "postgresql"
    assert result["events"] == 2000
