"""The benchmarks still run: the load test's baseline server and load generator, the backend, weight-layout and
length-cut benchmarks, on the tiny model, a few requests; and they all find their sentences the same way.

The figures mean nothing here; the tests only keep `bench/` from rotting between real runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FIXTURE_DATA

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
SCRIPTS = ["backends", "length_chunks", "serve_load", "weight_layout"]


def env_without_data(**extra) -> dict:
    "This process's environment without $SENTIMENT_NB_DATA, plus `extra`."
    return {**{k: v for k, v in os.environ.items() if k != "SENTIMENT_NB_DATA"}, **extra}


@pytest.mark.slow
def test_serve_load_drives_the_baseline(tiny_model_dir, tmp_path):
    out = tmp_path / "results.json"
    p = subprocess.run([sys.executable, str(BENCH), "--only", "baseline", "--model", str(tiny_model_dir),
                        "--data", str(FIXTURE_DATA / "test.jsonl"), "--concurrency", "1", "4", "--requests", "12",
                        "--warmup", "2", "--rounds", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["server"], r["concurrency"]) for r in rows] == [("baseline", 1), ("baseline", 4)]
    for r in rows:
        assert r["ok"] == r["requests"] == 12 and not r["errors"], r
        assert r["throughput_rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]


def load_bench(name: str):
    import importlib.util

    if str(BENCH.parent) not in sys.path:  # the scripts import bench/common.py, as they do when run from bench/
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_serve_load_runs_rounds_and_reports_their_medians(tiny_model_dir, tmp_path):
    out = tmp_path / "results.json"
    p = subprocess.run([sys.executable, str(BENCH), "--only", "baseline", "--model", str(tiny_model_dir),
                        "--data", str(FIXTURE_DATA / "test.jsonl"), "--concurrency", "2", "--requests", "6",
                        "--warmup", "1", "--rounds", "2", "--json", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(out.read_text())
    assert [r["round"] for r in got["results"]] == [1, 2]
    (summary,) = got["summary"]
    assert summary["rounds"] == 2 and summary["p50_ms"] == pytest.approx(
        sorted(r["p50_ms"] for r in got["results"])[0] / 2 + sorted(r["p50_ms"] for r in got["results"])[1] / 2)
    assert "medians over 2 rounds" in p.stdout
    assert got["targets"] == []  # the baseline alone: no ratio to check


def test_summarize_takes_medians_over_rounds_and_pairs_ratios_by_round():
    bench = load_bench("serve_load")
    row = lambda server, rnd, p50, rps: {"server": server, "concurrency": 1, "round": rnd, "p50_ms": p50,  # noqa: E731
                                         "throughput_rps": rps}
    rows = [row("serve", 1, 30.0, 30.0), row("baseline", 1, 10.0, 90.0),
            row("baseline", 2, 20.0, 50.0), row("serve", 2, 20.0, 50.0),
            row("serve", 3, 24.0, 40.0), row("baseline", 3, 16.0, 60.0)]
    serve, base = sorted(bench.summarize(rows), key=lambda s: s["server"], reverse=True)
    assert (serve["p50_ms"], base["p50_ms"], serve["rounds"]) == (24.0, 16.0, 3)
    assert serve["p50_ratio"] == 1.5 and serve["p50_ratios"] == [3.0, 1.0, 1.5]
    assert serve["throughput_ratio"] == round(40 / 60, 2) and "p50_ratio" not in base
    assert serve["throughput_ratios"] == [round(30 / 90, 2), 1.0, round(40 / 60, 2)]


@pytest.mark.parametrize("c1_p50, c32_rps, c32_p99, met", [
    (15.0, 140.0, 500.0, ("met", "met")),
    (15.1, 140.0, 500.0, ("MISSED", "met")),     # c1 p50 just over 1.5 times the baseline's
    (12.0, 139.0, 500.0, ("met", "MISSED")),     # c32 just under twice the baseline's throughput
    (12.0, 200.0, 1000.0, ("met", "MISSED")),    # fast enough, but p99 not under 1 s
])
def test_target_checks_apply_the_issue_targets_to_the_medians(c1_p50, c32_rps, c32_p99, met):
    bench = load_bench("serve_load")
    row = lambda server, c, p50, p99, rps: {"server": server, "concurrency": c, "round": 1,  # noqa: E731
                                            "p50_ms": p50, "p99_ms": p99, "throughput_rps": rps}
    rows = [row("serve:torch", 1, c1_p50, 30.0, 60.0), row("baseline", 1, 10.0, 20.0, 90.0),
            row("serve:torch", 32, 200.0, c32_p99, c32_rps), row("baseline", 32, 450.0, 600.0, 70.0)]
    c1, c32 = bench.target_checks(bench.summarize(rows))
    assert c1.startswith("serve:torch c1:") and c1.endswith(met[0])
    assert c32.startswith("serve:torch c32:") and c32.endswith(met[1])
    assert bench.target_checks(bench.summarize(rows[1::2])) == []  # the baseline alone has no ratios to check


def test_a_level_with_errors_misses_its_target_whatever_the_figures():
    bench = load_bench("serve_load")
    row = lambda server, c, p50, rps, errors: {"server": server, "concurrency": c, "round": 1,  # noqa: E731
                                               "p50_ms": p50, "p99_ms": 300.0, "throughput_rps": rps, "errors": errors}
    rows = [row("serve:torch", 1, 12.0, 60.0, {}), row("baseline", 1, 10.0, 90.0, {"503": 2}),
            row("serve:torch", 32, 200.0, 200.0, {"503": 5, "ConnectError": 1}), row("baseline", 32, 450.0, 70.0, {})]
    c1, c32 = bench.target_checks(bench.summarize(rows))
    assert c1.endswith("MISSED") and "2 error(s)" in c1  # the baseline's errors count too
    assert c32.endswith("MISSED") and "6 error(s)" in c32
    rows[1]["errors"], rows[2]["errors"] = {}, {}
    assert [line.rsplit(" ", 1)[1] for line in bench.target_checks(bench.summarize(rows))] == ["met", "met"]


def test_serve_load_refuses_zero_rounds(tmp_path):
    p = subprocess.run([sys.executable, str(BENCH), "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--rounds" in p.stderr


def test_serve_load_refuses_a_missing_model(tmp_path):
    p = subprocess.run([sys.executable, str(BENCH), "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "nope" in p.stderr


def test_backends_bench_passes_the_serving_layout_on_to_the_load_test(tmp_path):
    backends = load_bench("backends")
    args = backends.parse_args(["--model", "m", "--replicas", "2", "--cpus", "0.5", "--ingress-replicas", "1",
                                "--haproxy", "--concurrency", "1", "32"])
    cmd = backends.serve_load_command(args, "onnx-int8", tmp_path / "out.json")
    assert cmd[1] == str(BENCH)
    pairs = dict(zip(cmd, cmd[1:], strict=False))  # each flag with the value after it
    assert {k: pairs[k] for k in ("--backend", "--replicas", "--cpus", "--ingress-replicas", "--model")} == {
        "--backend": "onnx-int8", "--replicas": "2", "--cpus": "0.5", "--ingress-replicas": "1", "--model": "m"}
    assert "--haproxy" in cmd and cmd[cmd.index("--concurrency") + 1:cmd.index("--concurrency") + 3] == ["1", "32"]


@pytest.mark.slow
def test_weight_layout_bench_times_both_layouts(tiny_model_dir, tmp_path):
    out = tmp_path / "layout.json"
    p = subprocess.run([sys.executable, str(BENCH.parent / "weight_layout.py"), "--model", str(tiny_model_dir),
                        "--data", str(FIXTURE_DATA / "test.jsonl"), "--batch-sizes", "1", "4", "--passes", "6",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "largest difference between the two layouts' logits" in p.stdout
    rows = json.loads(out.read_text())["results"]
    assert [r["batch_size"] for r in rows] == [1, 4]
    for r in rows:
        assert r["row_major_ms"] > 0 and r["column_major_ms"] > 0
        assert r["speedup"] == pytest.approx(r["row_major_ms"] / r["column_major_ms"], rel=1e-2)


@pytest.mark.slow
def test_backends_bench_measures_a_backend_in_its_own_process(tiny_model_dir, tmp_path):
    out = tmp_path / "backends.json"
    p = subprocess.run([sys.executable, str(BENCH.parent / "backends.py"), "--model", str(tiny_model_dir),
                        "--data", str(FIXTURE_DATA / "test.jsonl"), "--backends", "torch", "--batch-sizes", "1", "4",
                        "--limit", "12", "--batch1-limit", "6", "--no-serve", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    [row] = json.loads(out.read_text())["backends"]
    assert "error" not in row, row
    assert row["backend"] == "torch" and row["torch_imported"] is True and row["sentences"] == 12
    assert row["sent_per_s_b1"] > 0 and row["sent_per_s_b4"] > 0 and 0 < row["p50_ms_b1"] <= row["p95_ms_b1"]
    p = subprocess.run([sys.executable, str(BENCH.parent / "backends.py"), "--model", str(tiny_model_dir),
                        "--backends", "onnx", "--no-serve"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "has no ONNX export" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_length_chunks_bench_compares_the_cuts(tiny_model_dir, tmp_path):
    out = tmp_path / "chunks.json"
    # no --data: the sentences come from $SENTIMENT_NB_DATA, which names a folder holding test.jsonl
    p = subprocess.run([sys.executable, str(BENCH.parent / "length_chunks.py"), "--model", str(tiny_model_dir),
                        "--groups", "6", "--costs", "0", "35",
                        "--groups-per-block", "2", "--blocks", "2", "--batch-size", "4", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=env_without_data(SENTIMENT_NB_DATA=str(FIXTURE_DATA)))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["fixed", "cost:0", "cost:35"]
    assert rows["fixed"]["vs_fixed"] == 1 and all(r["ms_per_text"] > 0 for r in rows.values())
    # the fewest passes are the fixed cut's, so a cut that costs least also pads least
    assert rows["cost:0"]["padding"] <= rows["cost:35"]["padding"] <= rows["fixed"]["padding"]
    assert rows["cost:0"]["padding"] == 1  # with passes free, no text is padded


# --- where the sentences come from (bench/common.py) ----------------------------------------------------------------

def test_the_data_path_is_the_flag_else_the_environment_variable(tmp_path):
    common = load_bench("common")
    flag, env = tmp_path / "flag.jsonl", tmp_path / "env.jsonl"
    flag.write_text('{"text": "a"}\n')
    env.write_text('{"text": "b"}\n')
    assert common.data_path(str(flag), environ={"SENTIMENT_NB_DATA": str(env)}) == flag  # the flag wins
    assert common.data_path(None, environ={"SENTIMENT_NB_DATA": str(env)}) == env
    assert common.data_path(None, environ={"SENTIMENT_NB_DATA": str(FIXTURE_DATA)}) == FIXTURE_DATA / "test.jsonl"
    assert common.read_sentences(common.data_path(str(FIXTURE_DATA), environ={}), limit=3) == \
        [json.loads(line)["text"] for line in (FIXTURE_DATA / "test.jsonl").read_text().splitlines()[:3]]


def test_with_neither_the_error_names_both(tmp_path):
    common = load_bench("common")
    with pytest.raises(common.DataError) as e:
        common.data_path(None, environ={})
    assert "--data" in str(e.value) and "SENTIMENT_NB_DATA" in str(e.value)
    with pytest.raises(common.DataError, match="SENTIMENT_NB_DATA.*nope"):
        common.data_path(None, environ={"SENTIMENT_NB_DATA": str(tmp_path / "nope")})
    with pytest.raises(common.DataError, match="--data.*test.jsonl"):
        common.data_path(str(tmp_path), environ={})  # a folder without test.jsonl
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(common.DataError, match="No sentences"):
        common.read_sentences(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a"}\n')
    with pytest.raises(common.DataError, match="line 1"):
        common.read_sentences(tmp_path / "bad.jsonl")


def test_no_script_points_outside_the_repository():
    for name in SCRIPTS:
        src = (BENCH.parent / f"{name}.py").read_text()
        assert "REPO.parent" not in src and "DEFAULT_DATA" not in src and "def read_sentences" not in src, name
        assert load_bench(name).read_sentences.__module__ == "common", name


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_without_data_stops_with_an_error_naming_both(name, tiny_model_dir):
    extra = ["--backends", "torch"] if name == "backends" else []  # the tiny model has no ONNX graphs
    p = subprocess.run([sys.executable, str(BENCH.parent / f"{name}.py"), "--model", str(tiny_model_dir), *extra],
                       capture_output=True, text=True, timeout=120, env=env_without_data())
    assert p.returncode == 2, (p.stdout[-1000:], p.stderr[-2000:])
    assert "--data" in p.stderr and "SENTIMENT_NB_DATA" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_swap_figures_split_the_answers_at_the_command():
    swap = load_bench("swap_load")
    answers = [(0.0, 0.1, 200, "old"), (0.5, 0.7, 200, "old"), (1.0, 1.2, 200, "old"), (1.1, 1.5, 503, None),
               (1.6, 1.7, 200, "new"), (3.0, 3.1, 200, "new")]
    figures = swap.swap_figures(answers, t_cmd=0.9, t_done=2.0, old="old")
    assert figures["requests"] == 6 and figures["non_2xx_or_failed"] == {"503": 1}
    assert figures["p99_before_ms"] == pytest.approx(199.0, abs=0.5)  # the two answers that ended before the command
    assert figures["p99_during_ms"] == pytest.approx(199.0, abs=0.5)  # 0.2 and 0.1 s, sent while it ran
    assert (figures["command_s"], figures["cmd_to_last_old_answer_s"]) == (1.1, 0.3)


def test_swap_bench_refuses_a_model_folder_without_metrics(tiny_model_dir):
    p = subprocess.run([sys.executable, str(BENCH.parent / "swap_load.py"), "--model", str(tiny_model_dir)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "has no metrics.json: give a folder the export stage wrote" in p.stderr, p.stderr
