"""The model server (`make serve-model`: flows/serve.py `model`, sft_pipeline/model_server.py) as its real process on
a free port: it follows the champion alias without failing a request, keeps serving when a new champion fails to
load, and answers input it cannot use with 400 and a message naming the row and field. Also: the served models'
input checks (both tasks) as pure functions, and the registry never leaving one version with both aliases."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sft_pipeline.tasks import classification, instruction
from sft_pipeline.tasks.base import InputError
from sft_pipeline.tracking import CHALLENGER, CHAMPION, promote, use_store
from tests.conftest import ROOT, prepared_project, project_params

# ---------------------------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("given, texts", [
    ("one text", ["one text"]),
    (["a", "b"], ["a", "b"]),
    (np.array(["a", "b"]), ["a", "b"]),
    (np.array("a"), ["a"]),  # {"inputs": "a"}
    (pd.Series(["a"], name="body"), ["a"]),
    (pd.DataFrame({"id": [1], "text": ["a"]}), ["a"]),  # extra fields are ignored
    (pd.DataFrame({0: ["a"]}), ["a"]),  # a list, as MLflow turns it into a frame
    ({"text": np.array(["a", "b"])}, ["a", "b"]),  # {"inputs": {"text": [...]}}
    ([{"text": np.array("a")}], ["a"]),  # {"inputs": [{"text": "a"}]}
    ([], []),
    (pd.DataFrame(), []),  # {"dataframe_records": []}
])
def test_classifier_takes_texts_in_every_shape_mlflow_hands_over(given, texts):
    assert classification.texts_of(given) == texts


@pytest.mark.parametrize("given, message", [
    (pd.DataFrame({"txt": ["a"]}), "no `text` field: the records have `txt`"),
    ({"body": ["a"]}, "no `text` field: the input has `body`"),
    ([{"txt": "a"}], "row 0: no `text` field"),
    ([5], "row 0: `text` is 5 (a number), not a string"),
    (np.array([5]), "row 0: `text` is 5 (a number), not a string"),
    (["ok", 5.5], "1 of 2 rows cannot be answered (rows count from 0): row 1: `text` is 5.5 (a number)"),
    (pd.DataFrame({"text": ["ok", None]}), "row 1: `text` is null or missing"),
    (pd.DataFrame({"text": [True]}), "row 0: `text` is true (a boolean), not a string"),
    (["", "  "], "row 0: `text` is empty (''); row 1: `text` is empty ('  ')"),
    ([["a"]], "row 0: `text` is a list, not a string"),
    (np.zeros((2, 2)), "expected a list of texts, got an array of shape [2, 2]"),
    (7, "expected texts, got 7 (a number)"),
])
def test_classifier_names_the_row_and_field_it_cannot_classify(given, message):
    with pytest.raises(InputError) as raised:
        classification.texts_of(given)
    assert message in str(raised.value)
    assert '{"dataframe_records": [{"text": "a text"}' in str(raised.value)  # and says what to send


def test_a_text_that_cleaning_leaves_empty_is_refused_and_many_bad_rows_are_counted():
    with pytest.raises(InputError, match=r"2 of 3 rows .* row 0: `text` is empty after cleaning \('<p> </p>'.*"
                                         r"row 2: `text` is empty after cleaning"):
        classification.model_texts(["<p> </p>", "Shares rose", "\u200b"], {})
    assert classification.model_texts(["<b>Shares</b>  rose"], {"lowercase": True}) == ["shares rose"]
    with pytest.raises(InputError, match=r"8 of 8 rows .* row 4: .*; and 3 more rows\."):
        classification.texts_of(list(range(8)))


CONV = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("given, conversations", [
    ({"prompt": np.array(["a", "b"]), "system": np.array("Be brief.")},  # {"inputs": {"prompt": [...], ...}}
     [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}] for p in "ab"]),
    ([{"prompt": np.array("a")}], [[{"role": "user", "content": "a"}]]),  # {"inputs": [{"prompt": "a"}]}
    (pd.DataFrame({"messages": [CONV, np.nan], "prompt": [np.nan, "Yo"]}),  # shapes mixed in one request
     [CONV, [{"role": "user", "content": "Yo"}]]),
    ({"messages": np.array(CONV)}, [CONV]),
    ([], []),
    (pd.DataFrame(), []),
])
def test_assistant_takes_prompts_and_conversations_as_mlflow_hands_them_over(given, conversations):
    assert instruction.conversations_of(given) == conversations


@pytest.mark.parametrize("given, message", [
    (pd.DataFrame({"text": ["Hi"]}), "each row needs `messages` (a list of {role, content}) or `prompt` (a string); "
                                     "the records have `text`"),
    ([{"text": "Hi"}], "row 0: needs `messages` (a list of {role, content}) or `prompt` (a string); it has `text`"),
    (pd.DataFrame({"prompt": ["ok", 5, None]}), "2 of 3 rows cannot be answered (rows count from 0): row 1: `prompt` "
                                                "is 5 (a number), not a string; row 2: needs `messages`"),
    (pd.DataFrame({"prompt": ["a"], "system": [3]}), "row 0: `system` is 3 (a number), not a string"),
    (pd.DataFrame({"messages": ["not json"]}), "row 0: `messages` is a string that is not JSON"),
    (pd.DataFrame({"messages": [[{"role": "user"}]]}), "row 0: a message must be {role: system|user|assistant"),
    ([[]], "row 0: a conversation to answer must end with a user message"),
    (5, "expected prompts or conversations, got 5 (a number)"),
])
def test_assistant_names_the_row_and_field_it_cannot_answer(given, message):
    with pytest.raises(InputError) as raised:
        instruction.conversations_of(given)
    assert message in str(raised.value)


def test_assistant_refuses_a_prompt_that_cleaning_leaves_empty():
    options = instruction.Clean(strip_html=True)
    with pytest.raises(InputError, match=r"2 of 3 rows .* row 0: the last user message is empty after cleaning; "
                                         r"row 2: the last user message is empty after cleaning"):
        instruction.model_conversations(["<b></b>", "Hi", ""], options)


# ---------------------------------------------------------------------------------------------- the registry


def test_a_version_never_holds_both_aliases(tmp_path):
    from mlflow.tracking import MlflowClient

    from sft_pipeline import tracking
    from sft_pipeline.params import parse
    from sft_pipeline.tracking import Comparison, Gate

    params = parse(project_params(tmp_path))
    client = MlflowClient(use_store(params.paths))
    experiment = tracking.experiment_id(params.paths, params.mlflow)
    name = params.mlflow.registered_model
    client.create_registered_model(name)

    def version() -> tuple[str, str]:
        run = client.create_run(experiment).info.run_id
        return run, str(client.create_model_version(name, "file:///unused", run).version)

    def paired(new: float, champion: float, champion_version: str) -> Gate:
        comparison = Comparison(params.mlflow.promotion_metric, new, champion, new - champion - 0.05,
                                new - champion + 0.05, 40, 1000, 0)
        return Gate("scored", new, champion_version, comparison)

    def aliases() -> dict[str, str]:
        return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}

    first_run, first = version()
    assert promote(first_run, first, params.mlflow, Gate("none", 0.8))["alias"] == CHAMPION
    second_run, second = version()
    assert promote(second_run, second, params.mlflow, paired(0.7, 0.8, first))["alias"] == CHALLENGER
    assert aliases() == {CHAMPION: first, CHALLENGER: second}
    # The challenger passes the gate later (here: a lower margin): it becomes champion and stops being challenger.
    lower = params.mlflow.model_copy(update={"promotion_margin": -0.2})
    assert promote(second_run, second, lower, paired(0.7, 0.8, first))["alias"] == CHAMPION
    assert aliases() == {CHAMPION: second}


# ---------------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body=None, content_type: str = "application/json") -> tuple[int, object, dict]:
    """(status, headers (case-insensitive), JSON body) of a GET, or of a POST of `body` (JSON-encoded unless
    bytes)."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def wait_until(what, seconds: float, why: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{why}: not within {seconds:.0f} s")


