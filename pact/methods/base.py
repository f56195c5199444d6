"""The method interface: what a reduction method sees and returns, and the registry.

A method turns model signals into a ``pact.ops.Reduction`` for ONE sample at ONE decoder layer.
It never touches masks, caches or rotary tables (the engine does) and never reads the model's
attributes directly (it asks its ``Signals``).

    @register("euti", "none")
    class EutiPruning(Method):
        def reduce(self, s: Signals) -> Reduction:
            scores = my_scores(s.hidden, s.queries(), s.keys(), s.visual_mask)
            return reduction_from_keep(keep_topk(scores, self.config.keep_ratio), s.num_visual)

Selection: ``build_method(cfg)`` looks ``(cfg.pruning, cfg.clustering)`` up in ``REGISTRY`` (a method
file registers its pairs at import; ``pact.methods.__init__`` imports every method file).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from pact.ops.reduction import Reduction


class Signals:
    """Everything a method may read about one sample at one reduction layer; computed lazily.

    Cheap attributes (always present, tensors on the model's device):
        layer: index of the decoder layer the reduced sequence enters.
        sample: index of the sample in the batch.
        hidden: (T, D) hidden states entering ``layer`` of the sample's valid (non-padding) tokens,
            in sequence order (the residual stream, before the layer's norm; model dtype).
        visual_mask: (T,) bool, True at the current visual tokens (the reduction candidates).
        sizes: (N,) float32, how many original tokens each current visual token stands for
            (all ones before any merge).
        positions: (A, T) long rotary position ids of the valid tokens (A = 3 M-RoPE (t, h, w)
            triples for Qwen2-VL/2.5-VL, else 1).
        visual_index: (N,) long, index of each current visual token among the sample's ORIGINAL
            visual tokens (identity at the first reduction).
        num_visual: N.
        config: the PactConfig.

    On demand (computed the first time they are asked for, then cached):
        queries(rope=False) -> (T, H, d), keys(rope=False) -> (T, H_kv, d): this layer's projections
            of ``hidden`` exactly as the layer computes them (its input norm, q/k projections with
            bias, and, with ``rope=True``, the model's RoPE at the tokens' current positions).
        cos_sin() -> ((T, d), (T, d)): the rotary tables of the valid tokens.
        layer_input(j) -> (T_j, D): hidden states that entered an earlier layer j (valid tokens of
            this sample, before any reduction at or after j); only for layers the method lists in
            ``Method.input_layers``.
        qk_at(j, rope) -> (q, k): layer j's queries/keys of ``layer_input(j)``.
        num_layers: how many decoder layers the model has.
        groups() -> list[Group]: the row-major grids (image, base crop, crop grid, frame, tile) of
            the sample's ORIGINAL visual tokens (``pact.models.groups.Group``; ``visual_index`` maps
            the current ones), derived by the model's adapter; raises ValueError when the family has
            no grid layout (or, for M-RoPE families, after visual tokens were removed).
        context: a dict the method's ``prepare`` hook filled for this call (e.g. captured
            vision-encoder attention).

    Not for methods (the engine's and the accessors' sources; kept for tools that build signals):
        model, adapter, inputs: the model, its ``pact.models`` adapter and the keyword arguments of
            the prefill call. A method asks the accessors above instead, so that family knowledge
            stays in ``pact.models``.
    """

    def __init__(
        self,
        *,
        layer: int,
        sample: int,
        hidden: torch.Tensor,
        visual_mask: torch.Tensor,
        sizes: torch.Tensor,
        positions: torch.Tensor,
        visual_index: torch.Tensor,
        config: Any,
        qk_fn: Callable[[int, torch.Tensor, bool, bool, bool], tuple],
        cos_sin_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        layer_input_fn: Callable[[int], torch.Tensor],
        model: Any = None,
        adapter: Any = None,
        inputs: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        num_layers: int | None = None,
        groups_fn: Callable[[], list[Any]] | None = None,
    ) -> None:
        self.layer = layer
        self.sample = sample
        self.hidden = hidden
        self.visual_mask = visual_mask
        self.sizes = sizes
        self.positions = positions
        self.visual_index = visual_index
        self.config = config
        self.model = model
        self.adapter = adapter
        self.inputs = inputs or {}
        self.context = context if context is not None else {}
        self._qk_fn = qk_fn
        self._cos_sin_fn = cos_sin_fn
        self._layer_input_fn = layer_input_fn
        self._num_layers = num_layers
        self._groups_fn = groups_fn
        self._cache: dict[Any, torch.Tensor | None] = {}

    @property
    def num_visual(self) -> int:
        return int(self.sizes.numel())

    @property
    def num_layers(self) -> int:
        """Number of decoder layers of the model (given, or read from the adapter)."""
        if self._num_layers is not None:
            return self._num_layers
        if self.adapter is None:
            raise ValueError("these Signals were built without num_layers or an adapter")
        return len(self.adapter.layers)

    def groups(self) -> list[Any]:
        """The grids (``pact.models.groups.Group``) of the sample's original visual tokens.

        Raises:
            ValueError: the layout cannot be derived (the message names the family).
        """
        if self._groups_fn is not None:
            return self._groups_fn()
        if self.adapter is None:
            raise ValueError("these Signals were built without groups_fn or an adapter: no visual grids")
        from pact.models.groups import sample_groups

        return sample_groups(
            self.adapter,
            sample=self.sample,
            inputs=self.inputs,
            positions=self.positions,
            visual_mask=self.visual_mask,
            visual_index=self.visual_index,
            cache=self.context,
        )

    def _qk(self, layer: int, rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, rope)
        if key not in self._cache:
            # One projection gives both the plain and the rotated pair (RoPE is elementwise and cheap
            # next to the projections), and methods often ask for both (e.g. PACT: plain q/k for
            # EUTI, rotated keys for clustering): cache both.
            hidden = self.hidden if layer == self.layer else self.layer_input(layer)
            q, k, qr, kr = self._qk_fn(layer, hidden, True, True, True)
            self._cache[(layer, False)] = (q, k)
            if qr is not None and kr is not None:
                self._cache[(layer, True)] = (qr, kr)
            elif rope:
                raise RuntimeError(f"no rotary tables for layer {layer}: cannot give rotated queries/keys")
        return self._cache[key]

    def queries(self, rope: bool = False) -> torch.Tensor:
        """(T, H, d) queries of this layer (pre-RoPE unless ``rope``)."""
        return self._qk(self.layer, rope)[0]

    def keys(self, rope: bool = False) -> torch.Tensor:
        """(T, H_kv, d) keys of this layer (pre-RoPE unless ``rope``); KV heads are not repeated."""
        return self._qk(self.layer, rope)[1]

    def qk_at(self, layer: int, rope: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys of an earlier ``layer`` for the hidden states that entered it."""
        return self._qk(layer, rope)

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cos_sin_fn()

    def layer_input(self, layer: int) -> torch.Tensor:
        return self._layer_input_fn(layer)


