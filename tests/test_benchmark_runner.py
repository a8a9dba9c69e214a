"""The benchmark command's plan and summary: every scenario at its size, and every JSON key."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from benchmarks import runner


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
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def test_the_quick_plan_runs_every_scenario_at_its_quick_size() -> None:
    runs = {key: params for key, _, params in runner.plan(args())}
    assert set(runs) == {
        "send_only#0",
        "throughput#0",
        "sqlite_insert",
        "latency",
        "drain",
        "memory",
        "scale_1",
        "scale_100",
        "scale_10000",
    }
    assert (runs["throughput#0"]["targets"], runs["throughput#0"]["events"]) == (10, 100_000)
    assert runs["send_only#0"]["batch"] == runs["throughput#0"]["batch"] == 1000
    assert runs["drain"]["events"] == 200_000
    assert (runs["memory"]["targets"], runs["memory"]["pending"]) == (10_000, 100_000)
    assert [runs[f"scale_{n}"]["targets"] for n in (1, 100, 10_000)] == [1, 100, 10_000]


def test_the_full_plan_uses_the_full_sizes_and_repeats_the_baseline_with_throughput() -> None:
    plan = runner.plan(args(quick=False, repeat=3, compare_sync=True))
    keys = [key for key, _, _ in plan]
    assert keys[:6] == [f"{name}#{i}" for i in range(3) for name in ("send_only", "throughput")]
    runs = {key: params for key, _, params in plan}
    assert runs["throughput#0"]["events"] == runs["drain"]["events"] == 1_000_000
    assert runs["memory"]["pending"] == 1_000_000
    assert runs["throughput_NORMAL"]["synchronous"] == "NORMAL"


def test_only_keeps_the_runs_named() -> None:
    plan = runner.plan(args(only=["scale", "latency"]))
    assert [key for key, _, _ in plan] == ["latency", "scale_1", "scale_100", "scale_10000"]


@pytest.mark.parametrize("only", [["nonsense"], ["postgres"]])
def test_a_bad_only_is_refused(only: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        runner.main([f"--only={o}" for o in only])
    assert exited.value.code == 2
    assert "--only" in capsys.readouterr().err


def test_the_summary_has_every_key_and_ratio() -> None:
    results: dict[str, dict[str, Any]] = {
        "send_only#0": {"events_per_s": 400_000.0},
        "throughput#0": {"events_per_s": 100_000.0, "cpu_us_per_event": 6.0},
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
    assert s["drain_vs_throughput"] == pytest.approx(0.9)
    assert s["cost_ratio_10k_vs_1_targets"] == pytest.approx(1.6)
    met = {key: t["met"] for key, t in s["targets"].items()}
    assert met["throughput_events_per_s"] is True
    assert met["throughput_vs_send_only"] is False
    assert met["drain_vs_throughput"] is True
    assert met["cost_ratio_10k_vs_1_targets"] is False
    assert met["rss_mb_backlog"] is True


def test_a_crashed_run_is_left_out_of_the_summary() -> None:
    results = {
        "send_only#0": {"events_per_s": 400_000.0},
        "throughput#0": {"crashed": "RuntimeError: boom", "problems": []},
    }
    s = runner.summarise(results, args())
    assert "throughput_events_per_s" not in s
    assert "throughput_vs_send_only" not in s
