"""The two hooks for your own reduction method: a pruning score and a clustering-and-merging rule.

Select them in a config with ``"pruning": "custom"`` and/or ``"clustering": "custom"`` (the
reference's ``use_custom_pruning`` / ``use_custom_merging`` flags work too). Either edit the two
functions below, or point the config at your own importable functions -- no edit of pact needed::

    {"pruning": "custom", "custom_pruning_fn": "my_pkg.scores:my_score",
     "clustering": "custom", "custom_reduction_fn": "my_pkg.merge:my_merge"}

Contracts (shapes per sample; pact calls the hooks once per sample and reduction layer):

``custom_pruning(keys, queries, **context) -> scores``
    keys:    (1, H, K, d) the layer's keys, KV heads repeated to the H query heads (as the reference's
             ``repeat_kv``); post-RoPE iff ``euti_rope`` (reference: ``use_cosine_in_token_pruning``).
             K = P, the prefix -- every token from position 0 to the last visual token -- with
             ``euti_support="prefix"`` (default; reference ``use_all_non_text_pruning=true``), or
             K = N, the visual tokens only, with ``euti_support="visual"`` (reference ``false``).
    queries: (1, H, P, d) the layer's queries of the prefix P (whatever ``euti_support``, as the
             reference), same RoPE choice.
    context (keyword arguments, passed only if the function accepts them by name or **kwargs):
       hidden (K, D) the hidden states of the K key tokens entering the layer, visual_mask (K,) bool,
       layer (int).
    returns: scores of shape (1, K), (K,), or (N,) for the N visual tokens only. Higher = keep. pact
       keeps the top ``int(N * keep_ratio)`` (or the budget), ties to the lower index. The scores are
       used as returned (``multiply_by_norm`` does not apply, as in the reference).

``custom_token_reduction(hidden, features, **context) -> (kept, labels[, merged])``
    hidden:   (N, D) hidden states of the N candidate visual tokens (after pruning, if any), model dtype.
    features: (N, F) their clustering vectors (``cluster_features``: post-RoPE keys of the layer, KV
              heads concatenated, by default).
    context (keyword arguments, passed only if accepted):
       sizes (N,) float32, how many original tokens each candidate already stands for;
       cutoff (float), the config's ``cutoff``, passed through unchanged as the reference does;
       pruned_hidden (M, D) and pruned_features (M, F): the tokens the pruning stage removed, when
           ``retrieval`` is on (reference ``include_pruned_in_mean``), else None;
       positions (A, N) long position ids of the candidates (A = 3 for M-RoPE, else 1);
       layer (int);
       target (int or None): the sample's token budget (``target_tokens`` / ``target_ratio``), which
           the hook should meet if it can (pact cannot enforce it for a custom clustering).
    returns:
       kept:   LongTensor[R], indices in [0, N) of the representative tokens (unique, any order). Each
               stays in the sequence at its own slot and position id.
       labels: LongTensor[N] or [N + M]: for every candidate (then every pruned token, if given) the
               index in [0, N) of its representative (a member of ``kept``), or -1 to drop it;
               ``labels[kept] == kept``. Pruned tokens beyond the returned length are dropped.
       merged (optional): (R, D) hidden states of the representatives, in the order of ``kept``. If
               omitted, pact writes the size-weighted mean of each representative's members
               (``merge_mean``; with ``merge_mean=false`` the representative keeps its own).
    A ``pact.ops.Reduction`` over the N candidates may be returned instead (pruned tokens dropped).
    Sizes (summed member sizes) and proportional attention (``proportional_attention``) are handled
    by pact.

Combined use (``custom_combined.json``): ``custom_pruning`` ranks the visual tokens, the top
``keep_ratio`` become the candidates of ``custom_token_reduction``, which also receives the pruned
ones when ``retrieval`` is on.
"""

from __future__ import annotations

from typing import Any

import torch


def custom_pruning(keys: torch.Tensor, queries: torch.Tensor, **context: Any) -> torch.Tensor:
    """Example score, the reference's example: how strongly each token attends to itself,
    ``mean_h q_t . k_t`` (no 1/sqrt(d), as the reference). Needs P queries and P keys (same tokens),
    i.e. ``euti_support="prefix"``; with ``"visual"`` the keys are the N visual tokens and the
    queries the P prefix tokens, and this example raises (the reference's crashed).

    Args:
        keys: (1, H, P, d). queries: (1, H, P, d).
    Returns:
        (1, P) float32 scores.
    """
    if keys.shape != queries.shape:
        raise ValueError(
            f"custom_pruning example needs queries and keys of one shape, got {queries.shape}, "
            f"{keys.shape} (it scores q_t . k_t, so it needs euti_support='prefix', reference "
            "use_all_non_text_pruning=true)"
        )
    return (queries.float() * keys.float()).sum(-1).mean(1)


def custom_token_reduction(
    hidden: torch.Tensor, features: torch.Tensor, *, cutoff: float = 0.0, **context: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Example, the reference's example: merge every full window of ``w = max(1, int(cutoff))``
    consecutive candidate tokens into the token ``start + w // 2``; the ``N mod w`` trailing tokens
    that fill no window are dropped, as are pruned tokens. (The reference's example returned the
    un-merged features by mistake; pact writes the window means, or with ``merge_mean=false`` keeps
    each representative's own hidden state, which is what the reference computed.)

    Args:
        hidden: (N, D). features: (N, F) (unused by this example). cutoff: the window size.
    Returns:
        kept: LongTensor[N // w], ``start + w // 2`` of each full window; labels: LongTensor[N] that
        token's index for every member of a full window, -1 for the trailing tokens.
    """
    n = hidden.shape[0]
    w = max(1, int(cutoff))
    full = (n // w) * w  # tokens covered by full windows
    idx = torch.arange(n, device=hidden.device)
    labels = torch.where(idx < full, (idx // w) * w + w // 2, -1)
    kept = torch.arange(n // w, device=hidden.device) * w + w // 2
    return kept, labels
