"""``maskkv serve`` end to end on 127.0.0.1: the official ``openai`` client against a server the
test starts (answers equal ``maskkv.generate`` alone), OpenAI-style errors, disconnects freeing
the cache, overload, shutdown, and the command line. Traffic goes to the loopback address only;
every request loop is bounded in count and time."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import maskkv  # noqa: E402
from maskkv import methods  # noqa: E402
from maskkv.serving.cli import add_serve_parser, build_server  # noqa: E402

warnings.filterwarnings("ignore", category=methods.MissingProfileWarning)
ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-llada-kv"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


class _Server:
    """A server on 127.0.0.1 (port chosen by the OS) in a thread of this process."""

    def __init__(self, *argv: str) -> None:
        args = _args("--port", "0", "--threads", "1", "--log-level", "warning", *argv)
        self.server, self.engine = build_server(args)
        self.engine.start()
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, "the server did not start in 30 s"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def metric(self, name: str, labels: str = "") -> float:
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + labels + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_idle(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                not self.engine.engine.has_unfinished()
                and self.metric("maskkv_kv_bytes_in_use") == 0
            ):
                return
            time.sleep(0.05)
        raise AssertionError("requests still running / KV still in use")

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"
        self.engine.stop()
        assert not self.engine._thread.is_alive()


@pytest.fixture(scope="module")
def server():
    # DualCache and a 1 MiB KV pool (about 4000 rows of the tiny model): a handful of requests
    # run at once, a 256-token answer could never fit.
    s = _Server(
        "--method", "maskkv", "--budget", "16", "--cache", "dual", "--kv-budget", "1MiB",
        "--max-running", "8", "--max-waiting", "8", "--max-gen-length", "256",
    )  # fmt: skip
    yield s
    s.stop()


def _reference(engine, ids: list[int], max_tokens: int, block: int) -> str:
    """What ``maskkv.generate`` gives the prompt alone, as the server cuts it."""
    model, tok = engine.model, engine.tokenizer
    gen = -(-max_tokens // block) * block
    out = maskkv.generate(
        model, torch.tensor([ids]), method=engine.method, cache=engine.policy, gen_length=gen,
        block_length=block, steps=gen,
    ).responses[0].tolist()  # fmt: skip
    eos = model.config.eos_token_id
    out = out[: out.index(eos)] if eos in out else out
    return tok.decode(out[:max_tokens], skip_special_tokens=True)


PROMPTS = [
    "alpha fox K4$. cow B1&. owl Z9!.|fox?",
    "code Q7#. the rest is filler filler filler filler.",
    "cow B1&. fox K4$. hen M2%.|hen?",
    "a",
    "owl Z9!. " * 12 + "|owl?",
    "pig T3^. bee R5*.|bee,pig?",
]


def test_openai_client_matches_generate(server):
    """Concurrent completions, chat (the checkpoint's template) and streams through the
    official client give ``maskkv.generate``'s answer to each prompt alone."""
    engine = server.engine.engine
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert server.http.get("/health").json() == {"status": "ok"}

    def complete(i):
        max_tokens = [8, 16, 24][i % 3]
        r = client.completions.create(
            model=MODEL, prompt=PROMPTS[i], max_tokens=max_tokens, extra_body={"block_length": 8}
        )
        return r, max_tokens

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(complete, range(len(PROMPTS))))
    for prompt, (r, max_tokens) in zip(PROMPTS, results):
        ids = engine.tokenizer(prompt)["input_ids"]
        assert r.choices[0].text == _reference(engine, ids, max_tokens, 8)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(ids)

    messages = [{"role": "user", "content": PROMPTS[0]}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else list(ids["input_ids"])
    assert chat.choices[0].message.content == _reference(engine, ids, 16, 16)
    assert chat.choices[0].message.role == "assistant"

    # Streams: one chunk per committed block (blocks of 4), joined = the whole answer.
    stream = client.completions.create(
        model=MODEL, prompt=PROMPTS[4], max_tokens=24, stream=True, extra_body={"block_length": 4}
    )
    chunks = [c.choices[0] for c in stream]
    texts = [c.text for c in chunks if c.text]
    assert chunks[-1].finish_reason in ("stop", "length")
    whole = _reference(engine, engine.tokenizer(PROMPTS[4])["input_ids"], 24, 4)
    assert "".join(texts) == whole and 1 <= len(texts) <= 24 // 4
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == (
        chat.choices[0].message.content
    )
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens
    server.wait_idle()


def test_llada2_server_matches_generate():
    """The block-causal tiny-llada2-kv served (its default DualCache): completions and a stream
    give ``maskkv.generate``'s answer alone, LLaDA2's sampler with its default steps per block,
    the generation length ``max_tokens``; one stream chunk per committed block."""
    s = _Server("--model", "tiny-llada2-kv", "--method", "maskkv", "--budget", "16",
                "--kv-budget", "4MiB")  # fmt: skip
    try:
        engine = s.engine.engine
        assert engine.policy.name == "dual"
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)  # fmt: skip
        eos = engine.model.config.eos_token_id

        def reference(prompt: str, max_tokens: int, block: int) -> str:
            ids = engine.tokenizer(prompt)["input_ids"]
            out = maskkv.generate(
                engine.model, torch.tensor([ids]), method=engine.method, cache=engine.policy,
                gen_length=max_tokens, block_length=block,
            ).responses[0].tolist()  # fmt: skip
            out = out[: out.index(eos)] if eos in out else out
            return engine.tokenizer.decode(out, skip_special_tokens=True)

        for i, prompt in enumerate(PROMPTS[:4]):
            r = client.completions.create(
                model="tiny-llada2-kv", prompt=prompt, max_tokens=[6, 13][i % 2],
                extra_body={"block_length": [32, 8][i % 2]},
            )  # fmt: skip
            assert r.choices[0].text == reference(prompt, [6, 13][i % 2], [32, 8][i % 2])
        stream = client.completions.create(
            model="tiny-llada2-kv", prompt=PROMPTS[4], max_tokens=12, stream=True,
            extra_body={"block_length": 4},
        )  # fmt: skip
        texts = [c.choices[0].text for c in stream if c.choices[0].text]
        assert "".join(texts) == reference(PROMPTS[4], 12, 4)
        s.wait_idle()
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ("{not json", "body", 400),
        ({"model": "gpt-4", "prompt": "x"}, "model", 400),
        ({"model": MODEL, "prompt": "x", "max_tokens": 512}, "max_tokens", 400),
        ({"model": MODEL, "prompt": "x" * 1100, "max_tokens": 8}, "prompt", 400),
        ({"model": MODEL, "prompt": "x", "max_tokens": 256}, "prompt", 400),  # KV never fits
        ({"model": MODEL, "prompt": "x", "max_tokens": "8"}, "max_tokens", 400),
        ({"model": MODEL, "prompt": 5}, "prompt", 400),
        ({"model": MODEL, "prompt": [1, -2]}, "prompt", 400),
        ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature", 400),
        ({"model": MODEL, "prompt": "x", "stream": "yes"}, "stream", 400),
        ({"model": MODEL, "prompt": "x", "n": 2}, "n", 400),
        (
            {"model": MODEL, "prompt": "x", "max_tokens": 8, "block_length": 4, "steps": 3},
            "steps",
            400,
        ),
        ({"model": MODEL}, "prompt", 400),
        ({"prompt": "x"}, "model", 400),
    ],
)
def test_bad_requests_name_the_field(server, body, param, status):
    if isinstance(body, str):
        r = server.http.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
    else:
        r = server.http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"].startswith(param), err["message"]


