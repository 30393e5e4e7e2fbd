"""Next-token sampling: one row of float32 logits per sequence with sample=True.

Each row goes through, in order:

1. Penalties. repetition_penalty (CTRL/HF): each token id occurring in the prompt or the output
   has its logit divided by p when positive, multiplied by p otherwise. Then, counting the output
   tokens only (OpenAI), frequency_penalty * count and presence_penalty * (count > 0) are
   subtracted.
2. min_tokens: while len(output_token_ids) < min_tokens, the EOS ids and stop_token_ids get -inf.
   EOS ids are masked even with ignore_eos, as vLLM does.
3. Logprobs (sampling.logprobs not None): log_softmax of the logits after 1-2, before temperature
   and the filters. Each token carries its own logprob and the `logprobs` most likely
   (token, logprob) pairs, most likely first (equal logprobs: lowest id first).
4. Greedy (temperature 0): argmax of the logits after 1-2 (ties: lowest id); num_samples copies.
5. Random: logits / temperature; top-k keeps the k largest (ties with the k-th are all kept;
   0 / -1 / k >= V: off); top-p keeps the smallest most-likely-first prefix whose probability
   reaches top_p (never empty; equal probabilities: lowest id first); min-p drops tokens whose
   probability, renormalised after the previous filters, is below min_p * the largest. Then one
   draw per sample: argmax(p / E) with E ~ Exp(1) per token (the exponential race, which draws
   exactly from p and lets one argmax serve the whole batch).
6. Seeds: the noise E of a seeded row comes from a torch.Generator seeded from (seed,
   sample_index, num_output_tokens) only, so the token depends on nothing else in the batch nor
   on the row's position, and is the same when recomputed after preemption. Sample j of a row with
   num_samples > 1 uses sample_index + j (the forking sequence has sample_index 0, so sample j
   matches completion j). Unseeded rows use the global RNG.

Fast path: when every row is greedy with nothing else to do, one argmax over the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import chain

import torch

from mixserve.types import SampledToken, SamplingParams, ScheduledSequence, TokenLogprob

__all__ = ["sample", "sampling_probs"]


def _seed_for(seed: int, sample_index: int, position: int) -> int:
    """A 64-bit generator seed mixing the three keys (no collisions between nearby triples)."""
    digest = hashlib.blake2b(f"{seed}:{sample_index}:{position}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def _min_tokens_active(seq: ScheduledSequence) -> bool:
    return len(seq.output_token_ids) < seq.sampling.min_tokens


def _needs_general_path(seq: ScheduledSequence) -> bool:
    p = seq.sampling
    return (
        not p.greedy
        or p.has_penalties
        or p.logprobs is not None
        or seq.num_samples != 1
        or _min_tokens_active(seq)
    )


def _flat_ids(
    rows: list[int], id_lists: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> torch.Tensor:
    """Token ids of several rows -> indices into a flattened [len(rows), vocab] tensor."""
    lengths = torch.tensor([len(ids) for ids in id_lists], dtype=torch.int64)
    ids = torch.tensor(list(chain.from_iterable(id_lists)), dtype=torch.int64)
    offsets = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64) * vocab, lengths)
    return (ids + offsets).to(device)


def _apply_penalties(logits: torch.Tensor, sequences: Sequence[ScheduledSequence]) -> None:
    """In place on logits [N, V], for the rows with any penalty."""
    rows = [i for i, s in enumerate(sequences) if s.sampling.has_penalties]
    if not rows:
        return
    seqs = [sequences[i] for i in rows]
    num, vocab, device = len(rows), logits.shape[1], logits.device
    local = list(range(num))
    counts = torch.zeros(num * vocab, dtype=torch.float32, device=device)  # [R*V] output counts
    flat_out = _flat_ids(local, [s.output_token_ids for s in seqs], vocab, device)
    counts.index_put_((flat_out,), torch.ones_like(flat_out, dtype=torch.float32), accumulate=True)
    counts = counts.view(num, vocab)  # [R, V]
    seen = counts > 0  # [R, V]: in the output

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)  # [R, 1]

    rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
    sub = logits.index_select(0, rows_t)  # [R, V]
    rep_rows = [r for r, s in enumerate(seqs) if s.sampling.repetition_penalty != 1]
    if rep_rows:
        # The prompt only matters for the repetition penalty: skip it for the other rows.
        in_prompt = torch.zeros(num * vocab, dtype=torch.bool, device=device)
        prompts = [seqs[r].prompt_token_ids for r in rep_rows]
        in_prompt[_flat_ids(rep_rows, prompts, vocab, device)] = True
        hit = seen | in_prompt.view(num, vocab)  # [R, V]
        rep = column([s.sampling.repetition_penalty for s in seqs])  # 1.0 is exact: no-op
        sub = torch.where(hit, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = column([s.sampling.frequency_penalty for s in seqs])
    pres = column([s.sampling.presence_penalty for s in seqs])
    sub = sub - freq * counts - pres * seen.float()
    logits.index_copy_(0, rows_t, sub)


def _apply_min_tokens(
    logits: torch.Tensor, sequences: Sequence[ScheduledSequence], eos_token_ids: frozenset[int]
) -> None:
    """In place on logits [N, V]: -inf on EOS and stop tokens of rows still under min_tokens."""
    vocab = logits.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, seq in enumerate(sequences):
        if _min_tokens_active(seq):
            # Ids outside the vocabulary can never be produced: nothing to mask.
            ids = eos_token_ids | set(seq.sampling.stop_token_ids)
            banned = sorted(t for t in ids if 0 <= t < vocab)
            row_idx += [i] * len(banned)
            tok_idx += banned
    if row_idx:
        index = (
            torch.tensor(row_idx, device=logits.device),
            torch.tensor(tok_idx, device=logits.device),
        )
        logits.index_put_(index, logits.new_tensor(-torch.inf))


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Random rows' logits [R, V] -> the distribution each draws from [R, V] (temperature > 0).

    Temperature, then top-k, top-p and min-p (see the module docstring). Rows sum to 1.
    """
    vocab, device = logits.shape[1], logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    scaled = logits / temps.unsqueeze(1)  # [R, V]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]  # 0: off
    use_k, use_p = any(ks), any(p.top_p < 1 for p in params)
    if use_p:
        # Stable sort: equal values keep id order, so the top-p prefix is deterministic.
        vals, order = scaled.sort(dim=-1, descending=True, stable=True)  # [R, V]
        if use_k:
            k = torch.tensor([k or vocab for k in ks], device=device).unsqueeze(1)  # [R, 1]
            vals = vals.masked_fill(vals < vals.gather(1, k - 1), -torch.inf)
        probs = vals.softmax(dim=-1)  # [R, V], most likely first
        cum = probs.cumsum(dim=-1)
        # Exclusive cumsum by shifting (not cum - probs, which cancels badly near 1).
        before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # [R, V]
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        vals = vals.masked_fill(before >= top_p.unsqueeze(1), -torch.inf)
        scaled = torch.empty_like(scaled).scatter_(1, order, vals)
    elif use_k:
        # Top-k alone needs only the k-th value: topk up to the largest k, not a full sort.
        k = torch.tensor([k or 1 for k in ks], device=device).unsqueeze(1)  # [R, 1]
        kth = scaled.topk(int(k.max()), dim=-1).values.gather(1, k - 1)  # [R, 1]
        off = torch.tensor([k == 0 for k in ks], device=device).unsqueeze(1)
        kth = kth.masked_fill(off, -torch.inf)
        scaled = scaled.masked_fill(scaled < kth, -torch.inf)
    probs = scaled.softmax(dim=-1)  # [R, V]
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        floor = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [R, 1]
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _draw(probs: torch.Tensor, seqs: Sequence[ScheduledSequence]) -> torch.Tensor:
    """probs [R, V] of random rows -> [sum(num_samples)] tokens, row by row, sample by sample."""
    device = probs.device
    repeats = [s.num_samples for s in seqs]
    rows = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(repeats))
    expanded = probs.index_select(0, rows.to(device))  # [M, V]
    noise = torch.empty_like(expanded)  # [M, V]
    unseeded: list[int] = []
    m = 0
    for seq in seqs:
        for j in range(seq.num_samples):
            seed = seq.sampling.seed
            if seed is None:
                unseeded.append(m)
            else:
                gen = torch.Generator(device=device)
                gen.manual_seed(_seed_for(seed, seq.sample_index + j, seq.num_output_tokens))
                noise[m].exponential_(generator=gen)
            m += 1
    if len(unseeded) == m:
        noise.exponential_()
    elif unseeded:
        idx = torch.tensor(unseeded, device=device)
        noise.index_copy_(0, idx, torch.empty_like(noise[: len(unseeded)]).exponential_())
    # exponential_ may return exactly 0; a floor keeps 0/0 NaNs (which argmax would pick) out.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (expanded / noise).argmax(dim=-1)


