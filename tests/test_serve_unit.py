"""The serving logic that needs no Ray: request checks, batch bookkeeping, response shaping, options, config."""
import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sentiment_nb.config import ServeParams, load_params
from sentiment_nb.serve import (
    INDEX_HTML,
    CapacityError,
    PredictRequest,
    RequestError,
    build_app,
    check_capacity,
    deployment_options,
    merge_batch,
    request_log,
    request_texts,
    resolve_settings,
    serve_config,
    shape_response,
    split_batch,
    validation_error,
)

REPO = Path(__file__).resolve().parents[1]


def result(label, p_pos):
    return {"label": label, "score": max(p_pos, 1 - p_pos), "probabilities": {"negative": 1 - p_pos, "positive": p_pos}}


# --- request checks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, where", [
    ({"text": 3}, "text"),
    ({"texts": ["ok", 4]}, "texts"),
    ({"texts": "not a list"}, "texts"),
    ({}, "exactly one"),
    ({"text": "a", "texts": ["b"]}, "got both"),
    ({"txt": "typo"}, "txt"),
])
def test_bad_bodies_fail_the_model(body, where):
    with pytest.raises(ValidationError) as e:
        PredictRequest.model_validate(body)
    assert where in str(e.value)


@pytest.mark.parametrize("body, status, kind, words", [
    ({"text": ""}, 422, "empty_text", "`text` is empty"),
    ({"text": " \t\n"}, 422, "empty_text", "only whitespace"),
    ({"texts": ["fine", ""]}, 422, "empty_text", "`texts[1]` is empty"),
    ({"texts": []}, 422, "empty_input", "empty list"),
    ({"text": "x" * 11}, 413, "text_too_long", "11 characters; at most 10"),
    ({"texts": ["ok", "y" * 12]}, 413, "text_too_long", "`texts[1]` has 12 characters"),
    ({"texts": ["a", "b", "c", "d"]}, 413, "too_many_texts", "4 items; at most 3"),
])
def test_limits_give_4xx_with_a_message(body, status, kind, words):
    with pytest.raises(RequestError) as e:
        request_texts(PredictRequest.model_validate(body), max_chars=10, max_texts=3)
    assert (e.value.status, e.value.kind) == (status, kind)
    assert words in e.value.detail


def test_good_requests_pass_unchanged():
    assert request_texts(PredictRequest(text="exactly10!"), 10, 3) == ["exactly10!"]
    assert request_texts(PredictRequest(texts=["a", " b ", "c"]), 10, 3) == ["a", " b ", "c"]


def test_validation_errors_are_readable():
    status, body = validation_error([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error",
                                      "ctx": {"error": "Expecting value"}}])
    assert status == 400 and body["error"] == "malformed_json" and "Expecting value" in body["detail"]
    status, body = validation_error([{"type": "string_type", "loc": ("body", "texts", 2), "msg": "Input should be a valid string"},
                                     {"type": "missing", "loc": ("body",), "msg": "Field required"}])
    assert status == 422
    assert body["detail"].startswith("texts[2]: Input should be a valid string; body: no JSON body")
    assert [e["loc"] for e in body["errors"]] == [["body", "texts", "2"], ["body"]]


# --- batches --------------------------------------------------------------------------------------------------------

def test_merge_sorts_by_length_and_split_restores_each_request():
    requests = [["ccc", "a"], ["bbbbb"], ["dd", "e", "ffffff"]]
    texts, order = merge_batch(requests)
    assert [len(t) for t in texts] == sorted(len(t) for r in requests for t in r)
    assert split_batch([t.upper() for t in texts], order, requests) == [[t.upper() for t in r] for r in requests]


def test_merge_is_stable_for_equal_lengths():
    texts, order = merge_batch([["b", "a"], ["c"]])
    assert texts == ["b", "a", "c"] and order == [0, 1, 2]


def test_split_refuses_a_wrong_number_of_results():
    texts, order = merge_batch([["a", "b"]])
    with pytest.raises(ValueError, match="1 results for 2 texts"):
        split_batch(["A"], order, [["a", "b"]])


# --- responses and logs ---------------------------------------------------------------------------------------------

