"""`sentiment-nb predict` on the tiny model, and the user errors of `predict` and `serve` (exit 2, one line, no traceback)."""
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

from sentiment_nb.cli import build_parser, main, serve_settings

SENTENCES = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés ."]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_prediction(p):
    assert set(p) == {"label", "score", "probabilities"}
    assert set(p["probabilities"]) == {"negative", "positive"}
    assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert p["score"] == pytest.approx(max(p["probabilities"].values()))


def test_predict_one_text_prints_one_object(capsys, tiny_model_dir):
    code, out, err = run(capsys, "predict", SENTENCES[0], "--model", str(tiny_model_dir))
    assert code == 0, err
    check_prediction(json.loads(out))


def test_predict_several_texts_prints_a_list_in_order(capsys, sharp_model_dir):
    code, out, _ = run(capsys, "predict", *SENTENCES, "--model", str(sharp_model_dir), "--batch-size", "1")
    got = json.loads(out)
    assert code == 0 and isinstance(got, list) and len(got) == 2
    for p in got:
        check_prediction(p)
    # The two texts score apart by far more than the 1e-5 tolerance below, so another order (length-sorted) would show.
    assert abs(got[0]["probabilities"]["positive"] - got[1]["probabilities"]["positive"]) > 1e-3
    # The default batch size pads both texts into one batch, so the floats may differ in the last bits.
    _, out_rev, _ = run(capsys, "predict", *SENTENCES[::-1], "--model", str(sharp_model_dir))
    rev = json.loads(out_rev)[::-1]
    assert [p["label"] for p in rev] == [p["label"] for p in got]
    for a, b in zip(rev, got, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_predict_reads_stdin_with_a_dash(capsys, monkeypatch, tiny_model_dir):
    monkeypatch.setattr(sys, "stdin", io.StringIO(SENTENCES[0] + "\n\n" + SENTENCES[1] + "\n"))
    code, out, _ = run(capsys, "predict", "-", "--model", str(tiny_model_dir))
    assert code == 0 and len(json.loads(out)) == 2


def incomplete_model(tiny_model_dir, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").unlink()
    return d


def test_predict_finds_the_model_where_serve_does(capsys, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("SENTIMENT_NB_PARAMS")
    (tmp_path / "params.yaml").write_text("serve:\n  model: out/model\n")
    shutil.copytree(tiny_model_dir, tmp_path / "out" / "model")
    (tmp_path / "nbs").mkdir()
    monkeypatch.chdir(tmp_path / "nbs")  # a folder of the project, as in JupyterLab
    code, out, err = run(capsys, "predict", SENTENCES[0])
    assert code == 0, err
    check_prediction(json.loads(out))
    (tmp_path / "params.yaml").write_text("serve:\n  modle: out/model\n")
    code, out, err = run(capsys, "predict", SENTENCES[0])
    assert code == 2 and "unknown key `serve.modle`" in err, err
    (tmp_path / "params.yaml").unlink()  # no project around: ./model
    code, out, err = run(capsys, "predict", SENTENCES[0])
    assert code == 2 and f"{tmp_path / 'nbs' / 'model'}" in err and "does not exist" in err, err
    monkeypatch.setenv("SENTIMENT_NB_PARAMS", str(tmp_path / "gone.yaml"))  # asked for: not silently ./model
    code, out, err = run(capsys, "predict", SENTENCES[0])
    assert code == 2 and "Params file" in err and "gone.yaml' does not exist" in err, err


@pytest.mark.parametrize("case, argv, words", [
    ("missing folder", lambda m, t: ["predict", "fine", "--model", str(t / "no_such_model")], "does not exist"),
    ("incomplete folder", lambda m, t: ["predict", "fine", "--model", str(incomplete_model(m, t))], "is incomplete"),
    ("empty text", lambda m, t: ["predict", "", "--model", str(m)], "empty"),
    ("blank text", lambda m, t: ["predict", "fine", "  ", "--model", str(m)], "Text 1 is empty"),
    ("serve, missing folder", lambda m, t: ["serve", "--model", str(t / "no_such_model"), "--port", str(free_port())],
     "does not exist"),
    ("serve, missing params", lambda m, t: ["serve", "--params", str(t / "nope.yaml")], "does not exist"),
])
def test_user_errors_exit_2_with_one_clear_line(capsys, tiny_model_dir, tmp_path, case, argv, words):
    code, out, err = run(capsys, *argv(tiny_model_dir, tmp_path))
    assert code == 2, (case, out, err)
    assert out == ""
    assert err.startswith("sentiment-nb: error: ") and words in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_serve_on_a_taken_port_exits_2_with_one_clear_line(capsys, tiny_model_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run(capsys, "serve", "--model", str(tiny_model_dir), "--port", str(port))
    assert code == 2 and out == "", err
    assert err.startswith(f"sentiment-nb: error: Cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1, err


def fake_server(monkeypatch, stop_server) -> tuple:
    "`sentiment-nb serve` with Ray Serve faked: it starts at once, gets a Ctrl-C, and stops with `stop_server`."
    import os
    import signal

    from sentiment_nb.serve import server

    monkeypatch.setattr(server, "start_server", lambda settings, **kw: "http://127.0.0.1:9")
    monkeypatch.setattr(server, "stop_server", stop_server)
    monkeypatch.setattr(server, "log_dir", lambda: Path("/nowhere/logs/serve"))
    monkeypatch.setattr(server, "metrics_url", lambda: "http://127.0.0.1:9/metrics")
    monkeypatch.setattr(server, "ray_address", lambda: "127.0.0.1:9")
    monkeypatch.setattr(server, "wait_healthy", lambda url, timeout_s: {"model_ref": "m", "model_version": "sha256:0"})
    monkeypatch.setattr(server, "dead_ray_processes", lambda: os.kill(os.getpid(), signal.SIGINT) or [])  # a Ctrl-C
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # the handlers to find back


def test_a_second_signal_while_stopping_does_not_cut_the_shutdown_short(capsys, monkeypatch, tiny_model_dir):
    import os
    import signal

    stopped = []

    def stop_server():  # `docker stop` and another Ctrl-C arrive while Ray shuts down
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        stopped.append("done")

    before = fake_server(monkeypatch, stop_server)
    code, out, err = run(capsys, "serve", "--model", str(tiny_model_dir))
    assert code == 0 and stopped == ["done"], err
    assert "Stopping (SIGINT)" in err and "SIGTERM ignored: still stopping" in err and "SIGINT ignored" in err
    assert err.rstrip().endswith("Stopped.")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_serve_exits_1_when_rays_node_dies_and_still_stops_what_is_left(capsys, monkeypatch, tiny_model_dir):
    import signal

    from sentiment_nb.serve import server

    stopped = []
    before = fake_server(monkeypatch, lambda: stopped.append("done"))
    checks = iter([[], [], ["raylet"]])  # two checks find the node up, the third finds its raylet dead
    monkeypatch.setattr(server, "dead_ray_processes", lambda: next(checks))
    monkeypatch.setattr("sentiment_nb.cli.WATCH_INTERVAL_S", 0.01)
    code, out, err = run(capsys, "serve", "--model", str(tiny_model_dir))
    assert code == 1 and stopped == ["done"], err
    assert "sentiment-nb: error: Ray's raylet stopped, so the server is gone; see the logs in /nowhere/logs." in err
    assert "Stopped." not in err and out.startswith("Serving ")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_signal_handlers_are_restored_even_when_stopping_fails(monkeypatch, tiny_model_dir):
    import signal

    def stop_server():
        raise RuntimeError("Ray would not stop")

    before = fake_server(monkeypatch, stop_server)
    with pytest.raises(RuntimeError, match="would not stop"):  # a bug, with its traceback
        main(["serve", "--model", str(tiny_model_dir)])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("argv", [["predict"], ["predict", "x", "--batch-size", "0"], ["serve", "--port", "70000"],
                                  ["serve", "--replicas", "many"], ["frobnicate"]])
def test_bad_options_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage: sentiment-nb" in capsys.readouterr().err


def test_console_script_without_a_model_fails_cleanly(tmp_path):
    exe = Path(sys.executable).parent / "sentiment-nb"
    if not exe.exists():
        pytest.skip("the sentiment-nb console script is not installed (pip install -e .)")
    p = subprocess.run([str(exe), "predict", "a fine film", "--model", str(tmp_path / "model")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().startswith("sentiment-nb: error: Model folder") and "Traceback" not in p.stderr


def test_serve_options_override_the_params_file(smoke_params_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["serve", "--params", str(smoke_params_file), "--model", "here/model",
                                      "--host", "0.0.0.0", "--port", "9100", "--replicas", "3"])
    s = serve_settings(args)
    assert (s.serve.host, s.serve.port, s.serve.num_replicas) == ("0.0.0.0", 9100, 3)
    assert s.resolve(s.serve.model) == tmp_path / "here" / "model"  # relative to the current folder
    plain = serve_settings(build_parser().parse_args(["serve", "--params", str(smoke_params_file)]))
    assert plain.serve.port == 8000 and plain.serve.host == "127.0.0.1"


def test_serve_without_any_params_file_uses_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SENTIMENT_NB_PARAMS")
    s = serve_settings(build_parser().parse_args(["serve"]))
    assert s.serve.port == 8000 and s.resolve(s.serve.model) == tmp_path / "model"
    s = serve_settings(build_parser().parse_args(["serve", "--port", "8001"]))
    assert s.serve.port == 8001
