"""The WebSocket API of `easllm serve` (bundled gemma3-270m on llama.cpp), driven by websocket-client.

The three scenarios are the source document's sample client ("WebSocketの使用"), kept as written
but for host, authorization and recording what arrives: the runs here are judged on the record.
Answers are capped at a few tokens (`--max-new-tokens`), so a shared 2-core machine stays quick.
"""

import json
import multiprocessing
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import pytest
import requests
import websocket

from tests.servers import Server, running_server

pytestmark = pytest.mark.integration

EOS = "<EOS>"
MNN_DOC = (
    "# MNN\n\nMNN is a lightweight deep learning inference engine developed by Alibaba. "
    "It runs neural networks on phones, embedded devices and servers, and supports TensorFlow, "
    "Caffe and ONNX models.\n"
)
SAMPLE_PROMPTS = [
    "Pythonでソートアルゴリズムを記述してください。",
    "プログラミング言語をJavaに変換してください。",
    "ご紹介ください。",
    "上記のダイアログを要約してください。",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("websocket")
    args = ["--model-path", "gemma3-270m", "--max-new-tokens", "4", "--threads", "2"]
    with running_server([*args, "--data-dir", str(tmp / "data")], tmp) as server:
        r = requests.post(
            f"{server.url}/v1/knowledge/files",
            files={"files": ("mnn.md", MNN_DOC.encode())},
            headers=server.headers(),
            timeout=120,
        )
        assert r.status_code == 200, r.text
        yield server


def ws_url(server: Server, query: str = "") -> str:
    return "ws" + server.url.removeprefix("http") + "/" + query


def connect(server: Server) -> websocket.WebSocket:
    return websocket.create_connection(ws_url(server), header=[f"Authorization: {server.token}"], timeout=120)


def read_answer(ws: websocket.WebSocket) -> list[dict]:
    messages = []
    while (message := ws.recv()) != EOS:
        messages.append(json.loads(message))
    return messages


def read_answer_after(ws: websocket.WebSocket, message: dict | str) -> list[dict]:
    ws.send(message if isinstance(message, str) else json.dumps(message))
    return read_answer(ws)


def answers_of(messages: list[str]) -> list[list[dict]]:
    """The messages of a connection split at each <EOS>; a trailing unfinished answer is dropped."""
    answers, current = [], []
    for message in messages:
        if message == EOS:
            answers.append(current)
            current = []
        else:
            current.append(json.loads(message))
    return answers


def normal_closure(error: Exception) -> bool:
    """websocket-client reports every close frame through on_error, a normal (1000) one too."""
    return getattr(error, "status_code", None) == 1000


# -- the source document's sample client --


def on_open_1(ws: websocket.WebSocketApp) -> None:
    params_dict = {}
    params_dict["prompt"] = """Show me a golang code example:"""
    params_dict["temperature"] = 0.9
    params_dict["top_p"] = 0.1
    params_dict["top_k"] = 30
    params_dict["max_new_tokens "] = 2048
    params_dict["do_sample"] = True
    raw_req = json.dumps(params_dict, ensure_ascii=False).encode("utf8")
    ws.send(raw_req)


def on_open_2(ws: websocket.WebSocketApp) -> None:
    params_dict: dict = {"max_new_tokens": 6144}
    params_dict["temperature"] = 0.9
    params_dict["top_p"] = 0.1
    params_dict["top_k"] = 30
    params_dict["use_stream_chat "] = True
    params_dict["prompt"] = "こんにちは! "
    params_dict = {"system_prompt": "あなたが5年以上の経験を持つプログラマーのように行動してください。"}
    raw_req = json.dumps(params_dict, ensure_ascii=False).encode("utf8")
    ws.send(raw_req)  # the sample's quirk: this first message has no prompt
    for prompt in SAMPLE_PROMPTS:
        params_dict["prompt"] = prompt
        raw_req = json.dumps(params_dict, ensure_ascii=False).encode("utf8")
        ws.send(raw_req)


def on_open_3(ws: websocket.WebSocketApp) -> None:
    params_dict = {}
    params_dict["prompt"] = """MNNは何ですか?"""
    params_dict["temperature"] = 0.9
    params_dict["top_p"] = 0.1
    params_dict["top_k"] = 30
    params_dict["max_new_tokens "] = 2048
    params_dict["use_stream_chat "] = False
    params_dict["langchain"] = True
    raw_req = json.dumps(params_dict, ensure_ascii=False).encode("utf8")
    ws.send(raw_req)


OPENERS = {1: on_open_1, 2: on_open_2, 3: on_open_3}


def single_call(host: str, authorization: str, scenario: int, record_path: str) -> None:
    """The sample's `single_call` with its `on_message_<scenario>`; writes what it saw as JSON."""
    record: dict = {"messages": [], "close": None, "errors": [], "pongs": 0}
    questions = 0

    def on_message(ws: websocket.WebSocketApp, message: str) -> None:
        nonlocal questions
        record["messages"].append(message)
        if scenario == 1 and message == EOS:
            ws.send(struct.pack("!H", 1000), websocket.ABNF.OPCODE_CLOSE)
        elif scenario == 2 and message == EOS:
            questions = questions + 1
            if questions == 5:
                ws.send(struct.pack("!H", 1000), websocket.ABNF.OPCODE_CLOSE)
        elif scenario == 3:
            ws.send(struct.pack("!H", 1000), websocket.ABNF.OPCODE_CLOSE)

    def on_error(ws: websocket.WebSocketApp, error: Exception) -> None:
        if not normal_closure(error):
            record["errors"].append(repr(error))

    def on_close(ws: websocket.WebSocketApp, code: int | None, reason: str | None) -> None:
        record["close"] = code

    def on_pong(ws: websocket.WebSocketApp, pong: bytes) -> None:
        record["pongs"] += 1

    ws = websocket.WebSocketApp(
        host,
        on_open=OPENERS[scenario],
        on_message=on_message,
        on_error=on_error,
        on_pong=on_pong,
        on_close=on_close,
        header=["Authorization: " + authorization],
    )
    ws.run_forever(ping_interval=2)
    Path(record_path).write_text(json.dumps(record, ensure_ascii=False))


def run_sample(server: Server, tmp: Path, scenarios: list[int], rounds: int = 1) -> list[dict]:
    """As the sample's __main__: per round one process per scenario, started together, joined."""
    spawn = multiprocessing.get_context("fork")
    records = []
    for i in range(rounds):
        processes = []
        for scenario in scenarios:
            path = tmp / f"round{i}-scenario{scenario}.json"
            p = spawn.Process(target=single_call, args=(ws_url(server), server.token, scenario, str(path)))
            p.start()
            processes.append((p, path, scenario))
        for p, path, scenario in processes:
            p.join(timeout=300)
            if p.is_alive():
                p.kill()
                pytest.fail(f"scenario {scenario} of round {i} did not finish:\n{server.log()[-3000:]}")
            assert p.exitcode == 0, f"scenario {scenario} exited with {p.exitcode}"
            records.append({"scenario": scenario, **json.loads(path.read_text())})
    return records


def check_stream_chat(record: dict) -> None:
    assert record["errors"] == [] and record["close"] == 1000
    assert record["messages"][-1] == EOS and record["messages"].count(EOS) == 1
    (chunks,) = answers_of(record["messages"])
    responses = [c["response"] for c in chunks]
    assert all(later.startswith(earlier) for earlier, later in pairwise(responses))
    assert chunks[-1]["history"] == [["Show me a golang code example:", responses[-1]]]
    assert chunks[-1]["usage"]["completion_tokens"] <= 4 and chunks[-1]["finish_reason"] in ("stop", "length")


def check_multi_round(record: dict) -> None:
    assert record["errors"] == [] and record["close"] == 1000
    answers = answers_of(record["messages"])
    assert len(answers) == 5 and record["messages"][-1] == EOS
    (error,) = answers[0]
    assert error["error"]["param"] == "prompt"
    finals = [a[-1] for a in answers[1:]]
    for k, done in enumerate(finals):
        assert [q for q, _ in done["history"]] == SAMPLE_PROMPTS[: k + 1], "answered in order"
        assert done["history"][:k] == [f["history"][-1] for f in finals[:k]], "earlier rounds kept"
        assert done["history"][-1][1] == done["response"] and "usage" in done


def check_langchain(record: dict) -> None:
    # on_message_3 closes on every message: when <EOS> arrives it sends a second close frame into
    # a connection the server has already closed; the sample prints that error, and so may we.
    assert all(e.startswith(SECOND_CLOSE_ERRORS) for e in record["errors"]), record["errors"]
    assert record["messages"][1:] in ([], [EOS])
    answer = json.loads(record["messages"][0])
    assert answer["finish_reason"] in ("stop", "length") and answer["history"][-1][0] == "MNNは何ですか?"
    assert answer["sources"] and answer["sources"][0]["source"] == "mnn.md"
    assert "MNN" in answer["sources"][0]["content"]


SECOND_CLOSE_ERRORS = ("BrokenPipeError", "ConnectionResetError", "WebSocketConnectionClosedException")
CHECKS = {1: check_stream_chat, 2: check_multi_round, 3: check_langchain}


@pytest.mark.parametrize("scenario", [1, 2, 3])
def test_sample_scenario(server: Server, tmp_path: Path, scenario: int) -> None:
    (record,) = run_sample(server, tmp_path, [scenario])
    CHECKS[scenario](record)


def test_sample_main_five_rounds_of_three_parallel_processes(server: Server, tmp_path: Path) -> None:
    records = run_sample(server, tmp_path, [1, 2, 3], rounds=5)
    assert len(records) == 15
    for record in records:
        CHECKS[record["scenario"]](record)
    health = server.health()["engine"]
    assert health["running"] == 0 and health["waiting"] == 0


# -- beyond the sample --


def test_wrong_token_refuses_the_handshake_with_401(server: Server) -> None:
    attempts = [
        (ws_url(server), []),
        (ws_url(server), ["Authorization: wrong"]),
        (ws_url(server, "?token=wrong"), []),
    ]
    for url, header in attempts:
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(url, header=header, timeout=30)
        assert refused.value.status_code == 401
        assert json.loads(refused.value.resp_body)["error"]["type"] == "authentication_error"
    ws = websocket.create_connection(ws_url(server, f"?token={server.token}"), timeout=120)
    try:
        assert read_answer_after(ws, {"prompt": "Hello"})[-1]["history"][0][0] == "Hello"
    finally:
        ws.close()


def test_bad_json_is_an_error_and_the_connection_stays_open(server: Server) -> None:
    ws = connect(server)
    try:
        (error,) = read_answer_after(ws, '{"prompt": "The capital of France is"')
        assert error["error"]["param"] == "body" and error["error"]["code"] == 400
        (error,) = read_answer_after(ws, {"prompt": "x", "temperature": "hot"})
        assert error["error"]["param"] == "temperature"
        chunks = read_answer_after(ws, "The capital of France is")  # plain text is a prompt
        assert chunks[-1]["history"] == [["The capital of France is", chunks[-1]["response"]]]
        ws.send_close(websocket.STATUS_NORMAL)
        opcode, frame = ws.recv_data_frame(True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and struct.unpack("!H", frame.data[:2])[0] == 1000
    finally:
        ws.shutdown()


def test_ping_every_2_seconds_for_10_seconds(server: Server) -> None:
    record: dict = {"pongs": 0, "messages": [], "close": None, "errors": []}

    def on_open(ws: websocket.WebSocketApp) -> None:
        threading.Timer(10, lambda: ws.send(json.dumps({"prompt": "After ten seconds"}))).start()

    def on_message(ws: websocket.WebSocketApp, message: str) -> None:
        record["messages"].append(message)
        if message == EOS:
            ws.send(struct.pack("!H", 1000), websocket.ABNF.OPCODE_CLOSE)

    app = websocket.WebSocketApp(
        ws_url(server),
        header=[f"Authorization: {server.token}"],
        on_open=on_open,
        on_message=on_message,
        on_pong=lambda ws, data: record.__setitem__("pongs", record["pongs"] + 1),
        on_close=lambda ws, code, reason: record.__setitem__("close", code),
        on_error=lambda ws, error: normal_closure(error) or record["errors"].append(repr(error)),
    )
    runner = threading.Thread(target=app.run_forever, kwargs={"ping_interval": 2, "ping_timeout": 1})
    started = time.monotonic()
    runner.start()
    runner.join(timeout=120)
    if runner.is_alive():
        app.close()
        pytest.fail("the connection did not end after its answer")
    assert time.monotonic() - started >= 10
    assert record["errors"] == [] and record["close"] == 1000
    assert record["pongs"] >= 4, "every ping of the 10 idle seconds is answered"
    (chunks,) = answers_of(record["messages"])
    assert chunks[-1]["history"][0][0] == "After ten seconds"


def test_eight_concurrent_connections_share_the_engine(server: Server) -> None:
    def converse(i: int) -> list[list[str]]:
        ws = connect(server)
        try:
            ws.send(json.dumps({"prompt": f"User {i} says hello", "system_prompt": f"user {i}"}))
            ws.send(json.dumps({"prompt": f"User {i} asks again"}))
            read_answer(ws)
            return read_answer(ws)[-1]["history"]
        finally:
            ws.close()

    peak = {"running": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak["running"] = max(peak["running"], server.health()["engine"]["running"])
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:
            histories = list(pool.map(converse, range(8)))
    finally:
        done.set()
        watcher.join()
    for i, history in enumerate(histories):
        assert [q for q, _ in history] == [f"User {i} says hello", f"User {i} asks again"]
    print(f"8 connections, 16 answers in {time.monotonic() - started:.1f}s; peak running {peak['running']}")
    health = server.health()["engine"]
    assert health["running"] == 0 and health["waiting"] == 0


@pytest.mark.parametrize("how", ["close frame", "dropped socket"])
def test_disconnect_mid_answer_aborts_the_generation(gemma: Server, how: str) -> None:
    before = gemma.health()["engine"]
    ws = websocket.create_connection(ws_url(gemma), header=[f"Authorization: {gemma.token}"], timeout=120)
    ws.send(json.dumps({"prompt": "Once upon a time", "max_new_tokens": 250}))
    json.loads(ws.recv())
    if how == "close frame":
        ws.close(websocket.STATUS_NORMAL, timeout=5)
    else:
        ws.shutdown()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        engine = gemma.health()["engine"]
        if engine["aborted_total"] > before["aborted_total"] and engine["running"] == 0:
            break
        time.sleep(0.1)
    assert engine["aborted_total"] == before["aborted_total"] + 1 and engine["running"] == 0
    assert engine["finished_total"] == before["finished_total"]
