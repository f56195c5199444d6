"""Pure tensor algorithms of PACT and its baselines (no transformers import, no model knowledge)."""

from pact.ops.attention import (
    Visibility,
    build_attention_mask,
    build_block_window_mask,
    proportional_bias,
    visible_keys,
)
from pact.ops.dbdpc import (
    cosine_distances,
    dbdpc,
    dbdpc_from_distances,
    density,
    density_order,
    normalize_rows,
    retrieve,
)
from pact.ops.merge import cluster_means, cluster_sizes, reduction_from_clusters, reduction_from_keep
from pact.ops.pact import pact_reduce
from pact.ops.reduction import Reduction, identity_reduction
from pact.ops.scoring import (
    check_finite,
    euti_scores,
    fastv_scores,
    keep_count,
    keep_topk,
    norm_scores,
    random_scores,
    topk_indices,
)

__all__ = [
    "Reduction",
    "Visibility",
    "build_attention_mask",
    "build_block_window_mask",
    "check_finite",
    "cluster_means",
    "cluster_sizes",
    "cosine_distances",
    "dbdpc",
    "dbdpc_from_distances",
    "density",
    "density_order",
    "euti_scores",
    "fastv_scores",
    "identity_reduction",
    "keep_count",
    "keep_topk",
    "norm_scores",
    "normalize_rows",
    "pact_reduce",
    "proportional_bias",
    "random_scores",
    "reduction_from_clusters",
    "reduction_from_keep",
    "retrieve",
    "topk_indices",
    "visible_keys",
]
