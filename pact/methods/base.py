"""The method interface: what a reduction method sees and returns, and the registry.

A method turns model signals into a ``pact.ops.Reduction`` for ONE sample at ONE decoder layer.
It never touches masks, caches or rotary tables (the engine does) and never reads the model's
attributes directly (it asks its ``Signals``).

    @register("euti", "none")
    class EutiPruning(Method):
        def reduce(self, s: Signals) -> Reduction:
            scores = my_scores(s.hidden, s.queries(), s.keys(), s.visual_mask)
            return reduction_from_keep(keep_topk(scores, self.config.keep_ratio), s.num_visual)

Registry: every pruning and clustering NAME is declared once, with its kind and its one-line
description (``declare``); whole methods register the class that runs a (pruning, clustering) pair
(``register``). ``build_method(cfg)`` resolves the pair at call time: a registered pair wins; else a
score pruner (or "none") followed by a composable clusterer builds that clusterer's composer (e.g.
``PruneThenCluster``). ``pact.methods`` imports every module of the package (``pkgutil``), so a
method file needs no import list. The config's name lists (``pact.config.PRUNING_METHODS`` ...) and
``pact methods`` are derived from this registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pact.ops.attention import Visibility
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
        attention_scale(j=None) -> float | None: the softmax scale of layer j's attention logits
            (default: this layer), to pass as ``scale=`` to the scoring ops with that layer's q/k
            (``pact.models.base.ModelAdapter.attention_scale``); None means the ops' default
            1/sqrt(head_dim) (every family but Gemma 3 with query_pre_attn_scalar != head_dim).
        attention_visibility(j=None) -> ``pact.ops.attention.Visibility``: which keys each of the T
            tokens' query rows sees at layer j (default: this layer) under the layer's real mask:
            causal, OR the same image block, AND the layer's sliding window over the tokens' rotary
            positions (``positions[0]``). Pass it as ``visibility=`` to the attention-probability
            ops with that layer's q/k of these T tokens, so their rows are the model's own. Plain
            causal (``Visibility()``) on every family without ``ModelAdapter.layer_attention``
            (all but Gemma 3).
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
        scale_fn: Callable[[int], float | None] | None = None,
        attention_blocks: torch.Tensor | None = None,
        windows: Sequence[int | None] | None = None,
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
        self._scale_fn = scale_fn
        # the layer rules' inputs (the engine gives them; else derived from the adapter on demand)
        self._blocks = attention_blocks
        self._windows = None if windows is None else tuple(windows)
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

    def attention_scale(self, layer: int | None = None) -> float | None:
        """Softmax scale of decoder ``layer``'s attention logits (default: this layer), or None for
        the scoring ops' default 1/sqrt(head_dim). From ``scale_fn`` if given, else the adapter's
        ``attention_scale``; Signals built with neither (hand-made q/k, or a stand-in adapter without
        that method) use the default."""
        j = self.layer if layer is None else int(layer)
        if self._scale_fn is not None:
            return self._scale_fn(j)
        read = getattr(self.adapter, "attention_scale", None)
        return None if read is None else read(self.adapter.layers[j])

    def attention_visibility(self, layer: int | None = None) -> Visibility:
        """The mask rule of decoder ``layer`` (default: this layer) for this sample's T tokens (see the
        class docstring). From the engine's ``attention_blocks`` (T,) and per-layer ``windows``; Signals
        built without them read the adapter (``layer_attention``, ``attention_blocks`` of
        ``inputs``), which describes the unreduced prompt only.

        Raises:
            ValueError: the adapter has per-layer rules but the tokens are a reduced layout the
                Signals were given no blocks for.
        """
        j = self.layer if layer is None else int(layer)
        windows = self._windows
        read_rules = getattr(self.adapter, "layer_attention", None)
        if windows is None and read_rules is not None:
            rules = read_rules()
            windows = None if rules is None else tuple(r.window for r in rules)
            blocks = self._blocks if rules is None else self._adapter_blocks()
        else:
            blocks = self._blocks
        window = None if windows is None else windows[j]
        return Visibility(
            blocks=blocks,
            positions=None if window is None else self.positions[0],
            window=None if window is None else int(window),
        )

    def _adapter_blocks(self) -> torch.Tensor | None:
        """(T,) image blocks of the unreduced prompt's valid tokens, from the adapter (or given)."""
        if self._blocks is not None:
            return self._blocks
        ids = self.inputs.get("input_ids")
        blocks = None if ids is None else self.adapter.attention_blocks(ids, self.inputs)
        if blocks is None:
            return None
        mask = self.inputs.get("attention_mask")
        row = blocks[self.sample]
        row = row[mask[self.sample].bool().to(row.device)] if isinstance(mask, torch.Tensor) else row
        if row.numel() != self.hidden.shape[0]:
            raise ValueError(
                f"attention_visibility: the prompt has {row.numel()} tokens but these Signals hold "
                f"{self.hidden.shape[0]} (a reduced layout): build them with attention_blocks"
            )
        return row.to(self.hidden.device)

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cos_sin_fn()

    def layer_input(self, layer: int) -> torch.Tensor:
        return self._layer_input_fn(layer)


