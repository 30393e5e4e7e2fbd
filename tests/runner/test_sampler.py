"""The sampler against naive float64 per-row Python references over small vocabularies."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from mixserve.runner import sampler
from mixserve.runner.sampler import sample, sampling_probs
from mixserve.types import SamplingParams, ScheduledSequence

EOS = frozenset({2})
INF = float("inf")


def seq(params: SamplingParams, prompt=(), output=(), **kw) -> ScheduledSequence:
    kw.setdefault("num_output_tokens", len(output))
    return ScheduledSequence(
        seq_id=0, token_ids=(0,), num_computed_tokens=0, block_ids=(0,), adapter=None,
        sample=True, sampling=params, prompt_token_ids=tuple(prompt),
        output_token_ids=tuple(output), **kw,
    )  # fmt: skip


def rand_logits(n: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def naive_processed(row: list[float], s: ScheduledSequence, eos=EOS) -> list[float]:
    p, x = s.sampling, [float(v) for v in row]
    for t in set(s.prompt_token_ids) | set(s.output_token_ids):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(s.output_token_ids).items():
        x[t] -= c * p.frequency_penalty + p.presence_penalty
    if len(s.output_token_ids) < p.min_tokens:
        for t in set(eos) | set(p.stop_token_ids):
            if t < len(x):
                x[t] = -INF
    return x


def naive_log_softmax(x: list[float]) -> list[float]:
    m = max(x)
    log_z = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - log_z for v in x]


def naive_probs(row: list[float], p: SamplingParams) -> list[float]:
    x = [v / p.temperature for v in row]
    keep = [True] * len(x)

    def normalised() -> list[float]:
        m = max(v for v, k in zip(x, keep, strict=True) if k)
        e = [math.exp(v - m) if k else 0.0 for v, k in zip(x, keep, strict=True)]
        return [v / sum(e) for v in e]

    if 0 < p.top_k < len(x):
        kth = sorted(x, reverse=True)[p.top_k - 1]
        keep = [v >= kth for v in x]
    probs = normalised()
    if p.top_p < 1:
        mass, chosen = 0.0, set()
        for i in sorted(range(len(x)), key=lambda i: (-probs[i], i)):
            if mass >= p.top_p:
                break
            chosen.add(i)
            mass += probs[i]
        keep = [i in chosen for i in range(len(x))]
        probs = normalised()
    if p.min_p > 0:
        keep = [k and q >= p.min_p * max(probs) for k, q in zip(keep, probs, strict=True)]
        probs = normalised()
    return probs


def all_logprobs(logits: torch.Tensor, s: ScheduledSequence, eos=EOS) -> list[float]:
    """Every token's logprob as the sampler reports it (V <= 20, logprobs=V)."""
    (tok,) = sample(logits, [s], eos)[0]
    top = dict(tok.logprob.top)
    assert len(top) == logits.shape[1]
    return [top[t] for t in range(logits.shape[1])]


def close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return all((x == y == -INF) or abs(x - y) <= tol for x, y in zip(a, b, strict=True))


PENALTIES = [
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(repetition_penalty=0.6),
    SamplingParams(presence_penalty=1.5),
    SamplingParams(presence_penalty=-0.8),
    SamplingParams(frequency_penalty=0.7),
    SamplingParams(frequency_penalty=-1.2),
    SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.9),
]


@pytest.mark.parametrize("params", PENALTIES)
def test_penalties_match_naive(params):
    # Prompt-only (1, 4), output-only (6, 9), both (3), repeated (9 x3, 3 x2), and signs mixed.
    logits = rand_logits(1, 16, seed=1)
    s = seq(replace(params, logprobs=16), prompt=(1, 4, 3, 1), output=(9, 3, 6, 9, 3, 9))
    want = naive_log_softmax(naive_processed(logits[0].tolist(), s))
    assert close(all_logprobs(logits, s), want)
    assert not close(all_logprobs(logits, seq(SamplingParams(logprobs=16))), want)


def test_penalties_are_per_row_in_a_batch():
    logits = rand_logits(3, 16, seed=2)
    seqs = [
        seq(SamplingParams(logprobs=16, frequency_penalty=1.0), prompt=(5,), output=(7, 7)),
        seq(SamplingParams(logprobs=16), prompt=(7,), output=(7, 5)),
        seq(SamplingParams(logprobs=16, repetition_penalty=1.9), prompt=(5, 8), output=(7,)),
    ]
    out = sample(logits, seqs, EOS)
    for row, (s, (tok,)) in enumerate(zip(seqs, out, strict=True)):
        got = [dict(tok.logprob.top)[t] for t in range(16)]
        assert close(got, naive_log_softmax(naive_processed(logits[row].tolist(), s)))


