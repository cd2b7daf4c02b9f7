"""The test support itself, against real processes: a llama.cpp server (xllamacpp, random tiny GGUF) and the sim."""

from __future__ import annotations

import httpx
import pytest

from tests.support.llamacpp import SIZES, ensure_model, llamacpp_server, sim_server


def metric(text: str, name: str) -> float:
    values = [line.split(" ")[1] for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} missing from /metrics"
    return float(values[0])


def test_the_random_gguf_is_a_llama_model_written_once() -> None:
    gguf = pytest.importorskip("gguf")
    path = ensure_model("tiny")
    written = path.stat().st_mtime_ns
    assert ensure_model("tiny") == path and path.stat().st_mtime_ns == written  # cached
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= names
    assert "tokenizer.chat_template" in reader.fields
    with pytest.raises(ValueError, match="huge"):
        ensure_model("huge")
    assert set(SIZES) >= {"tiny", "med"}


@pytest.mark.llamacpp
def test_a_real_llamacpp_server_answers_chat_and_exposes_its_metrics() -> None:
    pytest.importorskip("xllamacpp")
    with llamacpp_server("tiny", slots=2) as url, httpx.Client(base_url=url, timeout=30) as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "ignore_eos": True},
        )
        assert answer.status_code == 200
        assert answer.json()["usage"]["completion_tokens"] == 5
        assert client.get("/props").json()["total_slots"] == 2
        slots = client.get("/slots").json()
        assert len(slots) == 2 and not any(s["is_processing"] for s in slots)
        text = client.get("/metrics").text
        assert metric(text, "llamacpp:requests_processing") == 0
        assert metric(text, "llamacpp:tokens_predicted_total") == 5
    with pytest.raises(httpx.TransportError), httpx.Client() as client:
        client.get(f"{url}/health")  # the process is gone


def test_the_sim_runs_as_its_own_process() -> None:
    with (
        sim_server(mode="zero", slots=3, model_id="simx", max_output_tokens=4) as url,
        httpx.Client(base_url=url) as client,
    ):
        assert client.get("/v1/models").json()["data"][0]["id"] == "simx"
        answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert answer.json()["usage"]["completion_tokens"] == 4
        text = client.get("/metrics").text
        assert metric(text, "llamacpp:tokens_predicted_total") == 4
        assert metric(text, "sim:slots") == 3 and metric(text, "llamacpp:requests_deferred") == 0
    with pytest.raises(httpx.TransportError), httpx.Client() as client:
        client.get(f"{url}/health")
