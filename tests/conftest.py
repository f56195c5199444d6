"""Shared fixtures: one tiny random model + processor per family per test process, and helpers.

Models are built once per process (``tiny``) and shared; a test picks the attention backend with
``model_for(family, attn)`` and every test leaves the model as it found it (pact removed, stock
backend restored by the autouse fixture).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pact import testing
from pact.methods.base import Method, Signals
from pact.ops.reduction import Reduction

# Tiny models: one thread per test process is faster than two competing ones (and `make test` runs
# two processes on two cores).
torch.set_num_threads(1)

FAMILIES = testing.FAMILIES
ATTENTION = ("sdpa", "eager")


_MODELS: dict[str, tuple[Any, Any]] = {}


def tiny(family: str) -> tuple[Any, Any]:
    """(model, processor) of ``family``, eval mode, built once per process."""
    if family not in _MODELS:
        torch.manual_seed(0)
        model, processor = testing.tiny_pair(family, attn_implementation="sdpa")
        _MODELS[family] = (model.eval(), processor)
    return _MODELS[family]


def model_for(family: str, attn: str = "sdpa") -> tuple[Any, Any]:
    model, processor = tiny(family)
    if model.config.get_text_config()._attn_implementation != attn:
        model.set_attn_implementation(attn)
    return model, processor


@pytest.fixture(autouse=True)
def _clean_models():
    """No test sees pact applied by another test, nor a non-default attention backend."""
    yield
    import pact.api

    for model, _ in _MODELS.values():
        pact.api.remove(model)
        if model.config.get_text_config()._attn_implementation != "sdpa":
            model.config.get_text_config()._attn_implementation = "sdpa"
            model.set_attn_implementation("sdpa")


def one_image(
    family: str, seed: int = 0, size: tuple[int, int] = (96, 64), question: str | None = None
) -> dict:
    return {
        "question": question or "What is in the image?",
        "images": [testing.sample_image(seed, size=size)],
    }


def inputs_for(family: str, samples: list[dict], **kw: Any) -> Any:
    _, processor = tiny(family)
    return testing.build_inputs(family, processor, samples, **kw)


def greedy(model: Any, inputs: Any, n: int = 3, **kw: Any) -> torch.Tensor:
    """The n generated token ids (B, n)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    return out[:, inputs["input_ids"].shape[1] :]


def text_model_call(model: Any, x: Any) -> dict[str, Any]:
    """The keyword arguments the stock model passes its language model for ``x`` (inputs_embeds,
    positions, DeepStack features ...), tensors cloned as they arrive."""
    from pact.models import get_adapter

    got: list[dict[str, Any]] = []

    def keep(module: Any, args: tuple, kwargs: dict) -> None:
        got.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    handle = get_adapter(model).text_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        handle.remove()
    return got[0]


def stock_embeds(model: Any, x: Any) -> torch.Tensor:
    """(B, T, D) the inputs_embeds the stock model feeds its language model."""
    return text_model_call(model, x)["inputs_embeds"]


class PairMerge(Method):
    """Test method: visual tokens (2k, 2k+1) -> one token at 2k (mean hidden, size 2); with
    ``drop_every`` > 0, the partner of every ``drop_every``-th pair is pruned and dropped instead."""

    name = "pair_merge"

    def __init__(self, config: Any, drop_every: int = 0) -> None:
        super().__init__(config)
        self.drop_every = drop_every
        self.calls: list[Signals] = []

    def reduce(self, s: Signals) -> Reduction:
        self.calls.append(s)
        n = s.num_visual
        dev = s.hidden.device
        idx = torch.arange(n, device=dev)
        kept = idx[::2]
        labels = idx // 2
        if self.drop_every:
            partner_dropped = (labels % self.drop_every == 0) & (idx % 2 == 1)
            labels = torch.where(partner_dropped, -1, labels)
        vis = s.hidden[s.visual_mask].float()
        m = labels >= 0
        total = torch.zeros(kept.numel(), vis.shape[1], device=dev).index_add_(0, labels[m], vis[m])
        count = torch.zeros(kept.numel(), device=dev).index_add_(
            0, labels[m], torch.ones(int(m.sum()), device=dev)
        )
        sizes = torch.zeros(kept.numel(), device=dev).index_add_(0, labels[m], s.sizes[m].float())
        return Reduction(kept=kept, sizes=sizes, hidden=total / count[:, None], labels=labels)
