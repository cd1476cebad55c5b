"""The serving logic that needs no Ray: request checks, batch bookkeeping, response shaping, options, config."""
import os
import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sentiment_nb.config import ServeParams, load_params
from sentiment_nb.serve.api import (
    INDEX_HTML,
    PredictRequest,
    RequestError,
    request_log,
    request_texts,
    shape_response,
    validation_error,
)
from sentiment_nb.serve.app import (
    build_app,
    deployment_options,
    merge_batch,
    resolve_settings,
    serve_config,
    split_batch,
)
from sentiment_nb.serve.server import CapacityError, check_capacity

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
    assert app["import_path"] == "sentiment_nb.serve.app:build_app" and (REPO / app["args"]["params"]).is_file()
    assert "deployments" not in app  # the options live in params.yaml only


def test_builder_args_override_serve_settings(smoke_params_file):
    s = resolve_settings({"params": str(smoke_params_file), "port": "9123", "num_replicas": 2})
    assert (s.serve.port, s.serve.num_replicas) == (9123, 2)


def test_builder_refuses_unknown_keys_and_missing_models(smoke_params_file, tmp_path):
    from sentiment_nb.config import ParamsError
    from sentiment_nb.model_dir import ModelDirError

    with pytest.raises(ParamsError, match="serve.replicas"):
        resolve_settings({"params": str(smoke_params_file), "replicas": 2})
    with pytest.raises(ModelDirError, match="does not exist"):
        build_app({"params": str(smoke_params_file), "model": str(tmp_path / "nope")})


def test_builder_binds_the_two_deployments(smoke_params_file, tiny_model_dir):
    app = build_app({"params": str(smoke_params_file), "model": str(tiny_model_dir), "num_replicas": 2})
    ingress = app._bound_deployment
    assert ingress.name == "SentimentAPI" and ingress.num_replicas == 2
    model = ingress.init_kwargs["model"]._bound_deployment  # bound by keyword: .bind(model=..., settings=...)
    assert model.name == "SentimentModel" and model.ray_actor_options["num_cpus"] == 0.5
    assert ingress.init_kwargs["model"]._bound_deployment.init_kwargs["model_dir"] == str(tiny_model_dir)


# --- the model replica, without Ray ---------------------------------------------------------------------------------

REPLICA_THREADS_SCRIPT = """
import asyncio, json, sys, threading
import torch
from ray.serve import batching
import sentiment_nb.predict as predict_mod
from sentiment_nb.config import ServeParams
from sentiment_nb.serve.app import SentimentModel

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
replica = SentimentModel.func_or_class(sys.argv[1], backend="torch",
                                       settings=ServeParams(max_batch_size=4, intra_op_threads=2))

async def requests():
    return await asyncio.gather(replica.predict(["a fine film"]), replica.predict(["dull", "very dull"]),
                                replica.health())

one, two, health = asyncio.run(requests())
print(json.dumps({"seen": seen, "forward": replica.forward_thread.submit(threading.get_ident).result(),
                  "caller": threading.get_ident(), "sizes": [len(one["results"]), len(two["results"])],
                  "probe": health["probe"]}))
"""