def test_single_text_gets_one_object_and_texts_get_a_list_in_order():
    rs = [result("positive", 0.9), result("negative", 0.2)]
    one = shape_response(PredictRequest(text="x"), rs[:1])
    assert set(one) == {"label", "score", "probabilities"} and one["label"] == "positive"
    many = shape_response(PredictRequest(texts=["x", "y"]), rs)
    assert [p["label"] for p in many["predictions"]] == ["positive", "negative"]
    assert all(isinstance(v, float) for p in many["predictions"] for v in p["probabilities"].values())


def test_request_log_keeps_text_only_when_asked():
    rs = [result("positive", 0.9), result("positive", 0.8)]
    rec = request_log(["private words", "more"], rs, 3.14159, {"batch_requests": 2, "batch_texts": 7, "model_ms": 1.0})
    assert rec["labels"] == {"positive": 2} and rec["batch_texts"] == 7 and rec["latency_ms"] == 3.14
    assert "private" not in str(rec)
    assert request_log(["private words"], rs[:1], 1.0, log_text=True)["texts"] == ["private words"]


def test_index_page_is_self_contained():
    assert "<script src" not in INDEX_HTML and "<link" not in INDEX_HTML
    assert "http://" not in INDEX_HTML and "https://" not in INDEX_HTML
    for element in ('id="text"', 'id="submit"', 'id="label"', 'id="probs"'):
        assert element in INDEX_HTML


# --- options and config ---------------------------------------------------------------------------------------------

def test_fixed_replicas_and_resources_come_from_settings():
    model, ingress = deployment_options(ServeParams(num_replicas=3, num_cpus=0.25, num_gpus=0.5,
                                                    max_ongoing_requests=40, max_queued_requests=7))
    assert model["num_replicas"] == 3 and "autoscaling_config" not in model
    assert model["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 0.5}
    assert (model["max_ongoing_requests"], model["max_queued_requests"]) == (40, 7)
    assert ingress["ray_actor_options"]["num_cpus"] < 1 and "num_gpus" not in ingress["ray_actor_options"]


def test_autoscaling_replaces_num_replicas():
    model, ingress = deployment_options(ServeParams(num_replicas=4, autoscaling=True, max_batch_size=16))
    for opts in (model, ingress):
        assert "num_replicas" not in opts
        assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}


def test_replicas_that_cannot_fit_are_refused_before_they_wait_for_ever():
    check_capacity(ServeParams(num_replicas=3, num_cpus=0.5), cpus=2)  # 3 x (0.5 + ingress 0.1) = 1.8
    with pytest.raises(CapacityError, match="need 2.4 CPUs; Ray has 2"):
        check_capacity(ServeParams(num_replicas=4, num_cpus=0.5), cpus=2)
    with pytest.raises(CapacityError, match="GPUs; Ray has 0"):
        check_capacity(ServeParams(num_gpus=1), cpus=8, gpus=0)
    check_capacity(ServeParams(num_replicas=2, num_gpus=0.5), cpus=8, gpus=1)
    check_capacity(ServeParams(num_replicas=16, autoscaling=True), cpus=1)  # starts with one


def test_default_ongoing_requests_let_batches_fill():
    sp = load_params(REPO / "params.yaml").serve
    assert deployment_options(sp)[0]["max_ongoing_requests"] > sp.max_batch_size


def test_committed_serve_config_matches_params():
    committed = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert committed == serve_config(load_params(REPO / "params.yaml"))
    app = committed["applications"][0]
    assert app["import_path"] == "sentiment_nb.serve:build_app" and (REPO / app["args"]["params"]).is_file()
    assert "deployments" not in app  # the options live in params.yaml only


def test_builder_args_override_serve_settings(smoke_params_file):
    s = resolve_settings({"params": str(smoke_params_file), "port": "9123", "num_replicas": 2})
    assert (s.serve.port, s.serve.num_replicas) == (9123, 2)


def test_builder_refuses_unknown_keys_and_missing_models(smoke_params_file, tmp_path):
    from sentiment_nb.config import ParamsError
    from sentiment_nb.predict import ModelDirError

    with pytest.raises(ParamsError, match="serve.replicas"):
        resolve_settings({"params": str(smoke_params_file), "replicas": 2})
    with pytest.raises(ModelDirError, match="does not exist"):
        build_app({"params": str(smoke_params_file), "model": str(tmp_path / "nope")})


