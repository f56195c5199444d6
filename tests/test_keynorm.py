"""A new method is one file + one JSON + one test: the toy "keynorm" (tests/keynorm_method.py).

Importing the method file is the only registration: no name list, no description table, no pair
list is edited, and the method composes with every clusterer and with custom clustering.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import inputs_for, model_for, one_image

import pact
import pact.api
from pact import testing
from pact.methods import base
from pact.methods.base import Signals, build_method

HERE = Path(__file__).resolve().parent
KEYNORM_JSON = HERE / "keynorm.json"
# Every clustering a score pruner composes with (DBSCAN's radius widened for the random tiny keys,
# as for the bundled dbscan config).
CLUSTERINGS = {
    "none": {},
    "kmeans": {},
    "agglomerative": {},
    "dpc": {},
    "dbscan": {"dbscan_eps": 0.9},
    "dbdpc": {},
    "custom": {},
}


@pytest.fixture
def keynorm():
    """Import tests/keynorm_method.py (which declares and registers keynorm); undo it afterwards."""
    saved = (dict(base.SPECS), dict(base.REGISTERED), dict(base.PAIR_DESCRIPTIONS))
    spec = importlib.util.spec_from_file_location("keynorm_method", HERE / "keynorm_method.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["keynorm_method"] = module
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        sys.modules.pop("keynorm_method", None)
        for table, old in zip((base.SPECS, base.REGISTERED, base.PAIR_DESCRIPTIONS), saved, strict=True):
            table.clear()
            table.update(old)


def keys_signals(keys: torch.Tensor, visual: slice, config) -> Signals:
    """Signals of one sample whose layer keys are ``keys`` (T, H_kv, d); hidden states are unused."""
    t = keys.shape[0]
    mask = torch.zeros(t, dtype=torch.bool)
    mask[visual] = True
    n = int(mask.sum())
    queries = torch.zeros(t, 2, keys.shape[2])
    return Signals(
        layer=2,
        sample=0,
        hidden=torch.zeros(t, 4),
        visual_mask=mask,
        sizes=torch.ones(n),
        positions=torch.arange(t)[None],
        visual_index=torch.arange(n),
        config=config,
        qk_fn=lambda j, h, rope, want_q, want_k: (queries, keys, None, None),
        cos_sin_fn=lambda: (None, None),
        layer_input_fn=lambda j: None,
    )


def test_keynorm_keeps_the_largest_concatenated_key_norms(keynorm):
    # 1 text token, then 4 visual tokens, then 1 text token; 2 KV heads of dimension 2. Concatenated
    # key norms of the visual tokens, by hand: sqrt(1+4+4+16)=5, 1, sqrt(9)=3, sqrt(16+9)=5.0 -> with
    # keep_ratio 0.5 the two largest are tokens 0 and 3 (a tie at 5, both kept).
    keys = torch.tensor(
        [
            [[9.0, 9.0], [9.0, 9.0]],  # text: ignored however large
            [[1.0, 2.0], [2.0, 4.0]],
            [[1.0, 0.0], [0.0, 0.0]],
            [[0.0, 0.0], [3.0, 0.0]],
            [[4.0, 0.0], [0.0, 3.0]],
            [[9.0, 9.0], [9.0, 9.0]],
        ]
    )
    cfg = pact.load_config(KEYNORM_JSON)
    s = keys_signals(keys, slice(1, 5), cfg)
    torch.testing.assert_close(keynorm.keynorm_token_scores(s), torch.tensor([5.0, 1.0, 3.0, 5.0]))
    assert build_method(cfg).reduce(s).kept.tolist() == [0, 3]
    # A budget of 3 tokens keeps the third largest (token 2) as well.
    assert build_method(cfg.replace(target_tokens=3)).reduce(s).kept.tolist() == [0, 2, 3]


def test_keynorm_is_unknown_until_its_file_is_imported():
    with pytest.raises(ValueError, match=r"pruning.*must be one of .*got 'keynorm'"):
        pact.load_config(KEYNORM_JSON)


def test_keynorm_is_listed_and_derived_everywhere(keynorm, capsys):
    from pact.config import PRUNING_METHODS, SCORE_PRUNING_METHODS
    from pact.methods import REGISTRY
    from pact.methods.listing import main

    assert "keynorm" in PRUNING_METHODS and "keynorm" in SCORE_PRUNING_METHODS
    for clustering in CLUSTERINGS:
        assert ("keynorm", clustering) in REGISTRY
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "keynorm+none" in out and "key-norm pruning (toy test method)" in out
    assert "keynorm+custom" in out and "key-norm pruning (toy test method), then k-means" in out


@pytest.mark.parametrize("clustering", list(CLUSTERINGS))
def test_keynorm_composes_with_every_clustering_on_a_model(keynorm, clustering):
    model, _ = model_for("qwen2_vl")
    x = inputs_for("qwen2_vl", [one_image("qwen2_vl")])
    cfg = pact.load_config(KEYNORM_JSON, clustering=clustering, **CLUSTERINGS[clustering])
    pact.api.apply(model, cfg)
    with torch.no_grad():
        logits = model(**x).logits
    assert bool(torch.isfinite(logits).all())
    st = pact.api.stats(model)
    before = testing.patch_token_mask(model, x).sum(1).tolist()
    assert st.visual_before == before
    kept = int(before[0] * cfg.keep_ratio)
    if clustering == "none":
        assert st.visual_after == [kept]
    else:  # clustering of the kept tokens can only merge them further (retrieval adds no centers)
        assert 0 < st.visual_after[0] <= kept


def test_keynorm_iqr_selection_keeps_the_scores_above_the_threshold(keynorm):
    model, _ = model_for("qwen2_vl")
    x = inputs_for("qwen2_vl", [one_image("qwen2_vl")])
    cfg = pact.load_config(KEYNORM_JSON, pruning_selection="iqr", iqr_alpha=0.5)
    pact.api.apply(model, cfg)
    with torch.no_grad():
        model(**x)
    record = pact.api.stats(model).records[-1][0]
    scores = record.scores.float()
    q1, q3 = torch.quantile(scores, 0.25), torch.quantile(scores, 0.75)
    expected = (scores > q1 + 0.5 * (q3 - q1)).nonzero().squeeze(1)
    assert record.kept.tolist() == expected.tolist()
    assert 0 < record.kept.numel() < scores.numel()