class Method(ABC):
    """Base class of reduction methods.

    Override ``reduce``; override ``layers`` for progressive methods (default: ``[cfg.layer]``, or
    every layer from ``cfg.layer`` on when ``cfg.progressive``). ``input_layers`` lists earlier
    layers whose input hidden states ``Signals.layer_input`` must provide. ``needs_merge`` says
    whether the method can return sizes > 1 (then proportional attention matters). ``families``:
    the model families it runs on (None: every family; otherwise ``pact.apply`` refuses the others
    with the reason, and the model tests run it on these only). ``inputs``: the visual input it
    reduces, "any" or "video" (the model tests then feed it videos).
    """

    name: str = "method"
    needs_merge: bool = True
    families: tuple[str, ...] | None = None
    inputs: str = "any"

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


PRUNING = "pruning"
CLUSTERING = "clustering"
KINDS = ("score pruner", "clusterer", "whole method")
"""What a declared name is: a "score pruner" gives one score per visual token (``score_fn``) and
composes with every clusterer (and allows ``pruning_selection="iqr"``); a "clusterer" composes after
any score pruner through its ``composer`` class; a "whole method" runs only in its registered pairs."""


@dataclass(frozen=True)
class MethodSpec:
    """The surface of one pruning or clustering name.

    axis: "pruning" or "clustering" (which config key selects it).
    name: the config value.
    kind: one of ``KINDS``.
    description: one line, printed by ``pact methods``.
    score_fn: score pruners: ``signals -> (N,) float scores`` (higher = keep).
    composer: clusterers: ``config -> Method`` running "score pruning (or none), then this clustering".
    cluster_fn: clusterers driven by ``PruneThenCluster``: ``(features (S, F), config, target count or
        None) -> (centers (C,), labels (S,))``.
    input_layers: score pruners reading earlier layers: ``config -> [layer, ...]`` (see
        ``Method.input_layers``).
    check: optional ``config -> None`` run when a composed method is built (raise early on a bad
        setting, e.g. an unimportable custom hook).
    """

    axis: str
    name: str
    kind: str
    description: str
    score_fn: Callable[[Signals], torch.Tensor] | None = None
    composer: Callable[[Any], Method] | None = None
    cluster_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    input_layers: Callable[[Any], list[int]] | None = None
    check: Callable[[Any], None] | None = None


SPECS: dict[tuple[str, str], MethodSpec] = {}
"""(axis, name) -> MethodSpec of every declared pruning and clustering name."""

REGISTERED: dict[tuple[str, str], Callable[[Any], Method]] = {}
"""(pruning, clustering) -> method factory taking the PactConfig, for explicitly registered pairs
(whole methods and the stand-alone form of score pruners). Composed pairs are resolved on demand
(``resolve``); ``REGISTRY`` shows both."""

PAIR_DESCRIPTIONS: dict[tuple[str, str], str] = {}
"""(pruning, clustering) -> description of a registered pair that is more than its two names."""


def declare(
    axis: str,
    name: str,
    kind: str,
    description: str,
    *,
    score_fn: Callable[[Signals], torch.Tensor] | None = None,
    composer: Callable[[Any], Method] | None = None,
    cluster_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    input_layers: Callable[[Any], list[int]] | None = None,
    check: Callable[[Any], None] | None = None,
) -> MethodSpec:
    """Declare a pruning or clustering name (call it once, in the method's own file).

    Raises:
        ValueError: a bad axis or kind, a score pruner without ``score_fn``, a clusterer without
            ``composer``, or the name declared twice with a different surface.
    """
    if axis not in (PRUNING, CLUSTERING):
        raise ValueError(f"declare: axis={axis!r}; allowed: {PRUNING!r}, {CLUSTERING!r}")
    if kind not in KINDS:
        raise ValueError(
            f"declare({axis!r}, {name!r}): kind={kind!r}; allowed: {', '.join(map(repr, KINDS))}"
        )
    if kind == "score pruner" and (axis != PRUNING or score_fn is None):
        raise ValueError(f"declare({axis!r}, {name!r}): a score pruner is a pruning with a score_fn")
    if kind == "clusterer" and (axis != CLUSTERING or composer is None):
        raise ValueError(f"declare({axis!r}, {name!r}): a clusterer is a clustering with a composer")
    if name == "none":
        raise ValueError(f"declare({axis!r}, 'none'): 'none' is built in (no pruning / no clustering)")
    spec = MethodSpec(axis, name, kind, description, score_fn, composer, cluster_fn, input_layers, check)
    known = SPECS.get((axis, name))
    if known is not None and known != spec:
        raise ValueError(f"{axis} {name!r} declared twice with different surfaces: {known} and {spec}")
    SPECS[(axis, name)] = spec
    return spec


