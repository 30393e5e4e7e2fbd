"""EngineClient: the loop on its own thread, async streams, abort, errors, death, drain."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from engine_support import engine, make_adapters, make_model

from mixserve.engine import EngineClient, EngineDeadError, EngineShuttingDownError
from mixserve.types import FinishReason, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("client"))
    return make_model(root), make_adapters(root, 4)


async def _collect(stream):
    tokens, reasons = {}, {}
    async for delta in stream:
        tokens.setdefault(delta.index, []).extend(delta.token_ids)
        if delta.finished:
            reasons[delta.index] = delta.finish_reason
    return tokens, reasons


def test_concurrent_streams_match_the_offline_engine(setup):
    model_dir, adapters = setup
    prompts = [([3, 4, 5], "ad0"), ([6, 7], None), ([8, 9, 10, 11], "ad1"), ([12], "ad2")]
    reference = {}
    offline = engine(model_dir, adapters).core
    for i, (prompt, adapter) in enumerate(prompts):
        offline.add_request(f"r{i}", prompt, GREEDY, adapter)
    while offline.has_work:
        for d in offline.step():
            reference.setdefault(d.request_id, []).extend(d.token_ids)

    async def main():
        client = EngineClient(engine(model_dir, adapters).core).start()
        try:
            streams = [
                await client.add_request(f"r{i}", p, GREEDY, a) for i, (p, a) in enumerate(prompts)
            ]
            results = await asyncio.gather(*(_collect(s) for s in streams))
        finally:
            client.shutdown()
        return results

    for i, (tokens, reasons) in enumerate(asyncio.run(main())):
        assert tokens[0] == reference[f"r{i}"]
        assert reasons[0] is FinishReason.LENGTH


def test_abort_and_early_exit_free_everything(setup):
    model_dir, adapters = setup
    core = engine(model_dir, adapters).core
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        client = EngineClient(core).start()
        try:
            stream = await client.add_request("a", [1, 2, 3], long, "ad0")
            first = await stream.__anext__()
            assert first.token_ids
            client.abort("a")
            rest = [d async for d in stream]
            assert rest[-1].finish_reason is FinishReason.ABORT
            # A consumer that stops iterating early aborts its request when the stream closes.
            other = await client.add_request("b", [4, 5], long, "ad1")
            async with contextlib.aclosing(other) as s:
                async for _ in s:
                    break
            for _ in range(200):
                if client.num_open_requests == 0 and not core.has_work:
                    break
                await asyncio.sleep(0.01)
        finally:
            client.shutdown()

    asyncio.run(main())
    assert not core.has_work
    assert core.scheduler.blocks.num_free_blocks == core.scheduler.blocks.num_blocks
    assert core.pager.in_flight("ad0") == core.pager.in_flight("ad1") == 0


def test_errors_inside_a_step_reach_the_requests(setup, monkeypatch):
    model_dir, adapters = setup
    core = engine(model_dir, adapters).core
    original = core.runner.execute
    calls = {"n": 0}

    def flaky(plan, slots, between_layers=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return original(plan, slots, between_layers)

    monkeypatch.setattr(core.runner, "execute", flaky)

    async def main():
        client = EngineClient(core).start()
        try:
            stream = await client.add_request("x", [1, 2], GREEDY, None)
            _, reasons = await _collect(stream)
            assert reasons[0] is FinishReason.ERROR
            after = await client.add_request("y", [1, 2], GREEDY, None)
            _, reasons = await _collect(after)
            assert reasons[0] is FinishReason.LENGTH  # the engine carries on
            assert client.healthy
        finally:
            client.shutdown()

    asyncio.run(main())


def test_a_dead_loop_fails_open_streams_and_reports_unhealthy(setup, monkeypatch):
    model_dir, adapters = setup
    core = engine(model_dir, adapters).core

    def die():
        raise SystemError("engine thread crashed")

    async def main():
        client = EngineClient(core).start()
        stream = await client.add_request("x", [1, 2], GREEDY, None)
        monkeypatch.setattr(core, "step", die)
        with pytest.raises(EngineDeadError, match="crashed"):
            await _collect(stream)
        for _ in range(100):
            if not client.healthy:
                break
            await asyncio.sleep(0.01)
        assert not client.healthy
        with pytest.raises(EngineDeadError):
            await client.add_request("y", [1], GREEDY, None)

    asyncio.run(main())


def test_validation_errors_and_drain(setup):
    model_dir, adapters = setup
    core = engine(model_dir, adapters).core

    async def main():
        client = EngineClient(core).start()
        with pytest.raises(ValueError, match="empty"):
            await client.add_request("x", [], GREEDY, None)
        stream = await client.add_request("y", [1, 2, 3], GREEDY, "ad0")
        loop = asyncio.get_running_loop()
        drained = loop.run_in_executor(None, lambda: client.shutdown(drain=True, timeout=30))
        tokens, reasons = await _collect(stream)  # the running request still finishes
        assert reasons[0] is FinishReason.LENGTH and len(tokens[0]) == 6
        assert await drained
        with pytest.raises((EngineShuttingDownError, EngineDeadError)):
            await client.add_request("z", [1], GREEDY, None)

    asyncio.run(main())


def test_the_engine_thread_keeps_its_creators_torch_thread_count(setup, monkeypatch):
    """torch.set_num_threads on any thread (an adapter-load worker does it) changes the count new
    threads start with; the engine thread sets its creator's count instead."""
    import threading

    import torch

    model_dir, adapters = setup
    caller_threads = torch.get_num_threads()
    if caller_threads < 2:
        pytest.skip("needs torch with at least 2 intra-op threads")
    helper = threading.Thread(target=torch.set_num_threads, args=(1,))
    helper.start()
    helper.join()
    core = engine(model_dir, adapters).core
    seen = []
    step = core.step
    monkeypatch.setattr(core, "step", lambda: seen.append(torch.get_num_threads()) or step())

    async def main():
        client = EngineClient(core).start()
        try:
            await _collect(await client.add_request("t", [1, 2, 3], GREEDY, "ad0"))
        finally:
            client.shutdown()

    try:
        asyncio.run(main())
    finally:
        torch.set_num_threads(caller_threads)
    assert seen and set(seen) == {caller_threads}
