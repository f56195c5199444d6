"""Importance scores of visual tokens and the exact top-k selection that prunes by them.

Every score is float32 whatever the model dtype and is returned in the order of the visual
positions (the `True` entries of `visual_mask`, ascending). Higher means more important.

Conventions shared by the scores:
- The *prefix* P is every position from 0 up to and including the last visual token (system prompt,
  template header, text between images, every visual token). Text after the last visual token (the
  question, in the chat templates PACT was evaluated with) is not part of P, so EUTI and the reference
  FastV variant are query-agnostic.
- `queries` (T, H, d) and `keys` (T, H_kv, d) are one layer's per-head projections. With grouped-query
  attention (H_kv < H) query head h reads key head h // (H / H_kv), as transformers' `repeat_kv` does.
"""

from __future__ import annotations

import bisect
import math
import numbers

import torch

from pact.ops.attention import Visibility


def check_finite(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the first input that holds NaN or Inf.

    One host synchronisation for all inputs together; the per-tensor search only runs on failure.
    Float inputs only are checked (integer and bool tensors cannot hold NaN).
    Cheap test first: a float32 sum is finite iff every element is, except when finite elements
    overflow float32 (|sum| > 3.4e38, absurd for activations); so a non-finite sum falls back to
    the exact per-element test before anything is raised (``isfinite`` on bf16 costs several ops
    per element, the float32 sum about one).
    """
    floats = {k: t for k, t in tensors.items() if t is not None and t.is_floating_point() and t.numel()}
    if not floats:
        return
    sums = torch.stack([t.sum(dtype=torch.float32) for t in floats.values()])
    if bool(torch.isfinite(sums).all()):
        return
    ok = torch.stack([torch.isfinite(t).all() for t in floats.values()]).all()
    if bool(ok):
        return
    for name, t in floats.items():
        if not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            raise ValueError(
                f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf, shape {tuple(t.shape)}); "
                "token reduction needs finite hidden states (check the model dtype for overflow)"
            )


def _visual_positions(visual_mask: torch.Tensor, length: int) -> torch.Tensor:
    if visual_mask.dim() != 1 or visual_mask.numel() != length:
        raise ValueError(f"visual_mask must have shape ({length},), got {tuple(visual_mask.shape)}")
    if visual_mask.dtype != torch.bool:
        raise ValueError(f"visual_mask must be a bool tensor, got {visual_mask.dtype}")
    return visual_mask.nonzero().squeeze(1)


def _check_heads(queries: torch.Tensor, keys: torch.Tensor, length: int) -> tuple[int, int, int]:
    if queries.dim() != 3 or keys.dim() != 3:
        raise ValueError(
            "queries must be (T, H, d) and keys (T, H_kv, d), "
            f"got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    T, H, d = queries.shape
    if not T == keys.shape[0] == length or keys.shape[2] != d:
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must share T={length} and head dim"
        )
    H_kv = keys.shape[1]
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"number of query heads ({H}) must be a multiple of key heads ({H_kv})")
    return H, H_kv, d


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_scale(scale: float | None) -> None:
    """Raise ValueError unless ``scale`` (a softmax logit scale) is None or a finite positive number."""
    real = isinstance(scale, numbers.Real) and not isinstance(scale, bool)
    if scale is not None and not (real and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be None (1/sqrt(d)) or a finite positive number, got {scale!r}")


def euti_scores(
    hidden: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    visual_mask: torch.Tensor,
    *,
    support: str = "prefix",
    query_from: str = "prefix",
    multiply_by_norm: bool = True,
    norm_order: float = 2.0,
    scale: float | None = None,
) -> torch.Tensor:
    """EUTI importance of every visual token, without any attention matrix.

    score_i = ||h_i||_p * mean_h softmax_{j in S}( qbar_h . k_{h,j} * scale )_i

    with qbar_h the mean query of head h over Q and S the softmax support.

    Args:
        hidden: (T, D) residual stream entering the layer (before its input norm).
        queries: (T, H, d) the layer's queries, before RoPE for the reference behaviour.
        keys: (T, H_kv, d) the layer's keys, before RoPE for the reference behaviour.
        visual_mask: (T,) bool, True at visual tokens.
        support: "prefix" (reference code: softmax over the prefix P) or "visual" (paper eq. 2:
            softmax over the visual tokens only).
        query_from: "prefix" (reference code: qbar = mean query over P) or "visual" (paper eq. 1).
        multiply_by_norm: multiply by the p-norm of the hidden state (reference default True).
        norm_order: p of that norm.
        scale: the layer's softmax scale (``ModelAdapter.attention_scale``); None: 1/sqrt(d).

    Returns:
        float32 (N,) scores of the N visual tokens, in sequence order. Empty if N == 0.

    Memory is linear in T (one (H, S) logit row per head, never a T x T attention matrix), so an
    hour of video needs no blocked form. Under autograd the scores are differentiable; PACT only
    uses them through the discrete top-k.
    """
    _check_choice("support", support, ("prefix", "visual"))
    _check_choice("query_from", query_from, ("prefix", "visual"))
    check_scale(scale)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (T, D), got {tuple(hidden.shape)}")
    T = hidden.shape[0]
    H, H_kv, d = _check_heads(queries, keys, T)
    vis = _visual_positions(visual_mask, T)
    check_finite(hidden=hidden, queries=queries, keys=keys)
    if vis.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=hidden.device)
    prefix_len = int(vis[-1]) + 1

    q_rows = queries[:prefix_len] if query_from == "prefix" else queries[vis]
    qbar = q_rows.float().mean(0).view(H_kv, H // H_kv, d)  # (H_kv, n_rep, d): heads grouped by key head
    k_rows = keys[:prefix_len] if support == "prefix" else keys[vis]
    # (H_kv, n_rep, S): the grouped layout reads each key head once instead of repeating it n_rep times.
    logits = torch.einsum("gnd,sgd->gns", qbar, k_rows.float())
    logits = logits / math.sqrt(d) if scale is None else logits * scale
    attn = logits.softmax(dim=-1).reshape(H, -1).mean(0)  # (S,)
    scores = attn[vis] if support == "prefix" else attn
    if multiply_by_norm:
        scores = scores * torch.linalg.vector_norm(hidden[vis].float(), ord=norm_order, dim=-1)
    return scores


def norm_scores(hidden: torch.Tensor, visual_mask: torch.Tensor, *, norm_order: float = 2.0) -> torch.Tensor:
    """p-norm of each visual token's hidden state: (T, D), (T,) bool -> float32 (N,)."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (T, D), got {tuple(hidden.shape)}")
    vis = _visual_positions(visual_mask, hidden.shape[0])
    check_finite(hidden=hidden)
    return torch.linalg.vector_norm(hidden[vis].float(), ord=norm_order, dim=-1)


def random_scores(
    num: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Uniform random scores, float32 (num,); reproducible through `generator`."""
    if generator is not None:
        device = generator.device
    return torch.rand(num, generator=generator, device=device, dtype=torch.float32)


def _chunk_rows(rows_total: int, cols: int, heads: int, budget: int = 1 << 22) -> int:
    """Query rows per chunk so one chunk's (heads, rows, cols) float32 logits stay under `budget` items."""
    return max(1, min(rows_total, budget // max(1, heads * cols)))


def fastv_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    visual_mask: torch.Tensor,
    *,
    variant: str = "reference",
    causal: bool = True,
    support: str = "prefix",
    chunk_size: int | None = None,
    scale: float | None = None,
    visibility: Visibility | None = None,
) -> torch.Tensor:
    """Attention received by each visual token (FastV-style scores), float32 (N,).

    variant="reference" (the reference's FastV): mean over every prefix query t in P and every head
    of softmax_j(q_t . k_j * scale) over the keys j of the softmax support (j <= t when `causal`),
    read at the visual keys. `support`: "prefix" (keys = P, the reference's
    use_all_non_text_pruning=true) or "visual" (keys = the visual tokens only, its false; with
    `causal`, a query row that precedes every visual token sees no key and adds 0, as the
    reference's NaN -> 0). The mean is over all |P| rows either way. Computed in float32 over
    chunks of query rows (`chunk_size`, default: chunks of about 4M logits), so the (H, |P|, |S|)
    attention tensor is never materialised.

    variant="original" (FastV paper): the head-mean attention of the LAST token of the sequence over
    all keys (it sees all of them), read at the visual keys (`support` must be "prefix").

    `scale`: the layer's softmax scale (``ModelAdapter.attention_scale``); None: 1/sqrt(d).
    `visibility`: the layer's own mask rule for these T tokens (``Signals.attention_visibility``):
    with `causal` (reference) and always (original) a query row sees exactly the keys the layer lets
    it see (Gemma 3: a sliding window; image rows see their whole image), so the rows are the model's
    own attention rows; None or plain causal: the causal rule above, with the same arithmetic.
    `causal=False` ignores it (every query sees every key of the support).
    Pass the post-RoPE queries and keys to match the reference.
    """
    _check_choice("variant", variant, ("reference", "original"))
    _check_choice("support", support, ("prefix", "visual"))
    check_scale(scale)
    T = queries.shape[0] if queries.dim() == 3 else -1
    H, H_kv, d = _check_heads(queries, keys, T)
    vis = _visual_positions(visual_mask, T)
    check_finite(queries=queries, keys=keys)
    if vis.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=queries.device)
    n_rep = H // H_kv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    rule = None if visibility is None or visibility.is_causal else visibility
    if rule is not None:
        _check_visibility(rule, T)

    if variant == "original":
        if support != "prefix":
            raise ValueError(
                "fastv_scores: variant='original' attends over every key; support must be 'prefix'"
            )
        q = queries[-1].float().view(H_kv, n_rep, d)
        logits = torch.einsum("gnd,sgd->gns", q, keys.float()).mul_(scale)
        if rule is not None:  # the last row's keys under the layer's rule (e.g. its window)
            every = torch.arange(T, device=queries.device)
            hidden_keys = ~rule.rows(every[-1:], every)[0]  # (T,)
            logits.masked_fill_(hidden_keys, -math.inf)
        attn = logits.softmax(-1)
        return attn.reshape(H, T).mean(0)[vis]

    P = int(vis[-1]) + 1
    key_pos = vis if support == "visual" else torch.arange(P, device=queries.device)
    key_pos_host = vis.tolist() if support == "visual" else None
    S = key_pos.numel()
    k = keys[key_pos].float().permute(1, 2, 0)  # (H_kv, d, S)
    q = queries[:P].float()  # (P, H, d)
    rows = chunk_size or _chunk_rows(P, S, H)
    received = torch.zeros(S, dtype=torch.float32, device=queries.device)
    masked = causal and rule is not None
    # how far each row's keys reach: t + 1 (causal), or an image block's end (rows of an image see it all)
    reach = rule.reach()[:P].tolist() if masked and rule.blocks is not None else None
    for start in range(0, P, rows):
        stop = min(P, start + rows)
        # Causal: queries < stop only see keys at positions < stop, so the chunk only needs those columns.
        end = stop if reach is None else min(P, reach[stop - 1])  # the support ends at P
        if not causal:
            width = S
        elif key_pos_host is None:
            width = end
        else:
            width = bisect.bisect_left(key_pos_host, end)
        if width == 0:
            continue  # no query row of the chunk sees a key: they add 0
        qc = q[start:stop].view(stop - start, H_kv, n_rep, d).permute(1, 0, 2, 3)  # (H_kv, r, n_rep, d)
        logits = torch.matmul(qc.reshape(H_kv, -1, d), k[:, :, :width]).mul_(scale)  # (H_kv, r*n_rep, w)
        if causal:
            t = torch.arange(start, stop, device=q.device)
            # (r, w): the keys the row does not see (later ones; under a rule, what the layer hides)
            future = ~rule.rows(t, key_pos[:width]) if masked else key_pos[None, :width] > t[:, None]
            logits = logits.view(H_kv, stop - start, n_rep, width)
            logits.masked_fill_(future[None, :, None], -math.inf)
        probs = logits.reshape(-1, width).softmax(-1)
        if causal and key_pos_host is not None:
            probs = probs.nan_to_num_(0.0)  # rows before the first visual key: all masked
        received[:width] += probs.sum(0)
    received /= P * H
    return received[vis] if support == "prefix" else received


def _check_visibility(rule: Visibility, length: int) -> None:
    for name in ("blocks", "positions"):
        t = getattr(rule, name)
        if t is not None and t.numel() != length:
            raise ValueError(f"visibility.{name} has {t.numel()} entries; the sequence has T={length} tokens")


def keep_count(num: int, keep_ratio: float) -> int:
    """Number of tokens pruning keeps: int(num * keep_ratio), i.e. floor, exactly as the reference."""
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    return int(num * keep_ratio)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the k highest scores; ties: higher score first, then lower index.

    scores: (N,) any float dtype (compared in float32). Returns LongTensor (k,).
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got {tuple(scores.shape)}")
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k must be in [0, {scores.numel()}], got {k}")
    check_finite(scores=scores)
    # A stable descending sort keeps equal scores in index order: that is the tie rule.
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def keep_topk(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Ascending indices of the int(N * keep_ratio) highest-scoring tokens (see `topk_indices`)."""
    return topk_indices(scores, keep_count(scores.numel(), keep_ratio))