class Method(ABC):
    """Base class of reduction methods.

    Override ``reduce``; override ``layers`` for progressive methods (default: ``[cfg.layer]``, or
    every layer from ``cfg.layer`` on when ``cfg.progressive``). ``input_layers`` lists earlier
    layers whose input hidden states ``Signals.layer_input`` must provide. ``needs_merge`` says
    whether the method can return sizes > 1 (then proportional attention matters).
    """

    name: str = "method"
    needs_merge: bool = True

    def __init__(self, config: Any) -> None:
        self.config = config

    def layers(self, num_layers: int) -> list[int]:
        """Decoder layers before which ``reduce`` runs (sorted, each in [0, num_layers))."""
        first = int(self.config.layer)
        if first >= num_layers:
            raise ValueError(f"layer={first} but the model has only {num_layers} decoder layers")
        if getattr(self.config, "progressive", False):
            return list(range(first, num_layers))
        return [first]

    def input_layers(self, num_layers: int) -> list[int]:
        """Earlier layers whose inputs the method reads through ``Signals.layer_input``."""
        return []

    def install(self, model: Any, adapter: Any) -> list[Any]:
        """Called by ``pact.apply``: attach what the method needs for its whole life on ``model``
        (e.g. a forward hook on ``adapter.vision_tower()`` -- note that ``generate`` runs the vision
        encoder BEFORE the prefill call, so capture there rather than in ``prepare``). Return the
        hook handles; ``pact.remove`` removes them."""
        return []

    def prepare(self, model: Any, adapter: Any, inputs: dict[str, Any], context: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Called at the start of every prefill with visual tokens (``inputs``: the call's keyword
        arguments; in ``generate`` images arrive pre-encoded as ``mm_encoder_outputs``). Fill
        ``context`` with per-call data (it is visible as ``Signals.context``)."""

    def finish(self, context: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Called when the prefill's decoder pass is over (remove what ``prepare`` attached)."""

    @abstractmethod
    def reduce(self, signals: Signals) -> Reduction:
        """The reduction of one sample at one layer (every method implements it)."""


REGISTRY: dict[tuple[str, str], Callable[[Any], Method]] = {}
"""(pruning, clustering) -> method factory taking the PactConfig."""


def register(pruning: str, clustering: str) -> Callable[[Any], Any]:
    """Class decorator: make ``cls(config)`` the method for ``cfg.pruning == pruning`` and
    ``cfg.clustering == clustering``."""

    def deco(factory: Any) -> Any:
        key = (pruning, clustering)
        if key in REGISTRY and REGISTRY[key] is not factory:
            raise ValueError(f"method for pruning={pruning!r}, clustering={clustering!r} registered twice")
        REGISTRY[key] = factory
        return factory

    return deco


def build_method(config: Any) -> Method:
    """The method selected by ``config.pruning`` and ``config.clustering``.

    Raises:
        ValueError: no method implements that combination (names the keys and the supported pairs).
    """
    import pact.methods  # noqa: F401  (registers every method file)

    key = (config.pruning, config.clustering)
    factory = REGISTRY.get(key)
    if factory is None:
        pairs = ", ".join(f"{p}+{c}" for p, c in sorted(REGISTRY))
        raise ValueError(
            f"no reduction method for pruning={config.pruning!r} with clustering={config.clustering!r}; "
            f"supported (pruning+clustering): {pairs}"
        )
    return factory(config)