def script_results(scripts: dict[str, tuple[str, ...]], folder: Path) -> dict[str, dict]:
    "Run each script (with its arguments) in a Python process of its own, all at once; the JSON each prints last."
    # Its own process: Serve's batch queue lives on the class, and once used, the class no longer pickles for Ray.
    # All at once: each spends most of its time importing torch and Ray, which two cores overlap well.
    import json
    import subprocess
    import sys

    procs = {}
    for name, (script, *args) in scripts.items():
        with open(folder / f"{name}.out", "w") as out, open(folder / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen([sys.executable, "-c", script, *args], stdout=out, stderr=err, text=True)
    try:
        for p in procs.values():
            p.wait(timeout=300)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    results = {}
    for name, p in procs.items():
        out, err = (folder / f"{name}.out").read_text(), (folder / f"{name}.err").read_text()
        results[name] = json.loads(out.strip().splitlines()[-1]) if p.returncode == 0 and out.strip() else \
            {"failed": p.returncode, "stderr": err[-3000:]}
    return results


@pytest.fixture(scope="module")
def replica_runs(tiny_model_dir, tmp_path_factory) -> dict[str, dict]:
    "What the replica scripts below printed, run side by side on the tiny model."
    model = str(tiny_model_dir)
    return script_results({"threads": (REPLICA_THREADS_SCRIPT, model), "isolation": (ISOLATION_SCRIPT, model),
                           "busy": (BUSY_HEALTH_SCRIPT, model), "unavailable": (UNAVAILABLE_SCRIPT,),
                           "canary": (CANARY_SCRIPT,)},
                          tmp_path_factory.mktemp("replica_scripts"))


def run_script(runs: dict[str, dict], name: str) -> dict:
    "The JSON that script `name` printed last; a failure with its stderr if it exited non-zero."
    got = runs[name]
    assert "failed" not in got, got
    return got


@pytest.mark.slow  # a Python process of its own that imports torch and Ray: seconds each
def test_a_replica_loads_and_runs_every_forward_pass_on_one_thread_of_its_own(replica_runs):
    # OpenMP keeps a worker pool per thread that starts parallel work: passes spread over a thread pool each bring one.
    got = run_script(replica_runs, "threads")
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
    ingress_class.__init__(api, Handle(answer), ServeParams(max_batch_size=8, max_ongoing_requests=8),  # groups of 8,
                           reference={})  # one at a time; no reference gauges
    return api
"""

ISOLATION_SCRIPT = """
import asyncio, json, sys
from ray.serve import batching
from sentiment_nb.config import ServeParams
from sentiment_nb.serve.app import SentimentAPI, SentimentModel

batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
BAD = "bad \\ud800"  # half a surrogate pair: the tokenizer raises TypeError on it
replica = SentimentModel.func_or_class(sys.argv[1], backend="torch", settings=ServeParams(max_batch_size=8))
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


@pytest.mark.slow  # a Python process of its own that imports torch and Ray: seconds each
def test_a_request_the_model_fails_on_fails_alone(replica_runs):
    # The model replica batches the two calls into one forward pass, which fails, and reruns each alone; the
    # ingress groups two requests into one model call, which fails, and resends each alone. Only the request at
    # fault gets the error, at both levels.
    got = run_script(replica_runs, "isolation")
    labels = {"negative", "positive"}
    assert got["model"][0] == "TypeError" and {got["model"][1], got["model"][2]} <= labels
    # the probe's own pass (it skips the batch queue); one merged pass of two texts failed; then each alone
    assert got["forwards"][:4] == [1, 2, 1, 1]
    assert got["ingress"][0] in labels and got["ingress"][1] == "TypeError" and got["ingress"][2] in labels
    assert got["calls"][:4] == [1, 3, 2, 1]  # the first alone; the group of two requests (3 texts); then each alone


BUSY_HEALTH_SCRIPT = """
import asyncio, json, sys
from ray.serve import batching
from sentiment_nb.config import ServeParams
from sentiment_nb.serve.app import SentimentModel

batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
replica = SentimentModel.func_or_class(sys.argv[1], backend="torch", settings=ServeParams(max_batch_size=4))

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


@pytest.mark.slow  # a Python process of its own that imports torch and Ray: seconds each
def test_health_answers_past_a_full_batch_queue(replica_runs):
    got = run_script(replica_runs, "busy")
    assert got["probe"] in got["labels"] == ["negative", "positive"] and got["backend"] == "torch"


UNAVAILABLE_SCRIPT = """
import asyncio, json
from ray.serve import batching
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import DeploymentUnavailableError
from sentiment_nb.config import ServeParams
from sentiment_nb.serve.api import PredictRequest
from sentiment_nb.serve.app import SentimentAPI

batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None  # needs a replica

""" + FAKE_INGRESS + """

async def failed_to_deploy(texts):
    raise DeploymentUnavailableError(DeploymentID(name="SentimentModel", app_name="sentiment"))

api = ingress_with(failed_to_deploy)

async def main():
    from fastapi import Response

    first = asyncio.create_task(api.predict(PredictRequest(text="the first request"), Response()))
    await asyncio.sleep(0.01)  # in flight: the next two are grouped
    got = await asyncio.gather(first, api.predict(PredictRequest(texts=["fine", "dull"]), Response()),
                               api.predict(PredictRequest(text="long"), Response()), return_exceptions=True)
    return {"answers": [type(x).__name__ for x in got], "calls": Handle.calls}

print(json.dumps(asyncio.run(main())))
"""


CANARY_SCRIPT = """
import asyncio, json
from fastapi import Response
from ray.serve import batching
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import DeploymentUnavailableError
from sentiment_nb.config import ServeParams
from sentiment_nb.serve.api import PredictRequest
from sentiment_nb.serve.app import ModelCalls, SentimentAPI

batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None  # needs a replica

""" + FAKE_INGRESS + """

def answers_as(version):
    async def answer(texts):
        return {"results": [{"label": "positive", "score": 0.9, "probabilities": {"negative": 0.1, "positive": 0.9}}
                            for _ in texts], "model_version": version}
    return answer

async def dropped(texts):
    raise DeploymentUnavailableError(DeploymentID(name="SentimentCanary", app_name="sentiment"))

async def main():
    out = {}
    for name, canary, share in [("share", answers_as("canary"), 0.3), ("dropped", dropped, 1.0)]:
        api = ingress_with(answers_as("prod"))
        api.settings = ServeParams(max_batch_size=8, max_ongoing_requests=8, canary="c", canary_share=share)
        api.canary = ModelCalls(Handle(canary), api.settings)
        headers = []
        for n in range(400 if name == "share" else 20):
            response = Response()
            body = await api.predict(PredictRequest(text="fine"), response)
            assert body["model_version"] == response.headers["x-model-version"]
            headers.append(body["model_version"])
        out[name] = {v: headers.count(v) for v in set(headers)}
    return out

print(json.dumps(asyncio.run(main())))
"""


@pytest.mark.slow
def test_the_canary_answers_its_share_and_the_main_model_answers_when_the_canary_cannot(replica_runs):
    got = run_script(replica_runs, "canary")
    assert set(got["share"]) == {"prod", "canary"} and abs(got["share"]["canary"] / 400 - 0.3) < 0.08, got
    assert got["dropped"] == {"prod": 20}, got  # a canary being dropped (or failing) costs no request


@pytest.mark.slow  # a Python process of its own that imports torch and Ray: seconds each
def test_a_model_deployment_without_replicas_gives_every_request_a_503_not_a_500(replica_runs):
    # Ray Serve's own handler turns a DeploymentUnavailableError raised by the app into a 503; a JSON 500 would
    # blame the request. A group is not resent one by one: no replica could take any of them.
    got = run_script(replica_runs, "unavailable")
    assert got == {"answers": ["DeploymentUnavailableError"] * 3, "calls": [1, 3]}


def test_haproxy_env_gives_each_server_its_own_files_and_a_free_port_for_a_taken_default(tmp_path):
    import socket

    import sentiment_nb.serve.server as server_mod

    with socket.socket() as holder:  # a port held by "another server"
        holder.bind(("0.0.0.0", 0))
        held = holder.getsockname()[1]
        free = server_mod.free_port()
        env = server_mod.haproxy_env(tmp_path / "one", {"RAY_SERVE_HAPROXY_STATS_PORT": held,
                                                         "RAY_SERVE_HAPROXY_METRICS_PORT": free})
    stats, metrics = int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])
    assert stats != held and metrics == free  # a free default is kept
    assert {k: v for k, v in env.items() if not k.endswith("_PORT")} == {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(tmp_path / "one" / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(tmp_path / "one" / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(tmp_path / "one"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(tmp_path / "one" / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(tmp_path / "one" / "metrics.sock")}
    assert set(server_mod.haproxy_env(tmp_path / "two")) == set(env)  # Ray's defaults, when none are given


def test_stop_server_removes_its_haproxy_folder(tmp_path):
    from sentiment_nb.serve.server import ServeLauncher

    folder = tmp_path / "haproxy-serve-x"
    folder.mkdir()
    (folder / "haproxy.cfg").write_text("global\n")
    launcher = ServeLauncher()
    launcher.haproxy_dir = str(folder)
    launcher.stop()
    assert not folder.exists() and launcher.haproxy_dir is None


def started_env(server_mod, launcher, monkeypatch, tmp_path, haproxy: bool) -> str | None:
    "The HAProxy flag that `launcher.start` sets for `serve.haproxy: haproxy`, as Ray would start; `stop` after."
    from sentiment_nb.config import Params, Settings

    seen = []

    def before_ray(settings):
        seen.append(os.environ.get(server_mod.HAPROXY_FLAG))
        raise RuntimeError("stop here")

    monkeypatch.setattr(server_mod, "build_app", before_ray)
    settings = Settings(Params.model_validate({"serve": {"haproxy": haproxy, "port": server_mod.free_port()}}),
                        root=tmp_path)
    with pytest.raises(RuntimeError, match="stop here"):
        launcher.start(settings)
    launcher.stop()  # removes the HAProxy folder, if any, and puts back the variables it set
    return seen[0]


def test_each_server_in_a_process_gets_the_front_its_settings_ask_for(tmp_path, monkeypatch):
    import sentiment_nb.serve.server as server_mod

    monkeypatch.delenv(server_mod.HAPROXY_FLAG, raising=False)
    for name in [*server_mod.haproxy_env(tmp_path / "x"), *server_mod.RAY_DEFAULTS]:
        monkeypatch.delenv(name, raising=False)
    launcher = server_mod.ServeLauncher()
    assert started_env(server_mod, launcher, monkeypatch, tmp_path, haproxy=True) == "1"
    assert server_mod.HAPROXY_FLAG not in os.environ  # stopped: not passed on to the next server, nor to children
    assert not {*server_mod.haproxy_env(tmp_path / "x"), *server_mod.RAY_DEFAULTS} & set(os.environ)  # all put back
    assert started_env(server_mod, launcher, monkeypatch, tmp_path, haproxy=False) is None  # Ray's default: off
    assert started_env(server_mod, launcher, monkeypatch, tmp_path, haproxy=True) == "1"
    monkeypatch.setenv(server_mod.HAPROXY_FLAG, "1")  # set by the user: it wins, as documented, and stays
    assert started_env(server_mod, launcher, monkeypatch, tmp_path, haproxy=False) == "1"
    assert os.environ[server_mod.HAPROXY_FLAG] == "1"


def test_stop_server_removes_the_haproxy_folder_even_when_ray_fails_to_stop(tmp_path, monkeypatch):
    import ray

    import sentiment_nb.serve.server as server_mod

    folder = tmp_path / "haproxy-serve-y"
    folder.mkdir()
    launcher = server_mod.ServeLauncher()
    launcher.haproxy_dir = str(folder)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: None)

    def failing_shutdown():
        raise RuntimeError("controller gone")

    monkeypatch.setattr(server_mod.serve, "shutdown", failing_shutdown)
    with pytest.raises(RuntimeError, match="controller gone"):
        launcher.stop()
    assert not folder.exists() and launcher.haproxy_dir is None


def test_start_server_and_stop_server_are_the_process_launchers():
    from sentiment_nb.serve import server

    assert server.start_server == server.PROCESS_LAUNCHER.start and server.stop_server == server.PROCESS_LAUNCHER.stop


def test_every_start_failure_is_a_serve_start_error_and_none_is_a_capacity_error():
    from sentiment_nb.serve import server

    for error in (server.PortInUseError, server.CapacityError, server.HAProxyStartError, server.DeployError):
        assert issubclass(error, server.ServeStartError)
    assert not issubclass(server.PortInUseError, server.CapacityError)
    assert not issubclass(server.HAProxyStartError, server.CapacityError)
    with pytest.raises(server.PortInUseError, match="Stop what uses the port"):
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            server.check_port_free("127.0.0.1", taken.getsockname()[1])


# --- the OpenAPI schema agrees with the server -----------------------------------------------------------------------

BODIES = [{"text": "a"}, {"texts": ["a", "b"]}, {"text": "a", "texts": ["b"]}, {}, {"text": "a", "texts": None},
          {"text": None, "texts": ["b"]}, {"text": None, "texts": None}, {"texts": []}, {"txt": "a"}, {"text": 3}]


@pytest.mark.parametrize("body", BODIES, ids=[str(b) for b in BODIES])
def test_the_openapi_schema_of_predict_accepts_exactly_what_the_model_does(body):
    "A body the schema allows is one the server parses, and back: both `text` and `texts` fails both (`oneOf`)."
    import jsonschema

    from sentiment_nb.serve.app import app

    spec = app.openapi()
    ref = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    by_schema = jsonschema.Draft202012Validator(schema).is_valid(body)
    try:
        PredictRequest.model_validate(body)
        by_model = True
    except ValidationError:
        by_model = False
    assert by_schema == by_model, (body, schema)


def test_the_openapi_schema_says_one_of_text_or_texts():
    from sentiment_nb.serve.app import app

    schema = app.openapi()["components"]["schemas"]["PredictRequest"]
    assert [branch["required"] for branch in schema["oneOf"]] == [["text"], ["texts"]]


# --- Ray's folders on a short path ----------------------------------------------------------------------------------

LONG_TMPDIR = "/tmp/" + "t" * 15  # 11 characters longer than /tmp, as in the issue: the tests' own folders overflow
MACOS_TMPDIR = "/var/folders/7x/" + "k" * 30 + "/T"  # 48 characters, as macOS's: Ray's default folder overflows


@pytest.mark.parametrize("variable", ["RAY_TMPDIR", "TMPDIR"])
def test_start_server_gives_ray_a_short_temp_folder_under_a_long_tmpdir(variable, monkeypatch):
    import ray

    from sentiment_nb.serve import server

    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv(variable, MACOS_TMPDIR)
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    server.start_ray(ServeParams())
    temp = seen["_temp_dir"]
    assert temp == f"/tmp/ray-{os.getuid()}" and Path(temp).is_dir()
    session_socket = f"{temp}/session_2026-12-07_19-03-26_123456_4194304/sockets/plasma_store"
    assert len(session_socket) <= 107
    monkeypatch.setenv(variable, "/tmp")  # Ray's default fits: left alone
    server.start_ray(ServeParams())
    assert seen["_temp_dir"] is None


def test_no_short_temp_folder_is_one_line_that_says_what_to_do(monkeypatch, tmp_path):
    from sentiment_nb import config

    someone_else = os.getuid() + 4242
    folder = Path(f"/tmp/ray-{someone_else}")
    existed = folder.exists()
    monkeypatch.setattr(os, "getuid", lambda: someone_else)  # /tmp/ray-<uid> exists, and is not this user's
    try:
        folder.mkdir(exist_ok=True)
        with pytest.raises(config.RayTempDirError) as e:
            config.short_ray_dir()
    finally:
        if not existed:
            folder.rmdir()
    message = str(e.value)
    assert "\n" not in message and "at most 107 bytes" in message and "set RAY_TMPDIR to a short folder" in message


PROBE_TEST = """
import os

def test_ray_tmpdir():
    print("RAY_TMPDIR=" + os.environ["RAY_TMPDIR"])
"""


@pytest.mark.slow  # a Python process of its own that imports torch and Ray: seconds each
def test_the_test_setup_keeps_rays_folders_short_under_a_long_tmpdir(tmp_path):
    "The suite's own set-up (tests/testenv.py) under a $TMPDIR 11 characters longer than /tmp: Ray's sockets fit."
    import subprocess
    import sys

    long_tmp = Path(LONG_TMPDIR)
    made = not long_tmp.exists()
    long_tmp.mkdir(exist_ok=True)
    (tmp_path / "test_probe.py").write_text(PROBE_TEST)
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}
    env.update(TMPDIR=str(long_tmp), PYTHONPATH=str(REPO / "tests"))
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "testenv", "-p", "no:cacheprovider",
                              "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_probe.py")],
                             capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    finally:
        if made:
            shutil.rmtree(long_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ray_tmpdir = next(line.split("=", 1)[1] for line in out.stdout.splitlines() if line.startswith("RAY_TMPDIR="))
    # Ray adds `ray/session_<date>_<time>_<pid>/sockets/plasma_store` to $RAY_TMPDIR
    assert len(f"{ray_tmpdir}/ray/session_2026-12-07_19-03-26_123456_4194304/sockets/plasma_store") <= 107, ray_tmpdir