def spec(axis: str, name: str) -> MethodSpec:
    """The declared surface of ``name`` on ``axis`` (KeyError names what is declared)."""
    try:
        return SPECS[(axis, name)]
    except KeyError:
        known = ", ".join(sorted(n for a, n in SPECS if a == axis))
        raise KeyError(f"no {axis} method {name!r} is declared; declared: {known}") from None


def names(axis: str, kind: str | None = None) -> tuple[str, ...]:
    """Declared names on ``axis`` ("none" first, then in declaration order), optionally only of one
    ``kind`` (then without "none")."""
    found = [n for (a, n), s in SPECS.items() if a == axis and (kind is None or s.kind == kind)]
    return tuple(found) if kind is not None else ("none", *found)


def register(pruning: str, clustering: str, description: str | None = None) -> Callable[[Any], Any]:
    """Class decorator: make ``cls(config)`` the method for ``cfg.pruning == pruning`` and
    ``cfg.clustering == clustering`` (``description``: for a pair that is more than its two names)."""

    def deco(factory: Any) -> Any:
        key = (pruning, clustering)
        if key in REGISTERED and REGISTERED[key] is not factory:
            raise ValueError(f"method for pruning={pruning!r}, clustering={clustering!r} registered twice")
        REGISTERED[key] = factory
        if description is not None:
            PAIR_DESCRIPTIONS[key] = description
        return factory

    return deco


def resolve(pruning: str, clustering: str) -> Callable[[Any], Method] | None:
    """The factory for a (pruning, clustering) pair, or None: a registered pair, else (score pruner
    or "none") + a clusterer -> the clusterer's composer. Reads the registry as it is now."""
    factory = REGISTERED.get((pruning, clustering))
    if factory is not None:
        return factory
    clusterer = SPECS.get((CLUSTERING, clustering))
    if clusterer is None or clusterer.kind != "clusterer":
        return None
    if pruning != "none" and getattr(SPECS.get((PRUNING, pruning)), "kind", None) != "score pruner":
        return None
    return clusterer.composer


def pairs() -> dict[tuple[str, str], Callable[[Any], Method]]:
    """Every runnable (pruning, clustering) pair -> its factory: the registered ones and every
    composed one, sorted."""
    out = dict(REGISTERED)
    for pruning in ("none", *names(PRUNING, "score pruner")):
        for clustering in names(CLUSTERING, "clusterer"):
            factory = resolve(pruning, clustering)
            if factory is not None:
                out.setdefault((pruning, clustering), factory)
    return dict(sorted(out.items()))


class _PairView(Mapping):
    """Read-only view: (pruning, clustering) -> factory of every runnable pair (``pairs()``), always
    reflecting the registry as it is now (a pruner declared later composes too)."""

    def __getitem__(self, key: tuple[str, str]) -> Callable[[Any], Method]:
        factory = resolve(*key) if isinstance(key, tuple) and len(key) == 2 else None
        if factory is None:
            raise KeyError(key)
        return factory

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(pairs())

    def __len__(self) -> int:
        return len(pairs())


REGISTRY: Mapping[tuple[str, str], Callable[[Any], Method]] = _PairView()
"""Every runnable (pruning, clustering) pair -> method factory taking the PactConfig."""


def build_method(config: Any) -> Method:
    """The method selected by ``config.pruning`` and ``config.clustering``.

    Raises:
        ValueError: no method implements that combination (names the keys and the supported pairs).
    """
    import pact.methods  # noqa: F401  (imports every method module, which declares and registers)

    factory = resolve(config.pruning, config.clustering)
    if factory is None:
        supported = ", ".join(f"{p}+{c}" for p, c in pairs())
        raise ValueError(
            f"no reduction method for pruning={config.pruning!r} with clustering={config.clustering!r}; "
            f"supported (pruning+clustering): {supported}"
        )
    return factory(config)
