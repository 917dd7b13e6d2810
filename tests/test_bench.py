"""The benchmark harness runs end to end on the tiny model (figures themselves live in the README)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_cli_rows_and_report(tiny_model_path, tools_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "llamabind", "bench", "-m", tiny_model_path, "-p", "16", "-n", "8",
                          "-r", "1", "-t", "1", "--native", str(tools_dir), "--parallel", "1,2",
                          "--overhead-model", tiny_model_path, "--json", "--report", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(l) for l in out.stdout.splitlines()]
    got = {(r["test"], r["impl"]) for r in rows}
    assert {("pp16", "llamabind"), ("pp16", "native"), ("tg8", "llamabind"), ("tg8", "native"),
            ("tg8x1", "llamabind"), ("tg8x2", "llamabind"), ("overhead", "llamabind"),
            ("overhead", "native"), ("load", "llamabind")} <= got
    for r in rows:
        assert {"test", "impl", "tps", "tps_min", "tps_max", "n_threads", "model"} <= set(r)
        assert r["test"] == "load" or r["tps_min"] <= r["tps"] <= r["tps_max"] and r["tps"] > 0
    assert "| tiny" in (tmp_path / "report.md").read_text()


def test_bench_offloads_the_same_layers_on_both_sides(tiny_model_path, tools_dir):
    """``-ngl`` reaches llamabind's model and llama-bench (which reports its own n_gpu_layers: the
    harness refuses a native figure measured with another); on a CPU build nothing moves."""
    out = subprocess.run([sys.executable, "-m", "llamabind", "bench", "-m", tiny_model_path, "-p", "16", "-n", "8",
                          "-r", "1", "-t", "1", "--native", str(tools_dir), "-ngl", "99", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {(r["test"], r["impl"]): r for r in map(json.loads, out.stdout.splitlines())}
    assert {("pp16", "native"), ("tg8", "native")} <= set(rows)
    assert rows[("load", "llamabind")]["ngl"] == 99


def test_engine_benchmarks_run_against_native(tiny_model_path, tools_dir):
    """benchmarks/bench_engine.py end to end on the tiny model: static batches against
    llama-batched-bench, a short trace against llama-server, the per-step Python cost, a shared
    system prompt against none."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_engine.py"
    runs = {"static": ["--batches", "1,2", "--pp", "16", "--tg", "8", "-ngl", "-1"],
            "trace": ["--requests", "4", "--rate", "50", "--np", "2"],
            "overhead": ["--active", "1,2"],
            "prefix": ["--requests", "4", "--system", "64", "--max-tokens", "4"]}
    for bench, extra in runs.items():
        out = subprocess.run([sys.executable, str(script), bench, "--model", tiny_model_path, "--native", str(tools_dir),
                              "--reps", "1", "--json", *extra], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"exit code {out.returncode}: {out.stderr[-2000:]}"
        rows = [json.loads(l) for l in out.stdout.splitlines()]
        assert rows and all(r["bench"] == bench for r in rows)
        if bench == "static":
            assert [r["B"] for r in rows] == [1, 2] and all(r["native_S_TG"] > 0 and r["engine_S_TG"] > 0 for r in rows)
        elif bench == "trace":
            assert {r["impl"] for r in rows} == {"engine", "llama-server"}
            assert all(r["requests"] == 4 and r["tokens"] > 0 and r["ttft_p50"] > 0 for r in rows)
        elif bench == "prefix":
            by = {r["sharing"]: r for r in rows}
            assert by[True]["prompt_tokens"] == by[False]["prompt_tokens"] == 4 * (1 + 64 + 24)
            assert by[True]["prompt_tokens_decoded"] == 1 + 64 + 4 * 24  # the system prompt once
            assert by[False]["prompt_tokens_decoded"] >= 4 * (64 + 24)
        else:
            assert all(r["us_per_request_step"] > 0 for r in rows)