def test_builder_binds_the_two_deployments(smoke_params_file, tiny_model_dir):
    app = build_app({"params": str(smoke_params_file), "model": str(tiny_model_dir), "num_replicas": 2})
    ingress = app._bound_deployment
    assert ingress.name == "SentimentAPI" and ingress.num_replicas == 2
    model = ingress.init_args[0]._bound_deployment
    assert model.name == "SentimentModel" and model.ray_actor_options["num_cpus"] == 0.5
    assert ingress.init_args[0]._bound_deployment.init_args[0] == str(tiny_model_dir)


# --- the model replica, without Ray ---------------------------------------------------------------------------------

REPLICA_THREADS_SCRIPT = """
import asyncio, json, sys, threading
import torch
from ray.serve import batching
import sentiment_nb.predict as predict_mod
from sentiment_nb.serve import SentimentModel

seen, real_load = [], predict_mod.load_predictor

def load(*args, **kwargs):
    seen.append(["load", threading.get_ident(), None])
    p = real_load(*args, **kwargs)
    real_predict = p.predict
    def predict(texts, *a, **k):
        seen.append(["predict", threading.get_ident(), torch.get_num_threads()])
        return real_predict(texts, *a, **k)
    p.predict = predict
    return p

predict_mod.load_predictor = load
# outside a replica, Serve's batch queue has no replica context to read max_ongoing_requests from, for a warning
batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
replica = SentimentModel.func_or_class(sys.argv[1], max_batch_size=4, backend="torch", threads=2)

async def requests():
    return await asyncio.gather(replica.predict(["a fine film"]), replica.predict(["dull", "very dull"]),
                                replica.health())

one, two, health = asyncio.run(requests())
print(json.dumps({"seen": seen, "forward": replica.forward_thread.submit(threading.get_ident).result(),
                  "caller": threading.get_ident(), "sizes": [len(one["results"]), len(two["results"])],
                  "probe": health["probe"]}))
"""


def run_script(script: str, *args: str) -> dict:
    "Run `script` in a Python process of its own; the JSON it prints last."
    # Its own process: Serve's batch queue lives on the class, and once used, the class no longer pickles for Ray.
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_replica_loads_and_runs_every_forward_pass_on_one_thread_of_its_own(tiny_model_dir):
    # OpenMP keeps a worker pool per thread that starts parallel work: passes spread over a thread pool each bring one.
    got = run_script(REPLICA_THREADS_SCRIPT, str(tiny_model_dir))
    assert got["sizes"] == [1, 2] and got["probe"] in ("negative", "positive")
    kinds = [k for k, _, _ in got["seen"]]
    assert kinds[0] == "load" and kinds.count("predict") >= 2  # the start-up probe, then one batch or more
    assert {ident for _, ident, _ in got["seen"]} == {got["forward"]} != {got["caller"]}
    assert {n for k, _, n in got["seen"] if k == "predict"} == {2}


FAKE_INGRESS = """
class Handle:  # the model deployment as the ingress sees it: `predict.remote(texts)`, awaited
    calls = []

    def __init__(self, answer):
        self.predict, self.answer = self, answer

    async def _call(self, texts):
        Handle.calls.append(len(texts))
        await asyncio.sleep(0.05)
        return await self.answer(texts)

    def remote(self, texts):
        return self._call(texts)

def ingress_with(answer):
    "The ingress class as written (under Serve's ASGI wrapper), its model calls answered by `answer`."
    ingress_class = SentimentAPI.func_or_class.__mro__[1]
    api = ingress_class.__new__(ingress_class)
    ingress_class.__init__(api, Handle(answer), group_size=8, max_groups=1)
    return api
"""