def test_min_tokens_masks_eos_and_stop_until_enough_tokens():
    logits = torch.zeros(1, 16)
    logits[0, 2], logits[0, 5], logits[0, 11] = 9.0, 8.0, 7.0  # EOS, stop, then a plain token
    p = SamplingParams(min_tokens=3, stop_token_ids=(5, 99), ignore_eos=True, temperature=0)
    for output, want in [((), 11), ((4, 4), 11), ((4, 4, 4), 2), ((4, 4, 4, 4), 2)]:
        assert sample(logits, [seq(p, output=output)], EOS)[0][0].token_id == want
    s = seq(SamplingParams(min_tokens=2, logprobs=16, stop_token_ids=(5,)), output=(1,))
    lp = all_logprobs(logits, s)
    assert lp[2] == lp[5] == -INF
    assert close(lp, naive_log_softmax(naive_processed(logits[0].tolist(), s)))
    # Several EOS ids, all masked; random rows never draw them either.
    eos = frozenset({2, 11})
    p = SamplingParams(min_tokens=1, stop_token_ids=(5,), seed=3)
    tokens = {t.token_id for t in sample(logits, [seq(p, num_samples=64)], eos)[0]}
    assert tokens and not tokens & {2, 5, 11}


def test_logprobs_values_and_top_order():
    logits = rand_logits(2, 50, seed=3)
    seqs = [  # temperature and filters must not show in the logprobs
        seq(SamplingParams(logprobs=5, seed=1, temperature=0.5)),
        seq(SamplingParams(logprobs=0, top_k=3, temperature=2.0)),
    ]
    out = sample(logits, seqs, EOS)
    for row, k in [(0, 5), (1, 0)]:
        (tok,) = out[row]
        want = naive_log_softmax(logits[row].tolist())  # before temperature and the filters
        assert tok.logprob.token_id == tok.token_id
        assert abs(tok.logprob.logprob - want[tok.token_id]) < 1e-5
        order = sorted(range(50), key=lambda t: -want[t])[:k]
        assert [t for t, _ in tok.logprob.top] == order
        assert close([v for _, v in tok.logprob.top], [want[t] for t in order])
    assert sample(logits, [seq(SamplingParams())] * 2, EOS)[0][0].logprob is None
    # Ties straddling the cut: the lowest ids, most likely first.
    tied = torch.tensor([[0.0, 1.0, 3.0, 1.0, 1.0, 3.0]])
    (tok,) = sample(tied, [seq(SamplingParams(temperature=0, logprobs=3))], EOS)[0]
    assert tok.token_id == 2 and [t for t, _ in tok.logprob.top] == [2, 5, 1]


def test_greedy_argmax_ties_and_copies():
    logits = torch.tensor([[1.0, 4.0, 4.0, 0.0], [5.0, 1.0, 2.0, 5.0]])
    seqs = [seq(SamplingParams(temperature=0)), seq(SamplingParams(temperature=0), num_samples=3)]
    out = sample(logits, seqs, EOS)
    assert [[t.token_id for t in row] for row in out] == [[1], [0, 0, 0]]


def test_greedy_fast_path_matches_general_path(monkeypatch):
    logits = rand_logits(6, 300, seed=4)
    greedy = [seq(SamplingParams(temperature=0, seed=i)) for i in range(6)]
    extra = seq(SamplingParams(logprobs=0))  # forces the general path
    general = sample(torch.cat([logits, logits[:1]]), [*greedy, extra], EOS)

    def boom(*args):
        raise AssertionError("fast path expected")

    monkeypatch.setattr(sampler, "_apply_penalties", boom)
    fast = sample(logits, greedy, EOS)
    assert fast == general[:6] and [r[0].token_id for r in fast] == logits.argmax(-1).tolist()


# Each cuts part (not all) of ROW's 12 tokens; combined ones would differ if applied out of order.
ROW = [0.3, 1.9, -0.5, 1.2, 0.0, 2.4, -1.1, 0.8, 1.5, -0.2, 0.5, 2.1]
FILTERS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.5, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=6, top_p=0.8, min_p=0.1),
    SamplingParams(temperature=2.0, top_k=-1, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.5, top_k=8, top_p=0.7),
    SamplingParams(temperature=0.8, top_k=5, min_p=0.3),
]