def test_chat_bad_messages(server):
    r = server.http.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    bad_role = {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}
    r = server.http.post("/v1/chat/completions", json=bad_role)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def test_disconnects_cancel_and_free_the_cache(server):
    """A streaming client that goes away after the first block, and a waiting client that times
    out, both cancel their requests: the KV bytes in use return to zero."""
    aborted = server.metric("maskkv_requests_finished_total", '{reason="abort"}')
    # "x" makes the tiny model write on without EOS: the requests would run 128 steps
    body = {"model": MODEL, "prompt": "x", "max_tokens": 128, "block_length": 4, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert '"text_completion"' in first
        assert server.metric("maskkv_kv_bytes_in_use") > 0
    with pytest.raises(httpx.ReadTimeout):
        server.http.post(
            "/v1/completions", json={**body, "stream": False, "steps": 128}, timeout=0.5
        )
    server.wait_idle()
    assert server.metric("maskkv_requests_finished_total", '{reason="abort"}') >= aborted + 2


def test_overload_answers_429_with_retry_after(server, monkeypatch):
    """More requests than the waiting queue holds (the engine held still meanwhile): the extra
    ones get 429 and a Retry-After; the accepted ones are served; the server ends idle."""
    engine = server.engine.engine
    release = threading.Event()
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (release.wait(30), step())[1])
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 8}

    def post(_):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post("/v1/completions", json=body)

    with ThreadPoolExecutor(12) as pool:
        pending = [pool.submit(post, i) for i in range(12)]
        deadline = time.monotonic() + 30
        while sum(f.done() for f in pending) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)  # the 4 beyond the queue's 8 are answered at once
        release.set()
        replies = [f.result() for f in pending]
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] * 8 + [429] * 4, codes
    busy = next(r for r in replies if r.status_code == 429)
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["type"] == "rate_limit_error"
    server.wait_idle()
    assert server.http.get("/health").status_code == 200


def test_shutdown_refuses_new_work_and_stops_cleanly():
    """Once shutdown starts: 503 with Retry-After for new requests, the request in flight is
    finished by the engine (cancelled), both threads end."""
    s = _Server("--kv-budget", "4MiB")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 128, "block_length": 4}
    with s.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        s.engine.accepting = False
        refused = s.http.post("/v1/completions", json=body)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert s.http.get("/health").status_code == 503
        s.engine.stop()  # cancels the stream's request; its client gets an error event
        rest = "".join(lines)
    assert '"abort"' in rest and rest.endswith("data: [DONE]")
    assert s.engine.engine.kv_bytes_in_use == 0
    s.server.should_exit = True
    s.thread.join(timeout=30)
    assert not s.thread.is_alive()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serves_the_shipped_model_and_exits_on_sigint():
    """``maskkv serve`` with only a port: tiny-llada-kv on the CPU; one completion; SIGINT ends it
    with exit status 0. Bad arguments end in one line and exit status 2."""
    defaults = _args()
    assert Path(defaults.model).name == MODEL and defaults.host == "127.0.0.1"
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'python'}",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "maskkv", "serve", "--port", str(port), "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            while time.monotonic() < deadline:
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": "fox?", "max_tokens": 8})
            assert r.status_code == 200 and r.json()["model"] == MODEL
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert f"maskkv serve: {MODEL}" in err
    finally:
        if proc.poll() is None:
            proc.kill()
    bad = subprocess.run(
        [sys.executable, "-m", "maskkv", "serve", "--kv-budget", "lots"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "maskkv serve: --kv-budget: expected bytes such as 2GiB, 512MB or 1000000, got 'lots'"
    ]