ISOLATION_SCRIPT = """
import asyncio, json, sys
from ray.serve import batching
from sentiment_nb.serve import SentimentAPI, SentimentModel

batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
BAD = "bad \\ud800"  # half a surrogate pair: the tokenizer raises TypeError on it
replica = SentimentModel.func_or_class(sys.argv[1], max_batch_size=8, backend="torch")
forwards, real_forward = [], replica.forward

async def forward(texts):
    forwards.append(len(texts))
    return await real_forward(texts)

replica.forward = forward

""" + FAKE_INGRESS + """
api = ingress_with(replica.predict)

def kind(x):
    return type(x).__name__ if isinstance(x, Exception) else x["results"][0]["label"]

async def main():
    model = await asyncio.gather(replica.predict([BAD]), replica.predict(["a fine film"]), replica.health(),
                                 return_exceptions=True)
    first = asyncio.create_task(api.classify(["the first request"]))
    await asyncio.sleep(0.01)  # in flight: the next two are grouped
    ingress = await asyncio.gather(first, api.classify(["fine", BAD]), api.classify(["dull"]), return_exceptions=True)
    return {"model": [kind(model[0]), kind(model[1]), model[2]["probe"]], "forwards": forwards,
            "ingress": [kind(x) for x in ingress], "calls": Handle.calls}

print(json.dumps(asyncio.run(main())))
"""


def test_a_request_the_model_fails_on_fails_alone(tiny_model_dir):
    # The model replica batches the two calls into one forward pass, which fails, and reruns each alone; the
    # ingress groups two requests into one model call, which fails, and resends each alone. Only the request at
    # fault gets the error, at both levels.
    got = run_script(ISOLATION_SCRIPT, str(tiny_model_dir))
    labels = {"negative", "positive"}
    assert got["model"][0] == "TypeError" and {got["model"][1], got["model"][2]} <= labels
    # the probe's own pass (it skips the batch queue); one merged pass of two texts failed; then each alone
    assert got["forwards"][:4] == [1, 2, 1, 1]
    assert got["ingress"][0] in labels and got["ingress"][1] == "TypeError" and got["ingress"][2] in labels
    assert got["calls"][:4] == [1, 3, 2, 1]  # the first alone; the group of two requests (3 texts); then each alone


BUSY_HEALTH_SCRIPT = """
import asyncio, json, sys
from ray.serve import batching
from sentiment_nb.serve import SentimentModel

batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
replica = SentimentModel.func_or_class(sys.argv[1], max_batch_size=4, backend="torch")

async def queue_never_drains(texts):  # a batch queue full of work that will not be done within the probe's time
    await asyncio.sleep(3600)

replica.predict_batch = queue_never_drains

async def main():
    stuck = asyncio.create_task(replica.predict(["a request in the queue"]))
    health = await asyncio.wait_for(replica.health(), 10)
    stuck.cancel()
    return health

print(json.dumps(asyncio.run(main())))
"""


def test_health_answers_past_a_full_batch_queue(tiny_model_dir):
    got = run_script(BUSY_HEALTH_SCRIPT, str(tiny_model_dir))
    assert got["probe"] in got["labels"] == ["negative", "positive"] and got["backend"] == "torch"


UNAVAILABLE_SCRIPT = """
import asyncio, json
from ray.serve import batching
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import DeploymentUnavailableError
from sentiment_nb.serve import PredictRequest, SentimentAPI

batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None  # needs a replica

""" + FAKE_INGRESS + """

async def failed_to_deploy(texts):
    raise DeploymentUnavailableError(DeploymentID(name="SentimentModel", app_name="sentiment"))

api = ingress_with(failed_to_deploy)

async def main():
    first = asyncio.create_task(api.predict(PredictRequest(text="the first request")))
    await asyncio.sleep(0.01)  # in flight: the next two are grouped
    got = await asyncio.gather(first, api.predict(PredictRequest(texts=["fine", "dull"])),
                               api.predict(PredictRequest(text="long")), return_exceptions=True)
    return {"answers": [type(x).__name__ for x in got], "calls": Handle.calls}

print(json.dumps(asyncio.run(main())))
"""


def test_a_model_deployment_without_replicas_gives_every_request_a_503_not_a_500():
    # Ray Serve's own handler turns a DeploymentUnavailableError raised by the app into a 503; a JSON 500 would
    # blame the request. A group is not resent one by one: no replica could take any of them.
    got = run_script(UNAVAILABLE_SCRIPT)
    assert got == {"answers": ["DeploymentUnavailableError"] * 3, "calls": [1, 3]}


