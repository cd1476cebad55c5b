"""The Ray Serve app end to end: one real server on 127.0.0.1 with the tiny model, driven over HTTP and by a browser.

One module-scoped server serves every test here (a Ray start-up costs 20-40 s on two cores). Its queue limits are
tiny, so that a burst of requests overloads it; the other tests send one request at a time. At teardown, every Ray
process that the server started (raylet, gcs_server and the workers under them) must be gone.
"""
import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from helpers import FIXTURE_DATA, export_with_onnx, fixture_texts, free_port, smoke_params, write_params

from sentiment_nb.serve.app import APP_NAME
from sentiment_nb.serve.server import wait_healthy

pytestmark = pytest.mark.slow

SERVE = {"max_batch_size": 2, "max_ongoing_requests": 3, "max_queued_requests": 2, "max_chars": 200,
         "max_texts": 8, "batch_wait_timeout_s": 0.2, "num_cpus": 0.5}
# Three fixture sentences to which the (untrained) tiny model gives P(positive) about 2e-5 apart: enough to tell
# them apart at a tolerance of 5e-6, far above float noise, so that the order checks can fail.
TEXTS = ["an utterly forgettable thriller with a shallow script", "a funny and touching thriller .", "meh ."]
LONG = "the plot is nothing but boilerplate clichés from start to finish , and the actors look bored ."


@dataclass
class Server:
    url: str
    ray_pids: dict  # pid -> process name, for every process under the test's raylet and gcs_server


@dataclass
class OnnxApp:
    url: str
    model: Path  # the model folder it serves