def register_copy(params, tmp: Path, name: str, change) -> tuple[str, str]:
    """The trained model folder copied, changed by `change(folder)`, logged and registered as evaluate does (no
    alias); (run id, version)."""
    import mlflow

    from sft_pipeline import strategies, tasks, tracking
    from stages.evaluate import log_model

    folder = tmp / name
    shutil.copytree(params.paths.model_dir, folder)
    change(folder)
    copy = params.model_copy(update={"paths": params.paths.model_copy(update={"model_dir": folder})})
    info = json.loads((folder / strategies.MODEL_INFO).read_text())
    with mlflow.start_run(experiment_id=tracking.experiment_id(params.paths, params.mlflow)) as run:
        mlflow.log_metric(params.mlflow.promotion_metric, 1.0)
        version = log_model(copy, tasks.get(params), info)
    return run.info.run_id, version


def always(label_id: int):
    """A change that makes the classifier answer `label_id` for every text, with a score of about 1."""

    def change(folder: Path):
        from safetensors.torch import load_file, save_file

        weights = load_file(str(folder / "model.safetensors"))
        weights["classifier.weight"].zero_()
        weights["classifier.bias"].zero_()
        weights["classifier.bias"][label_id] = 50.0
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return change


def corrupt(folder: Path):
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_bert):
    """v1 trained and evaluated through the stages (champion); v2, the same model answering one label for every
    text, and v3, whose weights are unreadable, registered without an alias. The server polls every second."""
    from stages import evaluate, tokenize, train

    tmp = tmp_path_factory.mktemp("served")
    params, params_file = prepared_project(tmp, tiny_bert, train__epochs=3, serve__model_poll_s=1)
    for stage in (tokenize, train, evaluate):
        assert stage.main(["--params", str(params_file)]) == 0
    use_store(params.paths)
    labels = json.loads((params.paths.model_dir / "config.json").read_text())["id2label"]
    business = next(int(i) for i, label in labels.items() if label == "business")
    _, always_business = register_copy(params, tmp, "always-business", always(business))
    _, broken = register_copy(params, tmp, "broken", corrupt)
    return params, tmp, {"always_business": always_business, "broken": broken,
                         "v1_labels": pd.read_csv(params.paths.predictions)["predicted"].tolist()}