def test_sampling_probs_match_naive():
    for logits in [torch.tensor([ROW] * len(FILTERS)), rand_logits(len(FILTERS), 40, seed=5)]:
        probs = sampling_probs(logits, FILTERS)
        for row, p in enumerate(FILTERS):
            want = naive_probs(logits[row].tolist(), p)
            assert close(probs[row].tolist(), want, tol=1e-6), p


@pytest.mark.parametrize("params", FILTERS)
def test_draws_follow_the_filtered_distribution(params):
    """2000 seeded draws: only supported tokens, every likely one, at about its probability."""
    want = naive_probs(ROW, params)
    seqs = [seq(replace(params, seed=i)) for i in range(2000)]
    got = Counter(r[0].token_id for r in sample(torch.tensor([ROW] * 2000), seqs, EOS))
    assert {t for t, q in enumerate(want) if q > 0.005} <= set(got)
    assert set(got) <= {t for t, q in enumerate(want) if q > 0}
    for t, q in enumerate(want):
        assert abs(got[t] / 2000 - q) < 4 * math.sqrt(q * (1 - q) / 2000) + 1e-3, (t, q)


def stream(s: ScheduledSequence, steps: int, batch=(), position: int = 0) -> list[int]:
    """Tokens of s over `steps` positions, in a batch with `batch` rows at `position`."""
    tokens = []
    for step in range(steps):
        seqs = [*batch]
        seqs.insert(position, seq(s.sampling, sample_index=s.sample_index, num_output_tokens=step))
        logits = rand_logits(len(seqs), 1000, seed=step + 100, scale=0.5)
        logits[position] = rand_logits(1, 1000, seed=step, scale=0.5)[0]
        tokens.append(sample(logits, seqs, EOS)[position][0].token_id)
    return tokens


def test_seeded_rows_ignore_batch_position_and_global_rng():
    s = seq(SamplingParams(seed=42, top_p=0.95))
    others = [
        seq(SamplingParams()),
        seq(SamplingParams(seed=7, top_k=5), num_samples=3),
        seq(SamplingParams(temperature=0), output=(1, 1)),
        seq(SamplingParams(seed=42, presence_penalty=1.0), sample_index=1, output=(3,)),
    ]
    alone = stream(s, 12)
    torch.manual_seed(0)
    assert stream(s, 12, others, position=3) == alone
    torch.manual_seed(1)
    assert stream(s, 12, others, position=0) == alone
    assert stream(seq(SamplingParams(seed=43, top_p=0.95)), 12) != alone
    # Same logits at every position: the draws still change with num_output_tokens.
    logits = rand_logits(1, 1000, seed=8, scale=0.5)
    by_position = [
        sample(logits, [seq(s.sampling, num_output_tokens=k)], EOS)[0][0] for k in range(8)
    ]
    assert len({t.token_id for t in by_position}) > 4
    assert stream(seq(SamplingParams(seed=42, top_p=0.95), sample_index=1), 12) != alone


def test_num_samples():
    logits = rand_logits(1, 1000, seed=6, scale=0.5)
    p = SamplingParams(seed=9, n=4, logprobs=1)
    (row,) = sample(logits, [seq(p, num_samples=4)], EOS)
    assert len(row) == 4 and len({t.token_id for t in row}) == 4
    lp = naive_log_softmax(logits[0].tolist())
    assert all(abs(t.logprob.logprob - lp[t.token_id]) < 1e-5 for t in row)
    # Sample j is what completion j (sample_index j, one sample) draws, e.g. after preemption.
    singles = [sample(logits, [seq(p, sample_index=j)], EOS)[0][0] for j in range(4)]
    assert singles == row
    unseeded = sample(logits, [seq(SamplingParams(n=5), num_samples=5)], EOS)[0]
    assert len(unseeded) == 5 and all(t.logprob is None for t in unseeded)


def test_input_logits_untouched_and_shape_checked():
    logits = rand_logits(1, 16, seed=7)
    before = logits.clone()
    sample(logits, [seq(SamplingParams(repetition_penalty=2.0, min_tokens=1), output=(3,))], EOS)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError):
        sample(logits, [], EOS)