def _top_logprobs(logprobs: torch.Tensor, counts: list[int]) -> list[tuple[tuple[int, float], ...]]:
    """logprobs [L, V] -> per row its counts[i] most likely (token, logprob), most likely first."""
    k_max = max(counts)
    if k_max == 0:
        return [() for _ in counts]
    values, ids = logprobs.topk(k_max, dim=-1)  # [L, k_max]
    ks = torch.tensor([max(k, 1) for k in counts], device=logprobs.device).unsqueeze(1)
    kth = values.gather(1, ks - 1)  # [L, 1]
    if bool(((logprobs >= kth).sum(dim=-1, keepdim=True) > ks).any()):
        # A tie straddles some row's cut: topk may keep any of the tied ids; a stable sort keeps
        # the lowest ones. Rare, so the full sort is paid only then.
        values, ids = logprobs.sort(dim=-1, descending=True, stable=True)
        values, ids = values[:, :k_max], ids[:, :k_max]
    out = []
    for row_vals, row_ids, k in zip(values.tolist(), ids.tolist(), counts, strict=True):
        pairs = sorted(zip(row_ids, row_vals, strict=True), key=lambda p: (-p[1], p[0]))
        out.append(tuple(pairs[:k]))
    return out


def sample(
    logits: torch.Tensor,
    sequences: Sequence[ScheduledSequence],
    eos_token_ids: frozenset[int],
) -> list[list[SampledToken]]:
    """logits [N, V] float32, row i for sequences[i] -> per row, num_samples sampled tokens."""
    if logits.dim() != 2 or logits.shape[0] != len(sequences):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(sequences)} sequences")
    if not sequences:
        return []
    if not any(_needs_general_path(s) for s in sequences):
        return [[SampledToken(t)] for t in logits.argmax(dim=-1).tolist()]

    device = logits.device
    logits = logits.float().clone()  # [N, V]; the caller's tensor stays untouched
    _apply_penalties(logits, sequences)
    _apply_min_tokens(logits, sequences, eos_token_ids)

    tokens: list[list[int]] = [[] for _ in sequences]
    greedy = [i for i, s in enumerate(sequences) if s.sampling.greedy]
    if greedy:
        picked = logits.index_select(0, torch.tensor(greedy, device=device)).argmax(dim=-1)
        for i, t in zip(greedy, picked.tolist(), strict=True):
            tokens[i] = [t] * sequences[i].num_samples
    random = [i for i, s in enumerate(sequences) if not s.sampling.greedy]
    if random:
        seqs = [sequences[i] for i in random]
        rows = logits.index_select(0, torch.tensor(random, device=device))  # [R, V]
        drawn = iter(_draw(sampling_probs(rows, [s.sampling for s in seqs]), seqs).tolist())
        for i, seq in zip(random, seqs, strict=True):
            tokens[i] = [next(drawn) for _ in range(seq.num_samples)]

    out = [[SampledToken(t) for t in row] for row in tokens]
    wanted = [i for i, s in enumerate(sequences) if s.sampling.logprobs is not None]
    if not wanted:
        return out
    lp = logits.index_select(0, torch.tensor(wanted, device=device)).log_softmax(dim=-1)  # [L, V]
    tops = _top_logprobs(lp, [int(sequences[i].sampling.logprobs or 0) for i in wanted])
    rows_idx = [r for r, i in enumerate(wanted) for _ in tokens[i]]
    tok_idx = [t for i in wanted for t in tokens[i]]
    own = lp[torch.tensor(rows_idx, device=device), torch.tensor(tok_idx, device=device)].tolist()
    own_iter = iter(own)
    for i, top in zip(wanted, tops, strict=True):
        out[i] = [SampledToken(t, TokenLogprob(t, next(own_iter), top)) for t in tokens[i]]
    return out