def ray_processes() -> dict[int, str]:
    "The raylet and gcs_server started by this test process, and everything under them."
    found = {}
    for child in psutil.Process().children():
        try:
            name = child.name()
            if "raylet" in name or "gcs_server" in name:
                found[child.pid] = name
                found.update({p.pid: p.name() for p in child.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return found


def haproxy_command_lines(pids) -> list[list[str]]:
    "The command lines of the HAProxy processes among `pids` (`haproxy -db -f <folder>/<node id>/haproxy.cfg`)."
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).name() == "haproxy":
                out.append(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            pass
    return out


def assert_all_end(started: dict, timeout_s: float = 60) -> None:
    "Wait up to `timeout_s` for the processes `started` (pid -> name) to end; fail naming any still running."
    deadline = time.monotonic() + timeout_s
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(started), {pid: started[pid] for pid in alive(started)}


def kill_leftovers(proc, started: dict) -> None:
    "Kill the command `proc` (its process group if it has its own) and what it `started`: nothing for the next tests."
    if proc.poll() is None:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
    for pid in alive(started):
        psutil.Process(pid).kill()


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    import ray

    from sentiment_nb.config import load_params
    from sentiment_nb.serve.server import start_server, stop_server

    if ray.is_initialized():  # another module's Ray: this server needs its own session
        ray.shutdown()
    folder = tmp_path_factory.mktemp("serve")
    params = write_params(folder / "params.yaml", smoke_params(
        FIXTURE_DATA, tiny_model_dir, serve={**SERVE, "model": str(tiny_model_dir), "port": free_port()}))
    url = start_server(load_params(params), num_cpus=2, log_to_driver=False)
    pids = ray_processes()
    try:
        assert any("raylet" in n for n in pids.values()) and any("gcs_server" in n for n in pids.values()), pids
        yield Server(url, pids)
    finally:
        stop_server()
        deadline = time.monotonic() + 60  # gcs_server can take a while to go
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {pid: pids[pid] for pid in alive(pids)}
        for pid in left:  # do not leave them to the next tests, but fail all the same
            psutil.Process(pid).kill()
        assert not left, f"Ray processes left running after stop_server(): {left}"


def post(server, body=None, **kw):
    return httpx.post(server.url + "/predict", json=body, timeout=60, **kw) if body is not None else \
        httpx.post(server.url + "/predict", timeout=60, **kw)


def check_prediction(p):
    "One prediction: a label, its score and the probabilities; a lone text's also names the model that answered."
    assert set(p) - {"model_version"} == {"label", "score", "probabilities"}
    assert p.get("model_version", "sha256:").startswith("sha256:")
    assert set(p["probabilities"]) == {"negative", "positive"}  # the names of the model's id2label
    assert abs(sum(p["probabilities"].values()) - 1) < 1e-5
    assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    assert p["score"] == pytest.approx(p["probabilities"][p["label"]])


# --- the contract ---------------------------------------------------------------------------------------------------

def test_one_text_gives_one_prediction(server, tiny_model_dir):
    from sentiment_nb.model_dir import model_version

    r = post(server, {"text": TEXTS[0]})
    assert r.status_code == 200, r.text
    check_prediction(r.json())
    assert r.json()["model_version"] == r.headers["x-model-version"] == model_version(tiny_model_dir)


def test_texts_give_predictions_in_input_order(server, tiny_model_dir):
    from sentiment_nb.predict import Predictor

    expected = Predictor(tiny_model_dir, device="cpu").predict(TEXTS)
    ps = sorted(e["probabilities"]["positive"] for e in expected)
    assert min(b - a for a, b in zip(ps, ps[1:], strict=False)) > 1.5e-5, f"the tiny model cannot tell these apart: {ps}"
    r = post(server, {"texts": TEXTS})
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert len(got) == len(TEXTS) and r.json()["model_version"] == r.headers["x-model-version"]
    for g, e in zip(got, expected, strict=True):
        check_prediction(g)
        assert g["label"] == e["label"]
        assert g["probabilities"]["positive"] == pytest.approx(e["probabilities"]["positive"], abs=5e-6), (got, expected)
    # reversed input, reversed answer: the order is the caller's, not the batch's length order
    back = post(server, {"texts": TEXTS[::-1]}).json()["predictions"]
    assert [p["probabilities"]["positive"] for p in back] == pytest.approx(
        [p["probabilities"]["positive"] for p in got[::-1]], abs=5e-6)


BAD = [
    ("malformed JSON", {"content": b'{"text": "unclosed', "headers": {"content-type": "application/json"}}, 400,
     "not valid JSON: Unterminated string starting at (character 9)"),
    ("no body", {"content": b"", "headers": {"content-type": "application/json"}}, 422, "no JSON body"),
    ("missing field", {"json": {}}, 422, "exactly one of `text`"),
    ("misspelled field", {"json": {"txt": "a fine film"}}, 422, "txt: Extra inputs are not permitted: the fields are "
                                                                "`text` (one sentence) or `texts`"),
    ("both fields", {"json": {"text": "a", "texts": ["b"]}}, 422, "got both"),
    ("number for text", {"json": {"text": 42}}, 422, "text: Input should be a valid string"),
    ("number in texts", {"json": {"texts": ["ok", 7]}}, 422, "texts[1]: Input should be a valid string"),
    ("texts not a list", {"json": {"texts": "a fine film"}}, 422, "texts"),
    ("JSON list body", {"json": ["a fine film"]}, 422, "body"),
    ("empty text", {"json": {"text": ""}}, 422, "`text` is empty"),
    ("whitespace text", {"json": {"text": "  \n\t "}}, 422, "only whitespace"),
    ("empty texts", {"json": {"texts": []}}, 422, "empty list"),
    ("blank item", {"json": {"texts": ["fine", " "]}}, 422, "`texts[1]` is empty"),
    ("text too long", {"json": {"text": "x" * 201}}, 413, "201 characters; at most 200"),
    ("too many texts", {"json": {"texts": ["fine"] * 9}}, 413, "9 items; at most 8"),
    ("lone surrogate", {"content": b'{"texts": ["fine", "bad \\ud800"]}', "headers": {"content-type": "application/json"}},
     422, "`texts[1]` holds '\\ud800' at character 4"),
    ("body not UTF-8", {"content": b'{"text": "\xff"}', "headers": {"content-type": "application/json"}}, 400,
     "error parsing the body. Send a UTF-8 JSON object"),
    ("form body", {"content": b"text=a+fine+film", "headers": {"content-type": "application/x-www-form-urlencoded"}},
     422, "Content-Type: application/json"),
    ("body over any valid size", {"json": {"text": "x" * 30_000}}, 413,  # refused before parsing, not as too long
     "bytes; a request within serve.max_texts and serve.max_chars has at most 20352"),
]


@pytest.mark.parametrize("case, request_kw, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_with_a_message(server, case, request_kw, status, words):
    r = httpx.post(server.url + "/predict", timeout=60, **request_kw)
    assert r.status_code == status, f"{case}: {r.status_code} {r.text}"
    body = r.json()
    assert set(body) >= {"error", "detail"}
    assert words in body["detail"], body


def test_a_chunked_body_is_capped_as_it_arrives(server):
    "A body with no Content-Length is counted as it streams in: served under the cap, a 413 past it."
    def chunks(body: bytes, size: int):
        yield from (body[i:i + size] for i in range(0, len(body), size))

    headers = {"content-type": "application/json"}
    small = httpx.post(server.url + "/predict", content=chunks(b'{"text": "a funny and touching thriller ."}', 7),
                       headers=headers, timeout=60)
    assert "content-length" not in small.request.headers
    assert small.status_code == 200 and small.json()["label"] in ("positive", "negative"), small.text
    big = httpx.post(server.url + "/predict", content=chunks(b'{"text": "' + b"x" * 30_000 + b'"}', 4096),
                     headers=headers, timeout=60)
    assert (big.status_code, big.json()["error"]) == (413, "body_too_large"), big.text
    assert "The body has more than 20352 bytes" in big.json()["detail"]


def test_wrong_method_and_path_are_4xx(server):
    for r, status, kind in ((httpx.get(server.url + "/predict"), 405, "method_not_allowed"),
                            (httpx.get(server.url + "/nope"), 404, "not_found")):
        assert (r.status_code, r.json()["error"]) == (status, kind), r.text


def test_healthz_reports_a_loaded_model(server):
    r = httpx.get(server.url + "/healthz", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["labels"] == ["negative", "positive"] and body["device"] == "cpu"


def test_index_page_has_the_form(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<form id="form"' in r.text and 'id="text"' in r.text


def test_openapi_documents_the_contract(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert set(spec["paths"]) >= {"/predict", "/healthz"}
    schemas = spec["components"]["schemas"]
    assert {"PredictRequest", "Prediction", "BatchPrediction", "ErrorResponse"} <= set(schemas)
    assert set(spec["paths"]["/predict"]["post"]["responses"]) >= {"200", "413", "422", "503"}
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "cdn." not in docs.text  # no CDN: the page works offline
    script = docs.text.split('<script src="')[1].split('"')[0]
    js = httpx.get(server.url + script)
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text


def test_overload_gets_503_and_the_server_recovers(server):
    body = {"texts": [LONG] * 8}

    def one(_):
        return httpx.post(server.url + "/predict", json=body, timeout=120)

    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(one, range(96)))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert codes.count(503) > 0, "a burst of 96 requests did not overflow a queue of 2"
    assert codes.count(200) > 0
    assert post(server, {"text": TEXTS[0]}).status_code == 200  # no lasting harm


def test_requests_that_wait_together_share_one_call_to_the_model(server):
    # A is alone: it goes straight to the model, whose idle window (batch_wait_timeout_s) keeps it in flight for a
    # while. B and C come meanwhile: the ingress groups them (window batch_wait_timeout_s, at most max_batch_size = 2).
    texts = {name: [f"{name * n} {t}" for t in TEXTS] for n, name in enumerate("ABC", 1)}  # told apart by length

    def send(name):
        if name != "A":
            time.sleep(SERVE["batch_wait_timeout_s"] / 4)
        return httpx.post(server.url + "/predict", json={"texts": texts[name]}, timeout=60)

    with ThreadPoolExecutor(3) as pool:
        answers = dict(zip("ABC", pool.map(send, "ABC"), strict=True))
    assert {k: a.status_code for k, a in answers.items()} == dict.fromkeys("ABC", 200)
    chars = {k: sum(map(len, t)) for k, t in texts.items()}
    recs = {k: wait_records(lambda r, c=c: r["chars"] == c and r["n_texts"] == 3) for k, c in chars.items()}
    assert {k: [r["group_requests"] for r in rs] for k, rs in recs.items()} == {"A": [1], "B": [2], "C": [2]}
    assert recs["B"][0]["batch_texts"] >= 6
    for name in "ABC":  # each got its own results, in its own order
        alone = post(server, {"texts": texts[name]}).json()["predictions"]
        got = [p["probabilities"]["positive"] for p in answers[name].json()["predictions"]]
        assert got == pytest.approx([p["probabilities"]["positive"] for p in alone], abs=5e-6)


def wait_records(match, n: int = 1, timeout_s: float = 30) -> list[dict]:
    "The request records that `match`, once there are `n` of them (the logs are written as requests end)."
    from sentiment_nb.serve.api import request_records
    from sentiment_nb.serve.server import log_dir

    deadline, recs = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        recs = [r for r in request_records(log_dir()) if match(r)]
        if len(recs) >= n:
            return recs
        time.sleep(0.5)
    raise AssertionError(f"{len(recs)} matching request records in {log_dir()} after {timeout_s} s, not {n}")


def test_requests_are_logged_as_records_without_their_text(server):
    from sentiment_nb.serve.server import log_dir

    secret = "a never-seen sentence about a marvellous heist ."
    assert post(server, {"texts": [secret, TEXTS[1]]}).status_code == 200
    recs = wait_records(lambda r: r["n_texts"] == 2 and r["chars"] == len(secret) + len(TEXTS[1]))
    rec = recs[-1]
    assert rec["status"] == 200 and rec["latency_ms"] > 0 and sum(rec["labels"].values()) == 2
    assert rec["batch_texts"] >= 2 and rec["model_ms"] > 0
    assert rec["group_requests"] == 1  # it found no call to the model in flight, so it went alone
    logged = "".join(p.read_text() for p in log_dir().glob("replica_*.log"))
    assert secret not in logged  # serve.log_text is off: no raw text in the logs


def test_monitor_reads_the_servers_own_logs_and_tells_drift_from_none(server, tiny_model_dir, tmp_path, capsys):
    "Traffic like the reference, then shifted traffic, each a bounded loopback batch; `monitor` on the server's logs."
    import numpy as np

    from sentiment_nb.cli import main
    from sentiment_nb.monitor import write_reference
    from sentiment_nb.serve.server import log_dir

    model = tmp_path / "model"  # the served weights, with the reference of the fixture sentences (as `export` writes)
    shutil.copytree(tiny_model_dir, model)
    reference = fixture_texts()
    write_reference(model, reference, backend="torch")
    rng = np.random.default_rng(0)
    like = [reference[i] for i in rng.integers(0, len(reference), 256)]
    shifted = [f"the {w} firmware of this router bricked overnight ; refund requested twice , no reply"[:SERVE["max_chars"]]
               for w in ("cheap", "new", "latest", "wireless")] * 64
    verdicts = []
    for phase, texts in (("like", like), ("shifted", shifted)):
        logged = len(wait_records(lambda r: "per_text" in r, n=0))
        for start in range(0, len(texts), SERVE["max_texts"]):
            assert post(server, {"texts": texts[start:start + SERVE["max_texts"]]}).status_code == 200
        wait_records(lambda r: "per_text" in r, n=logged + len(texts) // SERVE["max_texts"])
        code = main(["monitor", "--logs", str(log_dir()), "--model", str(model), "--window", str(len(texts)),
                     "--out", str(tmp_path / phase)])
        verdicts.append((code, json.loads((tmp_path / phase / "summary.json").read_text())))
    capsys.readouterr()
    (like_code, like_summary), (shifted_code, shifted_summary) = verdicts
    assert (like_code, like_summary["verdict"], like_summary["window"]) == (0, "no drift", 256), like_summary["signals"]
    assert (shifted_code, shifted_summary["verdict"]) == (1, "drift")
    assert {"n_tokens", "split_share"} <= set(shifted_summary["drifted"]), shifted_summary["drifted"]
    assert not like_summary["with_text"]  # serve.log_text is off: the features alone


# --- an ONNX replica, as `serve.backend: auto` picks it -------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_app(server, tiny_model_dir, tmp_path_factory):
    "A second application on the same Serve instance, at /onnx: `auto` on a model folder with ONNX graphs and scores."
    from ray import serve

    from sentiment_nb.config import load_params
    from sentiment_nb.onnx_export import write_onnx
    from sentiment_nb.serve.app import build_app

    root = tmp_path_factory.mktemp("onnx_project")
    write_onnx(tiny_model_dir, root / "onnx", fixture_texts(), batch_size=8)
    model = export_with_onnx(tiny_model_dir, root / "onnx", root / "project")
    params = write_params(root / "params.yaml", smoke_params(
        FIXTURE_DATA, tiny_model_dir, serve={**SERVE, "model": str(model), "backend": "auto"}))
    serve.run(build_app(load_params(params)), name="onnx", route_prefix="/onnx")
    url = server.url + "/onnx"
    try:
        wait_healthy(url, 120)
        yield OnnxApp(url, model)
    finally:
        serve.delete("onnx")


def replica_maps_libtorch(app: str) -> bool:
    "Whether the model replica of Serve application `app` has PyTorch's library loaded (found by its process title)."
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if f"ServeReplica:{app}:SentimentModel" in " ".join(proc.info["cmdline"] or []):
            found.append(any("libtorch" in m.path for m in proc.memory_maps()))
    assert len(found) == 1, f"expected one model replica of {app!r}, found {len(found)}"
    return found[0]


def test_onnx_replica_answers_like_the_int8_predictor(onnx_app):
    from sentiment_nb.predict import load_predictor

    health = httpx.get(onnx_app.url + "/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["backend"] == "onnx-int8"  # what `auto` picks with these scores
    r = httpx.post(onnx_app.url + "/predict", json={"texts": TEXTS}, timeout=60)
    assert r.status_code == 200, r.text
    got = [p["probabilities"]["positive"] for p in r.json()["predictions"]]
    # int8 quantizes activations per batch, so a sentence's score moves with its batch-mates (by ~1e-5 here):
    # compare with the same batches as the replica's, of serve.max_batch_size sentences sorted by length
    local = load_predictor(onnx_app.model, "onnx-int8", batch_size=SERVE["max_batch_size"], threads=1)
    want = [p["probabilities"]["positive"] for p in local.predict(TEXTS)]
    assert got == pytest.approx(want, abs=1e-6)


def test_onnx_replica_never_loads_torch_while_the_torch_one_does(onnx_app):
    assert replica_maps_libtorch("onnx") is False
    assert replica_maps_libtorch("sentiment") is True  # the check can tell


def test_custom_metrics_reach_prometheus(server):
    from sentiment_nb.serve.server import metrics_url

    assert post(server, {"texts": TEXTS}).status_code == 200
    assert post(server, {"text": " "}).status_code == 422
    want = ['ray_sentiment_predictions_total{', 'label="', 'ray_sentiment_errors_total{', 'error="empty_text"',
            "ray_serve_num_http_requests",  # Serve's own metrics, on the same endpoint
            'ray_serve_num_http_error_requests_total{', 'error_code="503"']  # the overload test's rejections:
    # Serve's proxy answers and counts them before the app sees the request
    deadline, text = time.monotonic() + 90, ""  # Ray exports metrics every few seconds
    while time.monotonic() < deadline:
        try:
            text = httpx.get(metrics_url(), timeout=10).text
        except httpx.HTTPError:
            text = ""
        if all(w in text for w in want):
            break
        time.sleep(2)
    missing = [w for w in want if w not in text]
    assert not missing, f"not in {metrics_url()}: {missing}"
    labels = {line.split('label="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("ray_sentiment_predictions_total{")}
    assert labels <= {"negative", "positive"} and labels


# --- the page, in a real browser ------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]
APT_HINT = "apt-get install -y chromium chromium-driver"


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip(f"no headless browser: chromium={binary}, chromedriver={driver}; install them with `{APT_HINT}`")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium'}"]:
        opts.add_argument(flag)
    d = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=opts)
    try:
        yield d
    finally:
        d.quit()


def test_page_classifies_a_typed_sentence(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    browser.find_element(By.ID, "text").send_keys(TEXTS[0])
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "label").get_attribute("data-label"))
    shown = browser.find_element(By.ID, "label").text
    assert shown == post(server, {"text": TEXTS[0]}).json()["label"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#probs .row")
    assert [r.find_element(By.CLASS_NAME, "name").text for r in rows] == ["negative", "positive"]


def test_docs_page_renders_the_api_without_internet_access(server, browser):
    "The test machine reaches no CDN: Swagger UI renders only from files the server itself serves."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/docs")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/predict", "/healthz"} <= paths, paths


def test_page_shows_the_error_of_a_blank_sentence(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    browser.find_element(By.ID, "text").send_keys("   ")
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text.startswith("422: `text` is empty")


@pytest.fixture
def overloaded_page():
    "The page under a route prefix without a trailing slash (`/app`), from a stand-in that answers Serve's 503."
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sentiment_nb.serve.api import INDEX_HTML

    class Handler(BaseHTTPRequestHandler):
        posted = []

        def reply(self, status, ctype, body: bytes):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.reply(200, "text/html; charset=utf-8", INDEX_HTML.encode())

        def do_POST(self):
            Handler.posted.append(self.path)
            self.reply(503, "text/plain; charset=utf-8", b"Request dropped due to backpressure")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/app", Handler.posted
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_page_under_a_prefix_posts_next_to_itself_and_shows_a_plain_text_503(overloaded_page, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, posted = overloaded_page
    browser.get(url)
    assert browser.find_element(By.ID, "docs").get_attribute("href") == url + "/docs"
    browser.find_element(By.ID, "text").send_keys(TEXTS[0])
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == "503: Request dropped due to backpressure"
    assert posted == ["/app/predict"]


# --- the console script -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("haproxy", [False, True], ids=["serve-proxy+dashboard", "haproxy"])
def test_the_serve_command_prints_its_url_and_stops_cleanly_on_sigterm(tiny_model_dir, tmp_path, haproxy):
    """Both front ends: Serve's own proxy (the loopback default) and HAProxy (the default on other hosts, so the
    Docker image's): the same answers and errors through either, and a prompt, complete stop. With `--dashboard`,
    Ray's own Serve CLI (`serve status`) works from another shell that knows nothing of Ray's token auth."""
    import subprocess
    import sys

    port = free_port()
    cli = Path(sys.executable).parent / "sentiment-nb"
    params = write_params(tmp_path / "params.yaml", {"serve": {"num_cpus": 0.25, "haproxy": haproxy}})
    # A $TMPDIR as long as this test's pushed HAProxy's socket paths past its limit, and it crashed at start-up; and
    # with no $RAY_TMPDIR, Ray's own sockets under it overflowed AF_UNIX's 107 bytes, so Ray could not start either.
    # (Ray's dashboard cannot take one that long: its forkserver's socket path overflows, hence one or the other.)
    run_dir = tmp_path / "tmp"
    run_dir.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}, "TMPDIR": str(run_dir)} if haproxy else None
    proc = subprocess.Popen([str(cli), "serve", "--model", str(tiny_model_dir), "--port", str(port),
                             "--params", str(params), *([] if haproxy else ["--dashboard"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    started = {}
    try:
        line = proc.stdout.readline()  # printed once /healthz answers
        assert line.startswith(f"Serving {tiny_model_dir} (sha256:") and f") at {url}/" in line, \
            (line, proc.wait(60), proc.stderr.read()[-3000:])
        assert httpx.get(url + "/healthz", timeout=30).status_code == 200
        check_prediction(httpx.post(url + "/predict", json={"text": TEXTS[0]}, timeout=60).json())
        r = httpx.post(url + "/predict", json={"text": " "}, timeout=60)
        assert (r.status_code, r.json()["error"]) == (422, "empty_text"), r.text
        started = {p.pid: p.name() for p in psutil.Process(proc.pid).children(recursive=True)}
        assert any("raylet" in n for n in started.values()), started
        from sentiment_nb.serve.server import server_file

        record = server_file(port) if not haproxy else next(run_dir.glob(f"sentiment-nb-*/server-{port}.json"))
        assert json.loads(record.read_text())["pid"] == proc.pid  # what `sentiment-nb swap` reads
        configs = [Path(c[c.index("-f") + 1]) for c in haproxy_command_lines(started)]
        assert len(configs) == haproxy, started
        if not haproxy:
            shell = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
            status = subprocess.run([str(cli.parent / "serve"), "status"], capture_output=True, text=True,
                                    timeout=120, env=shell)
            assert status.returncode == 0, status.stderr[-2000:]
            app = yaml.safe_load(status.stdout)["applications"][APP_NAME]
            assert app["status"] == "RUNNING", status.stdout
            assert {d: v["status"] for d, v in app["deployments"].items()} == \
                {"SentimentModel": "HEALTHY", "SentimentAPI": "HEALTHY"}, status.stdout
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and err.rstrip().endswith("Stopped."), err[-2000:]
        assert time.monotonic() - t0 < 20  # about 6 s here; HAProxy's own draining default alone would be 30 s
        assert not [c for c in configs if c.parents[1].exists()], configs  # the server's HAProxy folder is gone
        assert not record.exists()  # and its record
        assert_all_end(started)
    finally:
        kill_leftovers(proc, started)


def serve_command_in_background(model: Path, folder: Path):
    "`sentiment-nb serve` on `model` and a free port, its stdout and stderr in `folder`/out and `folder`/err."
    import subprocess
    import sys

    params = write_params(folder / "params.yaml", {"serve": {"num_cpus": 0.25}})
    cli = Path(sys.executable).parent / "sentiment-nb"
    with open(folder / "out", "w") as out_file, open(folder / "err", "w") as err_file:
        return subprocess.Popen([str(cli), "serve", "--model", str(model), "--port", str(free_port()),
                                 "--params", str(params)], stdout=out_file, stderr=err_file, text=True, cwd=folder)


def test_a_model_that_cannot_load_in_its_replica_ends_the_serve_command_with_one_line(tiny_model_dir, tmp_path):
    "A weights file cut short passes the folder check and fails in the replica: exit 2 with the replica's reason."
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = serve_command_in_background(model, tmp_path)
    started = {}
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:  # every process Ray starts, to check after
            try:
                started.update({p.pid: p.name() for p in psutil.Process(proc.pid).children(recursive=True)})
            except psutil.Error:
                pass
            time.sleep(0.5)
        proc.wait(10)
        out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
        assert proc.returncode == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("sentiment-nb: error: The server did not start: SentimentModel: ") and \
            "ModelDirError: Could not load the model in" in last and "Serving" not in out, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert_all_end(started)
    finally:
        kill_leftovers(proc, started)


def test_the_serve_command_exits_when_rays_node_dies_under_it(tiny_model_dir, tmp_path):
    "The raylet killed (as by the OOM killer): the command exits 1 with a line that says so, and leaves nothing."
    proc = serve_command_in_background(tiny_model_dir, tmp_path)
    started = {}
    try:
        deadline = time.monotonic() + 180
        while "Serving" not in (tmp_path / "out").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-3000:]
            time.sleep(0.5)
        started = {p.pid: p.name() for p in psutil.Process(proc.pid).children(recursive=True)}
        raylet = [pid for pid, name in started.items() if name == "raylet"]
        assert len(raylet) == 1, started
        os.kill(raylet[0], signal.SIGKILL)
        proc.wait(120)
        err = (tmp_path / "err").read_text()
        assert proc.returncode == 1, err[-3000:]
        assert "sentiment-nb: error: Ray's raylet stopped, so the server is gone" in err, err[-3000:]
        assert_all_end(started)
    finally:
        kill_leftovers(proc, started)


def test_serve_run_with_the_committed_config(tiny_model_dir, tmp_path):
    "Ray's own `serve run serve_config.yaml`, with the committed file (only the port changed), answers and stops."
    import subprocess
    import sys

    from helpers import REPO

    port = free_port()
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_params(tmp_path / "params.yaml", smoke_params(FIXTURE_DATA, tiny_model_dir,
                                                         serve={"model": str(tiny_model_dir), "port": port}))
    cli = Path(sys.executable).parent / "serve"
    # SIGINT as a terminal leaves it: a test run started in the background (`cmd &`) inherits it ignored, and
    # `serve run`, which only catches KeyboardInterrupt, would then never stop.
    proc = subprocess.Popen([str(cli), "run", "serve_config.yaml"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url, started = f"http://127.0.0.1:{port}", {}
    try:
        health = wait_healthy(url, timeout_s=180)  # `serve run` prints no URL to wait for
        started = {p.pid: p.name() for p in psutil.Process(proc.pid).children(recursive=True)}
        assert health["labels"] == ["negative", "positive"]
        check_prediction(httpx.post(url + "/predict", json={"text": TEXTS[0]}, timeout=60).json())
        assert httpx.get(url + "/", timeout=30).status_code == 200
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out[-3000:]
        assert_all_end(started)
    finally:
        kill_leftovers(proc, started)


def test_the_serve_command_says_why_haproxy_did_not_start(tiny_model_dir, tmp_path):
    "An HAProxy that cannot start (here: a socket path set past its limit) is a one-line error, not a traceback."
    import subprocess
    import sys

    too_long = tmp_path / ("x" * 100) / "admin.sock"
    cli = Path(sys.executable).parent / "sentiment-nb"
    params = write_params(tmp_path / "params.yaml", {"serve": {"num_cpus": 0.25, "haproxy": True}})
    proc = subprocess.Popen([str(cli), "serve", "--model", str(tiny_model_dir), "--port", str(free_port()),
                             "--params", str(params)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "RAY_SERVE_HAPROXY_SOCKET_PATH": str(too_long)})
    started = {}
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:  # a child may end between the listing and its name
                started.update({p.pid: p.name() for p in psutil.Process(proc.pid).children(recursive=True)})
            except psutil.Error:
                pass
            time.sleep(0.5)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (proc.returncode, err[-3000:])  # EXIT_USAGE, as for the other set-up errors
        assert "Traceback" not in err, err[-3000:]
        last = err.rstrip().splitlines()[-1]
        assert last.startswith("sentiment-nb: error: HAProxy did not start: ") and "too long" in last, last
        assert "serve.haproxy: false" in last, last
        assert any("raylet" in n for n in started.values()), started
        assert_all_end(started)
    finally:
        kill_leftovers(proc, started)


def test_a_sigterm_to_the_whole_process_group_leaves_no_haproxy_behind(tiny_model_dir, tmp_path):
    """`timeout`, `kill -- -PGID` and systemd signal Ray's workers too: Serve's controller dies under the shutdown
    (which then waits 30 s for it), and an HAProxy outlived everything, holding the ports, until `stop_server` ended
    the ones running on its folder."""
    import subprocess
    import sys

    from sentiment_nb.serve.server import haproxy_pids

    port = free_port()
    cli = Path(sys.executable).parent / "sentiment-nb"
    params = write_params(tmp_path / "params.yaml", {"serve": {"num_cpus": 0.25, "haproxy": True}})
    proc = subprocess.Popen([str(cli), "serve", "--model", str(tiny_model_dir), "--port", str(port),
                             "--params", str(params)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, start_new_session=True)  # its own process group, as a shell job has
    started = {}
    try:
        line = proc.stdout.readline()
        assert line.startswith("Serving "), (line, proc.poll())
        started = {p.pid: p.name() for p in psutil.Process(proc.pid).children(recursive=True)}
        folders = {Path(c[c.index("-f") + 1]).parents[1] for c in haproxy_command_lines(started)}
        assert len(folders) == 1, started
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and err.rstrip().endswith("Stopped."), err[-2000:]
        folder = folders.pop()
        assert haproxy_pids(folder) == [] and not folder.exists()
        with httpx.Client() as client:  # nothing answers on the port any more
            with pytest.raises(httpx.ConnectError):
                client.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert_all_end(started)
    finally:
        kill_leftovers(proc, started)