def test_haproxy_env_gives_each_server_its_own_files_and_a_free_port_for_a_taken_default(tmp_path, monkeypatch):
    import socket

    import sentiment_nb.serve as serve_mod

    with socket.socket() as holder:  # a port held by "another server"
        holder.bind(("0.0.0.0", 0))
        held = holder.getsockname()[1]
        free = serve_mod.free_port()
        monkeypatch.setitem(serve_mod.HAPROXY_DEFAULT_PORTS, "RAY_SERVE_HAPROXY_STATS_PORT", held)
        monkeypatch.setitem(serve_mod.HAPROXY_DEFAULT_PORTS, "RAY_SERVE_HAPROXY_METRICS_PORT", free)
        env = serve_mod.haproxy_env(tmp_path / "one")
    stats, metrics = int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])
    assert stats != held and metrics == free  # a free default is kept
    assert {k: v for k, v in env.items() if not k.endswith("_PORT")} == {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(tmp_path / "one" / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(tmp_path / "one" / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(tmp_path / "one"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(tmp_path / "one" / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(tmp_path / "one" / "metrics.sock")}


def test_stop_server_removes_its_haproxy_folder(tmp_path, monkeypatch):
    import sentiment_nb.serve as serve_mod

    folder = tmp_path / "haproxy-serve-x"
    folder.mkdir()
    (folder / "haproxy.cfg").write_text("global\n")
    monkeypatch.setattr(serve_mod, "_haproxy_dir", str(folder))
    serve_mod.stop_server()
    assert not folder.exists() and serve_mod._haproxy_dir is None


def started_env(serve_mod, monkeypatch, tmp_path, haproxy: bool) -> str | None:
    "The HAProxy flag that `start_server` sets for `serve.haproxy: haproxy`, as Ray would start; `stop_server` after."
    from sentiment_nb.config import Params, Settings

    seen = []

    def before_ray(settings):
        seen.append(os.environ.get(serve_mod.HAPROXY_FLAG))
        raise RuntimeError("stop here")

    monkeypatch.setattr(serve_mod, "build_app", before_ray)
    settings = Settings(Params.model_validate({"serve": {"haproxy": haproxy, "port": serve_mod.free_port()}}),
                        root=tmp_path)
    with pytest.raises(RuntimeError, match="stop here"):
        serve_mod.start_server(settings)
    serve_mod.stop_server()  # removes the HAProxy folder, if any, and the variables it set
    return seen[0]


def test_each_server_in_a_process_gets_the_front_its_settings_ask_for(tmp_path, monkeypatch):
    import sentiment_nb.serve as serve_mod

    monkeypatch.delenv(serve_mod.HAPROXY_FLAG, raising=False)
    monkeypatch.setattr(serve_mod, "_haproxy_env", {})
    for name in serve_mod.haproxy_env(tmp_path / "x"):
        monkeypatch.delenv(name, raising=False)
    assert started_env(serve_mod, monkeypatch, tmp_path, haproxy=True) == "1"
    assert serve_mod.HAPROXY_FLAG not in os.environ  # stopped: not passed on to the next server, nor to children
    assert started_env(serve_mod, monkeypatch, tmp_path, haproxy=False) is None  # Ray's default: off
    assert started_env(serve_mod, monkeypatch, tmp_path, haproxy=True) == "1"
    monkeypatch.setenv(serve_mod.HAPROXY_FLAG, "1")  # set by the user: it wins, as documented, and stays
    assert started_env(serve_mod, monkeypatch, tmp_path, haproxy=False) == "1"
    assert os.environ[serve_mod.HAPROXY_FLAG] == "1"


def test_stop_server_removes_the_haproxy_folder_even_when_ray_fails_to_stop(tmp_path, monkeypatch):
    import ray

    import sentiment_nb.serve as serve_mod

    folder = tmp_path / "haproxy-serve-y"
    folder.mkdir()
    monkeypatch.setattr(serve_mod, "_haproxy_dir", str(folder))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: None)

    def failing_shutdown():
        raise RuntimeError("controller gone")

    monkeypatch.setattr(serve_mod.serve, "shutdown", failing_shutdown)
    with pytest.raises(RuntimeError, match="controller gone"):
        serve_mod.stop_server()
    assert not folder.exists() and serve_mod._haproxy_dir is None
