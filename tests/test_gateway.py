"""`oel gateway` end to end: the real `openai` client, the gateway in front of the real vLLM CPU server,
the episode on the real broker, assembled by the real processor into the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from test_processor import Env, free_port, wait_for
from test_vllm_backend import _url as vllm_url

pytestmark = [pytest.mark.stack, pytest.mark.model, pytest.mark.tools]

TOOL_CALL = {"id": "call-1", "type": "function", "function": {"name": "order_status", "arguments": '{"order": "4411"}'}}


@contextmanager
def running_gateway(env: Env, log: Path, upstream: str, **settings: str) -> Iterator[str]:
    port = free_port()
    variables = {
        **os.environ,
        **env.vars,
        "OEL_GATEWAY__PORT": str(port),
        "OEL_GATEWAY__UPSTREAM_URL": upstream,
        **{f"OEL_GATEWAY__{k.upper()}": v for k, v in settings.items()},
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "oel.cli", "gateway"], env=variables, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the gateway exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "the gateway to answer /healthz")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"the gateway did not stop on SIGTERM:\n{log.read_text()[-3000:]}") from None


def test_an_openai_client_is_recorded_step_for_step_through_the_processor(kafka, s3_store, unique, tmp_path):
    from openai import OpenAI

    env = Env(unique, BATCH_SIZE="1", EXTRACTION_VARIANT="grounded", TRUSTED_FEEDBACK="")
    ns, eid = "gateway-shop", f"gw-{unique}"
    with running_gateway(env, tmp_path / "gateway.log", vllm_url(env.settings)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        head = {"X-OEL-Episode-Id": eid, "X-OEL-Agent-Id": "support-7"}
        first = [{"role": "user", "content": "Say hello to the customer."}]
        raw = client.chat.completions.with_raw_response.create(
            model=f"oel/{ns}", messages=first, max_tokens=8, temperature=0, extra_headers=head
        )
        answer1 = raw.parse().choices[0].message.content
        assert raw.headers["X-OEL-Episode-Id"] == eid and raw.headers["X-OEL-Model-Version"] == "base"
        feedback = httpx.post(f"{url}/v1/oel/episodes/{eid}/feedback", json={"feedback": "Rejected: greet with 'Hello from Acme'."})
        assert feedback.status_code == 200, feedback.text

        second = [*first, {"role": "assistant", "content": answer1}, {"role": "user", "content": "Try again."}]
        stream = client.chat.completions.create(
            model=f"oel/{ns}", messages=second, max_tokens=8, temperature=0, stream=True, extra_headers=head
        )
        answer2 = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

        third = [
            *second,
            {"role": "assistant", "content": answer2},
            {"role": "user", "content": "Where is order 4411?"},
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            {"role": "tool", "content": "shipped yesterday", "tool_call_id": "call-1"},
        ]
        answer3 = (
            client.chat.completions.create(model=f"oel/{ns}", messages=third, max_tokens=8, temperature=0, extra_headers=head)
            .choices[0]
            .message.content
        )
        end = httpx.post(f"{url}/v1/oel/episodes/{eid}/end", json={"outcome": "accepted on turn 3", "success": True})
        assert end.status_code == 200, end.text

        bad = httpx.post(f"{url}/v1/chat/completions", json={"model": "any", "messages": first})
        assert bad.status_code == 400 and "no namespace" in bad.json()["error"]["message"]
        gone = httpx.post(f"{url}/v1/oel/episodes/{eid}/feedback", json={"feedback": "late"})
        assert gone.status_code == 404
        metrics = httpx.get(url + "/metrics").text
        assert f'oel_gateway_steps_recorded_total{{namespace="{ns}"}} 3.0' in metrics

    key = f"trajectories/{ns}/{eid}.json"
    with env.worker(tmp_path / "worker.log"):
        wait_for(lambda: env.store.exists(key), 240, "the gateway's episode stored by the processor")
    stored = env.store.get_json(key)
    assert stored["status"] == "completed" and stored["agent_id"] == "support-7" and stored["model_version"] == "base"
    steps = stored["steps"]
    assert [s["response"] for s in steps] == [answer1, answer2, answer3]
    assert [s["prompt"] for s in steps] == [first, second, [m if m["content"] is not None else {**m, "content": ""} for m in third]]
    assert [s["feedback"] for s in steps] == ["Rejected: greet with 'Hello from Acme'.", None, None]
    assert stored["end"] == {"outcome": "accepted on turn 3", "success": True}


def test_an_unreachable_upstream_and_bad_requests_are_clear_errors_and_record_nothing(kafka, s3_store, unique, tmp_path):
    env = Env(unique)
    closed = f"http://127.0.0.1:{free_port()}"
    with running_gateway(env, tmp_path / "gateway.log", closed, max_request_bytes="2048") as url:
        head = {"X-OEL-Namespace": "gateway-shop"}
        malformed = httpx.post(f"{url}/v1/chat/completions", headers=head, content=b"{not json")
        assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
        big = httpx.post(
            f"{url}/v1/chat/completions", headers=head, json={"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
        )
        assert big.status_code == 413 and "2048" in big.text
        no_messages = httpx.post(f"{url}/v1/chat/completions", headers=head, json={"model": "m"})
        assert no_messages.status_code == 400 and "messages" in no_messages.json()["error"]["message"]
        r = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"X-OEL-Namespace": "gateway-shop"},
            json={"model": "some-model", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 502 and closed in r.json()["error"]["message"]
        assert 'oel_gateway_requests_total{outcome="upstream_unreachable",route="chat"} 1.0' in httpx.get(url + "/metrics").text
    assert env.read(env.settings.topics.trajectories, 1, timeout=3) == []


def test_oel_namespace_as_the_model_is_answered_by_the_current_version(kafka, s3_store, unique, tmp_path):
    """Version following without agent code: a version published on the topic is loaded into the upstream
    and answers `oel/<namespace>`; the response header and the recorded events name it."""
    from openai import OpenAI
    from support.adapters import fresh_adapter

    from oel.model.prepare import model_hash
    from oel.model.vllm_backend import VLLMBackend
    from oel.ops.versions import publish_version
    from oel.schemas import ModelVersion, VersionStatus

    env = Env(unique)
    ns, version = "gateway-follow", f"g0001-{unique}"
    upstream = VLLMBackend(vllm_url(env.settings))
    base = Path(upstream.base_model)
    adapter = fresh_adapter(base, tmp_path / "adapter")
    prefix = f"adapters/{ns}/{version}"
    for f in adapter.iterdir():
        env.store.put_bytes(f"{prefix}/{f.name}", f.read_bytes())
    publish_version(
        ModelVersion(
            namespace=ns,
            version=version,
            adapter_uri=prefix,
            base_model=base.name,
            base_model_hash=model_hash(base),
            status=VersionStatus.promoted,
        ),
        env.settings,
    )
    try:
        with running_gateway(env, tmp_path / "gateway.log", upstream.url) as url:
            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model=f"oel/{ns}",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                extra_headers={"X-OEL-Episode-Id": f"f-{unique}"},
            )
            assert raw.headers["X-OEL-Model-Version"] == version and raw.parse().choices[0].message.content is not None
            assert version in upstream.list_adapters()
        events = [json.loads(m.value()) for m in env.read(env.settings.topics.trajectories, 3, timeout=10)]
        assert [e["kind"] for e in events] == ["start", "step", "end"]  # the episode ended when the gateway stopped
        assert {e["model_version"] for e in events} == {version}
    finally:
        if version in upstream.list_adapters():
            upstream.unload_adapter(version)
        upstream.close()
