"""Steps share the CPUs with running adapter loads (mixserve.torch_threads.ComputeThreadBudget)."""

from __future__ import annotations

import pytest
import torch

from mixserve.torch_threads import ComputeThreadBudget


@pytest.fixture
def two_threads():
    own = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(own)


@pytest.mark.parametrize(
    ("cpus", "own", "busy", "want"),
    [(2, 2, 0, 2), (2, 2, 1, 1), (2, 2, 2, 1), (16, 8, 2, 8), (16, 16, 2, 14), (4, 1, 3, 1)],
)
def test_a_step_uses_the_cpus_that_loads_leave(cpus, own, busy, want):
    assert ComputeThreadBudget(cpus).threads_for(own, busy) == want


def test_sharing_lowers_the_count_for_the_block_and_restores_it(two_threads):
    budget = ComputeThreadBudget(2)
    with budget.sharing_with(1) as threads:
        assert threads == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError), budget.sharing_with(1):
        raise ValueError("a failed step")
    assert torch.get_num_threads() == 2
    with budget.sharing_with(0) as threads:
        assert threads == 2 == torch.get_num_threads()


def test_engine_steps_run_with_fewer_threads_while_loads_run(two_threads, tmp_path, monkeypatch):
    from engine_support import make_model

    from mixserve import LLM
    from mixserve.adapters.pager import AdapterPager
    from mixserve.types import SamplingParams

    llm = LLM(make_model(str(tmp_path)))
    core = llm.engine
    assert core.cpu_threads is not None  # CPU engines share
    core.cpu_threads = ComputeThreadBudget(2)
    seen: list[int] = []
    execute = core.runner.execute

    def recording_execute(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return execute(*args, **kwargs)

    monkeypatch.setattr(core.runner, "execute", recording_execute)
    params = SamplingParams(temperature=0, max_tokens=2)
    llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=params)
    monkeypatch.setattr(AdapterPager, "num_loads_running", property(lambda self: 1))
    llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=params)
    assert seen == [2, 2, 1, 1]
    assert torch.get_num_threads() == 2


def test_following_rereads_the_busy_cpus_at_each_refresh(two_threads):
    budget = ComputeThreadBudget(2)
    busy = [1]
    with budget.following(lambda: busy[0]) as refresh:
        assert torch.get_num_threads() == 1  # read at entry
        busy[0] = 0
        assert refresh() == 2 == torch.get_num_threads()
        busy[0] = 2
        assert refresh() == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == 2


def test_a_load_that_ends_mid_step_gives_its_cpu_back_at_the_next_layer(
    two_threads, tmp_path, monkeypatch
):
    from engine_support import make_model

    from mixserve import LLM
    from mixserve.adapters.pager import AdapterPager
    from mixserve.types import SamplingParams

    llm = LLM(make_model(str(tmp_path)))
    core = llm.engine
    core.cpu_threads = ComputeThreadBudget(2)
    loads = [1]
    monkeypatch.setattr(AdapterPager, "num_loads_running", property(lambda self: loads[0]))
    per_layer: list[int] = []
    execute = core.runner.execute

    def load_ends_after_the_first_layer(plan, slots, between_layers=None):
        assert between_layers is not None

        def refresh():
            between_layers()
            per_layer.append(torch.get_num_threads())
            loads[0] = 0

        return execute(plan, slots, between_layers=refresh)

    monkeypatch.setattr(core.runner, "execute", load_ends_after_the_first_layer)
    llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=1))
    num_layers = len(core.runner.model.weights.layers)
    assert per_layer == [1] + [2] * (num_layers - 1)
    assert torch.get_num_threads() == 2