@pytest.fixture(scope="module")
def server(registry):
    params, root, _ = registry
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "model", "--root", str(root), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n{(root / 'server.log').read_text()}")
        try:
            return call(f"{url}/health")[0] == 200
        except OSError:
            return False

    wait_until(up, 300, "the model server did not answer /health")
    yield url, root / "server.log"
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_the_server_follows_the_champion_without_failing_a_request(registry, server):
    from mlflow.tracking import MlflowClient

    params, _, versions = registry
    url, log = server
    name = params.mlflow.registered_model
    client = MlflowClient(use_store(params.paths))
    v2, broken = versions["always_business"], versions["broken"]
    texts = pd.read_parquet(params.paths.split_dir / "test.parquet")["text"].tolist()
    expected = {"1": versions["v1_labels"], v2: ["business"] * len(texts)}
    assert call(f"{url}/version")[2]["version"] == "1"

    answers, stop = [], threading.Event()

    def keep_asking():
        while not stop.is_set():
            status, headers, body = call(f"{url}/invocations", {"dataframe_records": [{"text": t} for t in texts]})
            answers.append((status, headers.get("X-Model-Version"), [p["label"] for p in body.get("predictions", [])]))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        wait_until(lambda: answers, 120, "no answer")
        client.set_registered_model_alias(name, CHAMPION, v2)  # what promote does when v2 passes the gate
        wait_until(lambda: any(v == v2 for _, v, _ in answers), 300, f"v{v2} did not answer after promotion")
        state = call(f"{url}/version")[2]
        assert state["version"] == v2 and state["failed"] == {}

        client.set_registered_model_alias(name, CHAMPION, broken)
        failed = wait_until(lambda: call(f"{url}/version")[2]["failed"], 300, f"v{broken} was not reported")
        assert list(failed) == [broken] and "SafetensorError" in failed[broken]
        asked = len(answers)
        wait_until(lambda: len(answers) >= asked + 2, 120, "no answers after the failed load")
    finally:
        stop.set()
        asker.join(timeout=180)
    assert {status for status, _, _ in answers} == {200}  # not one request failed during the swaps
    served = [version for _, version, _ in answers]
    assert served == sorted(served, key=lambda v: v != "1") and set(served) == {"1", v2}  # v1, then v2 only
    for _, version, labels in answers:
        assert labels == expected[version]
    assert call(f"{url}/version")[2]["version"] == v2
    assert f"v{broken} failed to load" in log.read_text() and f"v{v2} keeps serving" in log.read_text()


@pytest.mark.parametrize("body, message", [
    ({"dataframe_records": [{"txt": "Shares rose"}]}, "no `text` field: the records have `txt`"),
    ({"dataframe_records": [{"text": "Shares rose"}, {"text": 5}]},
     "1 of 2 rows cannot be answered (rows count from 0): row 1: `text` is 5 (a number), not a string"),
    ({"dataframe_records": [{"text": None}]}, "row 0: `text` is null or missing"),
    ({"dataframe_records": [{"text": "Shares rose"}, {}]}, "row 1: `text` is null or missing"),
    ({"dataframe_records": [{"text": ""}]}, "row 0: `text` is empty ('')"),
    ({"dataframe_records": [{"text": "<p>&nbsp;</p>"}]}, "row 0: `text` is empty after cleaning ('<p>&nbsp;</p>'"),
    ({"inputs": ["Shares rose", 5]}, "row 1: `text` is 5 (a number), not a string"),
    ({"inputs": [None]}, "row 0: `text` is null or missing"),
    ({"dataframe_split": {"columns": ["body"], "data": [["Shares rose"]]}}, "no `text` field: the records have `body`"),
    ({"inputs": {"body": ["Shares rose"]}}, "no `text` field: the input has `body`"),
])
def test_input_it_cannot_classify_gets_400_with_the_row_and_field(server, body, message):
    url, _ = server
    status, headers, answer = call(f"{url}/invocations", body)
    assert status == 400, answer
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and message in answer["message"]
    assert "Traceback" not in json.dumps(answer) and headers["X-Model-Version"]


def test_an_empty_list_gets_an_empty_answer_and_good_input_every_shape(server):
    url, _ = server
    for body in ({"inputs": []}, {"dataframe_records": []}, {"dataframe_split": {"columns": ["text"], "data": []}}):
        status, _, answer = call(f"{url}/invocations", body)
        assert (status, answer) == (200, {"predictions": []})
    texts = ["Shares rose after the bank reported profits", "The striker scored twice"]
    answers = [call(f"{url}/invocations", body)[2]["predictions"] for body in (
        {"inputs": texts}, {"dataframe_records": [{"id": i, "text": t} for i, t in enumerate(texts)]},
        {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}})]
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) == 2
    status, _, csv = call(f"{url}/invocations", b"text\n" + "\n".join(texts).encode(), "text/csv")
    assert status == 200 and csv["predictions"] == answers[0]
    assert call(f"{url}/invocations", {"rows": []})[0] == 400  # MLflow's own check of the request's shape
