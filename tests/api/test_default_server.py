"""`mixserve serve` with no arguments: SmolLM2-135M-Instruct plus the synthetic demo adapters."""

from __future__ import annotations

import openai
import pytest
from server_support import ServerProcess


@pytest.fixture(scope="module")
def server(smollm2_dir):  # the fixture converts the embedded model first
    proc = ServerProcess([], startup_timeout=300)
    yield proc
    assert proc.stop() == 0, proc.log()


def test_default_server_serves_smollm2_and_demo_adapters(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "SmolLM2-135M-Instruct"
    demos = [i for i in ids if i.startswith("demo-")]
    assert {
        "demo-mixlora",
        "demo-mixlora-dynamic",
        "demo-dynmole",
        "demo-loramoe",
        "demo-lora",
    } <= set(demos)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    base = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=question, max_tokens=24, temperature=0
    )
    assert "Paris" in base.choices[0].message.content
    replies = {
        name: client.chat.completions.create(
            model=name, messages=question, max_tokens=24, temperature=0
        )
        .choices[0]
        .message.content
        for name in demos
    }
    assert all(isinstance(r, str) for r in replies.values())
    assert len(set(replies.values()) | {base.choices[0].message.content}) > 1  # adapters matter
