"""The hooks that apply a reduction method to a stock Hugging Face vision-language model.

Nothing is patched or replaced: ``Engine.install`` registers per-instance forward (pre-)hooks and
``Engine.remove`` takes them off again, after which the model is the stock model bit for bit.

    VLM  (pre-hook)       every call: prefill (empty/absent cache) or cached step; at prefill reset
                          the call state and find the visual patch tokens from input_ids
    text model (pre)      capture the rotary position ids (A, B, T) of the prefill (renumber: of
                          each cached step too)
    layer i (pre)         i == a reduction layer: ask the method, per sample, for a Reduction, then
                          build the reduced, left-padded batch; i >= L: feed the layer the reduced
                          hidden states, gathered cos/sin, key bias (sdpa) or 4-D mask; cached steps:
                          the mask over the layer's own cache length (key bias of the reduced
                          prefix, 0 for later tokens)
    text model (post)     prefill: scatter the last hidden state back to the input length

Why the parts look as they do:
- Kept tokens keep their original rotary positions by gathering the cos/sin rows the model already
  computed (1-D RoPE and Qwen's M-RoPE alike); a merged token sits at its center's slot and position.
  A Reduction may reorder the kept visual tokens within their slots (``order``) and insert new
  tokens after them (``extra``); each sample's new order is one ``_SamplePlan``.
- position_mode="renumber" on 1-D RoPE: layers >= L get contiguous positions over each sample's
  reduced sequence (cos/sin recomputed with the model's rotary module) and, in cached steps, the
  stock position ids minus the tokens removed up to that layer, so decoding continues from the
  reduced length there while layers < L (whole prompt in their cache) keep the stock ones. On
  M-RoPE it keeps the (t, h, w) ids, as the Qwen ports of vision-side methods do (= center).
- Layers >= L see the key bias (padding -inf + log(size) per key when proportional attention is
  on). On sdpa (default) it travels as the keyword ``pact_key_bias`` to the attention function
  registered as ``pact.attention_backend.PACT_SDPA`` (the text config is switched to it at install,
  back at remove), which folds it into one extra q/k column and keeps SDPA's ``is_causal`` kernels;
  an explicit 4-D float mask would cost the causal fast path (~3x per layer on CPU). Eager, and
  sdpa after ``Engine.set_fast_sdpa(False)`` (or for a cached step), get an explicit mask
  (causal + bias) from ``pact.ops.attention.build_attention_mask``. FlashAttention gets a 2-D
  padding mask (no bias possible).
- Otherwise cached steps keep the unreduced timeline: generate's position ids (and the stock ones,
  which read layer 0's cache length) continue from the unreduced prompt length. When layer 0 itself is
  reduced the engine supplies the position ids the stock model would have computed, and the mask
  of every layer, so nothing depends on layer 0's cache length.
- The logits keep the input's sequence length: after the last layer the engine scatters hidden
  states back. A removed position takes the hidden state of its representative: the merged token of
  its cluster, or, for a pruned-and-dropped token, the nearest kept token before it (the first kept
  token if none). Those rows are placeholders: their logits are not predictions of the model.
- Per-call state lives in one ``CallState`` replaced at every prefill, so nothing leaks from one
  prompt to the next.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pact import attention_backend
from pact.methods.base import Method, Signals
from pact.models.base import ModelAdapter
from pact.ops.attention import build_attention_mask
from pact.ops.reduction import Reduction

SUPPORTED_ATTENTION = ("eager", "sdpa")


# ---------------------------------------------------------------------------------------------------
# Records and statistics


@dataclass
class ReductionRecord:
    """What one reduction step did to one sample, in ORIGINAL visual-token indices (CPU tensors).

    Attributes:
        layer: decoder layer the step ran before.
        kept: LongTensor[R], original visual indices of the visual tokens still in the sequence
            after this step (a merged token is listed under its center's index).
        labels: LongTensor[N0], for every original visual token the index into ``kept`` of the
            token representing it after this step, -1 if it was pruned and dropped.
        sizes: FloatTensor[R], how many original visual tokens each kept token stands for.
        scores: FloatTensor[N0] importance scores of this step (NaN for tokens already gone), or None.
        order: LongTensor[R], the order in which the kept tokens were placed in the sequence
            (``kept[order[0]]`` first), or None for sequence order (``Reduction.order``).
        extra: number of new tokens the step added after the kept visual tokens (``Reduction.extra``);
            they represent no original token, so ``labels`` never point to them.
    """

    layer: int
    kept: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor
    scores: torch.Tensor | None = None
    order: torch.Tensor | None = None
    extra: int = 0


@dataclass
class ReductionStats:
    """Reduction of the last prefill (one ``forward``/``generate`` call with a fresh cache).

    Attributes:
        visual_before: per sample, visual patch tokens entering the first reduction layer.
        visual_after: per sample, visual tokens left after the last reduction step, new tokens
            added by a step (``Reduction.extra``, e.g. PruMerge's merged token) included.
        layers: decoder layers where a reduction step ran (empty: no reduction happened).
        seconds_reducing: wall time spent deciding and applying the reduction (all steps).
        records: per step, per sample ``ReductionRecord`` (None for a sample without visual tokens).
    """

    visual_before: list[int] = field(default_factory=list)
    visual_after: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    seconds_reducing: float = 0.0
    records: list[list[ReductionRecord | None]] = field(default_factory=list)

    @property
    def layer(self) -> int | None:
        """The first reduction layer (None when nothing was reduced)."""
        return self.layers[0] if self.layers else None

    @property
    def reduction_ratio(self) -> float:
        """1 - sum(after) / sum(before), token-weighted over the batch (0.0 without visual tokens)."""
        before = sum(self.visual_before)
        return 0.0 if before == 0 else 1.0 - sum(self.visual_after) / before


class _Timer:
    """Accumulates seconds without forcing a device sync: CUDA events when the tensors are on a
    GPU (read when the stats are asked for), ``perf_counter`` otherwise."""

    def __init__(self) -> None:
        self.cpu_seconds = 0.0
        self.events: list[tuple[Any, Any]] = []
        self._start: Any = None

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._start = ev
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if isinstance(self._start, float):
            self.cpu_seconds += time.perf_counter() - self._start
        elif self._start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._start, end))
        self._start = None

    def seconds(self) -> float:
        total = self.cpu_seconds
        for start, end in self.events:
            end.synchronize()
            total += start.elapsed_time(end) / 1000.0
        return total


# ---------------------------------------------------------------------------------------------------
# Per-call state


@dataclass
class Layout:
    """The current (possibly reduced, left-padded) token layout of the batch, R slots per sample.

    slot_orig: (B, R) long, original sequence index of the token in each slot, -1 for padding.
    visual: (B, R) bool, current visual tokens (reduction candidates).
    visual_index: (B, R) long, original visual-token index (per sample) of visual slots, else -1.
    sizes: (B, R) float32, original tokens each slot stands for (1 for padding).
    cos, sin: (B, R, head_dim) rotary tables of each slot.
    positions: (A, B, R) long rotary position ids (A = 3 for M-RoPE, else 1).
    key_bias: (B, R) float32, 0 / log(size) / -inf (padding), added to every query's logit on a key.
    orig_to_slot: (B, T) long, slot holding the representative of each original position.
    """

    slot_orig: torch.Tensor
    visual: torch.Tensor
    visual_index: torch.Tensor
    sizes: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    key_bias: torch.Tensor
    orig_to_slot: torch.Tensor
    mask: torch.Tensor | None = None  # what layers >= L receive as attention_mask (None: fast path)


@dataclass
class CallState:
    """Everything about the current prefill and its cached continuation (replaced every prefill)."""

    active: bool = False  # a reduction runs in this prefill / applies to its cached steps
    fast: bool = False  # layers >= L get the key bias as ``pact_key_bias`` (causal SDPA), no mask
    prefill: bool = True  # the current forward call is the prefill
    batch: int = 0
    length: int = 0  # T, the prefill's input length
    seen: int = 0  # tokens of the unreduced timeline processed so far (prefill + cached steps)
    valid: torch.Tensor | None = None  # (B, T) bool, attention_mask of the prefill
    candidates: torch.Tensor | None = None  # (B, T) bool visual patch tokens
    mask2d: torch.Tensor | None = None  # 2-D attention mask of the current call (all seen tokens)
    positions: torch.Tensor | None = None  # (A, B, T) rotary position ids of the prefill
    call_start: int = 0  # cached step: tokens of the unreduced timeline seen before this call
    # position_mode="renumber" (1-D RoPE), cached step: the step's stock position ids (1, B, q) and,
    # per reduction step k, the cos/sin of the renumbered ones fed to layers between reduction k and
    # k+1 (layers < L keep the stock ones: their cache holds the unreduced prompt)
    decode_positions: torch.Tensor | None = None
    decode_rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    first_position: torch.Tensor | None = None  # (B,) stock position of each sample's first token
    inputs: dict[str, Any] = field(default_factory=dict)
    layout: Layout | None = None
    layer_bias: dict[int, torch.Tensor] = field(default_factory=dict)  # key bias of each layer's prefix
    layer_valid: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, R_i) non-padding prefix keys
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    original_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    context: dict[str, Any] = field(default_factory=dict)
    records: list[list[ReductionRecord | None]] = field(default_factory=list)
    raw_records: list[list[tuple | None]] = field(default_factory=list)
    layers_done: list[int] = field(default_factory=list)
    visual_before: list[int] = field(default_factory=list)
    timer: _Timer = field(default_factory=_Timer)


# ---------------------------------------------------------------------------------------------------
# Engine


class Engine:
    """Installs and runs the reduction hooks of one model instance."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, config: Any, method: Method | None) -> None:
        self.model = model
        self.adapter = adapter
        self.config = config
        self.method = method
        num_layers = len(adapter.layers)
        self.reduce_layers: list[int] = sorted(set(method.layers(num_layers))) if method else []
        self.first_layer = self.reduce_layers[0] if self.reduce_layers else None
        self.input_layers: set[int] = set(method.input_layers(num_layers)) if method else set()
        impl = adapter.attn_implementation
        self.flash = impl.startswith("flash_attention")
        self.proportional = bool(getattr(config, "proportional_attention", True)) and not self.flash
        # sdpa: carry the key bias in an extra q/k column instead of a 4-D mask (keeps is_causal).
        fast_ok = impl in ("sdpa", attention_backend.PACT_SDPA)
        self.fast_sdpa = fast_ok and bool(getattr(config, "sdpa_fast_path", True))
        # position_mode="renumber" changes positions on 1-D RoPE only: on M-RoPE (Qwen2-VL/2.5-VL) the
        # official Qwen ports of vision-side methods keep each kept token's (t, h, w) ids, which is
        # what "center" does (DESIGN.md section 3, docs/CONFIGDOC.md).
        self.renumber = getattr(config, "position_mode", "center") == "renumber" and not adapter.mrope
        self._switched: list[Any] = []  # configs switched to PACT_SDPA by install
        self.handles: list[Any] = []
        self.state = CallState()
        self._last_stats = ReductionStats()

    # --- install / remove ---------------------------------------------------------------------

    def install(self) -> None:
        a = self.adapter
        try:
            self.handles.append(a.vlm.register_forward_pre_hook(self._vlm_pre, with_kwargs=True))
            self.handles.append(a.text_model.register_forward_pre_hook(self._text_pre, with_kwargs=True))
            self.handles.append(a.text_model.register_forward_hook(self._text_post, with_kwargs=True))
            for i, layer in enumerate(a.layers):
                self.handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            if self.method is not None:
                self.handles.extend(self.method.install(self.model, a))
                if self.fast_sdpa:
                    self._switched = attention_backend.switch_to_fast(a)
        except BaseException:
            # e.g. the method refuses this model family: leave the model exactly as it was
            self.remove()
            raise

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        attention_backend.switch_back(self._switched)
        self._switched = []
        self.state = CallState()

    def set_fast_sdpa(self, enabled: bool) -> None:
        """Switch the sdpa fast path (key bias in an extra q/k column, causal kernels) on or off;
        off: layers >= L get the explicit 4-D float mask, as on eager. No-op on other backends."""
        if enabled and not self._switched and self.handles and self.method is not None:
            impl = self.adapter.attn_implementation
            if impl in ("sdpa", attention_backend.PACT_SDPA):
                self.fast_sdpa = True
                self._switched = attention_backend.switch_to_fast(self.adapter)
        elif not enabled:
            self.fast_sdpa = False
            attention_backend.switch_back(self._switched)
            self._switched = []

    # --- stats --------------------------------------------------------------------------------

    def stats(self) -> ReductionStats:
        st = self.state
        if st.raw_records is not None and len(st.records) != len(st.raw_records):
            st.records = [[self._to_record(r) for r in step] for step in st.raw_records]
        after = list(st.visual_before)
        extra = [0] * len(after)
        for step in st.records:  # the last step that saw a sample's visual tokens decides
            for b, rec in enumerate(step):
                if rec is not None:
                    after[b] = len(rec.kept)
                    extra[b] += rec.extra  # new tokens are no candidates of later steps: they stay
        after = [a + e for a, e in zip(after, extra, strict=True)]
        return ReductionStats(
            visual_before=list(st.visual_before),
            visual_after=after,
            layers=list(st.layers_done),
            seconds_reducing=st.timer.seconds(),
            records=st.records,
        )

    @staticmethod
    def _to_record(raw: tuple | None) -> ReductionRecord | None:
        if raw is None:
            return None
        layer, kept, labels, sizes, scores, order, extra = raw
        return ReductionRecord(
            layer=layer,
            kept=kept.detach().cpu(),
            labels=labels.detach().cpu(),
            sizes=sizes.detach().float().cpu(),
            scores=None if scores is None else scores.detach().float().cpu(),
            order=None if order is None else order.detach().cpu(),
            extra=extra,
        )

    # --- hooks --------------------------------------------------------------------------------

    def _vlm_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None else 0
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and not (isinstance(mask2d, torch.Tensor) and mask2d.ndim == 2):
            mask2d = None if not self.state.active else mask2d
            if mask2d is not None:
                raise ValueError("pact needs a 2-D attention_mask (B, T) (got a prepared 4-D mask or a dict)")
        if past == 0:
            self._start_prefill(input_ids, mask2d, cache, kwargs)
            return args, kwargs
        st = self.state
        st.prefill = False
        q = int(input_ids.shape[1]) if input_ids is not None else int(kwargs["inputs_embeds"].shape[1])
        start = st.seen
        st.call_start = start
        st.decode_positions = None
        st.decode_rope = {}
        st.seen += q
        st.mask2d = mask2d
        if st.active and self.first_layer == 0 and kwargs.get("position_ids") is None:
            # Layer 0's cache is reduced, so the stock position ids (arange + layer-0 cache length)
            # would restart early; give the ones of the unreduced timeline.
            device = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).device
            b = int((input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[0])
            kwargs["position_ids"] = self.adapter.decode_position_ids(start, q, b, device)
        return args, kwargs

    def _start_prefill(self, input_ids: torch.Tensor | None, mask2d: Any, cache: Any, kwargs: dict) -> None:
        if self.method is not None and self.state.context:
            self.method.finish(self.state.context)
        st = CallState()
        self.state = st
        if input_ids is None:
            embeds = kwargs.get("inputs_embeds")
            st.batch, st.length = (
                (int(embeds.shape[0]), int(embeds.shape[1])) if embeds is not None else (0, 0)
            )
            st.seen = st.length
            st.visual_before = [0] * st.batch
            return
        B, T = input_ids.shape
        st.batch, st.length, st.seen = int(B), int(T), int(T)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask2d is None else mask2d.bool()
        st.valid, st.mask2d = valid, mask2d
        if self.method is None or not getattr(self.config, "reduction", True):
            st.visual_before = [0] * st.batch
            return
        cand = self.adapter.candidate_mask(input_ids, kwargs) & valid
        counts = cand.sum(1).tolist()
        st.visual_before = [int(c) for c in counts]
        if sum(counts) == 0:
            return  # text only: stock behaviour
        if cache is not None and not _is_dynamic_cache(cache):
            raise ValueError(
                "pact needs a DynamicCache (per-layer lengths differ after reduction); "
                f"got {type(cache).__name__}"
            )
        st.active = True
        # Checked per call: another model sharing this config may have switched it back.
        st.fast = self.fast_sdpa and self.adapter.attn_implementation == attention_backend.PACT_SDPA
        st.candidates = cand
        st.inputs = {k: v for k, v in kwargs.items() if k not in ("input_ids", "past_key_values")}
        st.inputs["input_ids"] = input_ids
        self.method.prepare(self.model, self.adapter, st.inputs, st.context)

    def _text_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        st = self.state
        if not st.active:
            return args, kwargs
        if st.prefill:
            embeds = kwargs.get("inputs_embeds")
            pos = self.adapter.normalize_positions(kwargs.get("position_ids"), st.batch)
            if pos is None:  # the stock default of a prefill: 0..T-1
                pos = torch.arange(st.length, device=embeds.device)[None, None].expand(
                    3 if self.adapter.mrope else 1, st.batch, st.length
                )
            st.positions = pos
        else:
            if self.first_layer == 0:
                # Every layer's mask is ours: skip the stock mask, which would read layer 0's cache
                # length. A 4-D mask (or flash's 2-D one, sized to the reduced cache) is used as given;
                # the layer hooks then set each layer's own attention inputs.
                kwargs["attention_mask"] = self._decode_inputs(
                    0, kwargs.get("past_key_values"), kwargs["inputs_embeds"], allow_fast=False
                )[0]
            if self.renumber and st.layout is not None:
                # generate's (B, q) position ids, or the stock default on the unreduced timeline
                embeds = kwargs["inputs_embeds"]
                pos = self.adapter.normalize_positions(kwargs.get("position_ids"), st.batch)
                if pos is None:
                    q = int(embeds.shape[1])
                    pos = self.adapter.decode_position_ids(st.call_start, q, st.batch, embeds.device)[None]
                st.decode_positions = pos.to(embeds.device)
        return args, kwargs

    def _renumbered_decode_rope(self, i: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, q, head_dim) of a cached step's tokens in layer i >= L under renumber: the
        step's stock position ids (unreduced timeline) minus, per sample, the tokens the reductions
        up to layer i removed (net of new tokens), so decoding continues right after the prompt as
        layer i saw it renumbered. Computed once per reduction step and shared by its layers."""
        st = self.state
        step = bisect.bisect_right(self.reduce_layers, i)
        if step not in st.decode_rope:
            removed = st.valid.sum(1) - st.layer_valid[i].sum(1)  # (B,)
            pos = st.decode_positions - removed.to(hidden.device).view(1, -1, 1)
            st.decode_rope[step] = self.adapter.rotary(hidden, pos)
        return st.decode_rope[step]

    def _text_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        st = self.state
        if not (st.active and st.prefill and st.layout is not None):
            return output
        if self.method is not None:
            self.method.finish(st.context)
        hidden = output.last_hidden_state  # (B, R, D)
        idx = st.layout.orig_to_slot[..., None].expand(-1, -1, hidden.shape[-1])
        output.last_hidden_state = hidden.gather(1, idx)
        return output

    def _layer_hook(self, i: int) -> Any:
        def hook(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            st = self.state
            if not st.active or self.first_layer is None:
                return args, kwargs
            if st.prefill:
                hidden = args[0] if args else kwargs["hidden_states"]
                if i in self.input_layers and st.layout is None:
                    st.layer_inputs[i] = hidden
                if i < self.first_layer:
                    return args, kwargs
                if i in self.reduce_layers:
                    hidden = self._reduce(i, layer, hidden, kwargs)
                    if args:
                        args = (hidden, *args[1:])
                    else:
                        kwargs["hidden_states"] = hidden
                lay = st.layout
                kwargs["position_embeddings"] = (lay.cos, lay.sin)
                kwargs["attention_mask"] = lay.mask
                if st.fast:
                    kwargs["pact_key_bias"] = self._bias(lay.key_bias, lay.slot_orig >= 0)
                kwargs["position_ids"] = None
                st.layer_bias[i] = lay.key_bias
                st.layer_valid[i] = lay.slot_orig >= 0
                return args, kwargs
            if i >= self.first_layer:
                hidden = args[0] if args else kwargs["hidden_states"]
                mask, bias = self._decode_inputs(i, kwargs.get("past_key_values"), hidden)
                kwargs["attention_mask"] = mask
                if bias is not None:
                    kwargs["pact_key_bias"] = bias
                if st.decode_positions is not None:
                    kwargs["position_embeddings"] = self._renumbered_decode_rope(i, hidden)
                if self.flash:
                    kwargs["position_ids"] = None
            return args, kwargs

        return hook

    # --- masks --------------------------------------------------------------------------------

    def _bias(self, key_bias: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """(B, K) float32 bias added to every logit on a key: log(size) (proportional attention) or
        0, -inf for padding keys."""
        bias = key_bias if self.proportional else torch.where(key_valid, 0.0, float("-inf"))
        return bias.float()

    def _mask(self, key_bias: torch.Tensor, key_valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> Any:
        """The attention_mask of a layer >= L: 4-D float (eager/sdpa) or 2-D bool padding (flash)."""
        if self.flash:
            return None if bool(key_valid.all()) else key_valid
        return build_attention_mask(self._bias(key_bias, key_valid), q_len, dtype)

    def _decode_inputs(
        self, i: int, cache: Any, hidden: torch.Tensor, allow_fast: bool = True
    ) -> tuple[Any, torch.Tensor | None]:
        """(attention_mask, pact_key_bias) of layer i for a cached step: the layer's reduced prefix,
        then every later token. Fast path (as many queries as keys): (None, bias); otherwise
        (mask, None)."""
        st = self.state
        q = int(hidden.shape[1])
        past = int(cache.get_seq_length(i)) if cache is not None else 0
        prefix_bias, prefix_valid = st.layer_bias[i], st.layer_valid[i]
        n_new = past + q - prefix_bias.shape[1]
        if n_new < q:
            raise RuntimeError(f"layer {i}: cache holds {past} keys, fewer than the reduced prefix")
        if st.mask2d is not None and st.mask2d.shape[1] >= n_new:
            new_valid = st.mask2d[:, -n_new:].to(prefix_valid.device).bool()
        else:
            new_valid = torch.ones(st.batch, n_new, dtype=torch.bool, device=prefix_valid.device)
        bias = torch.cat([prefix_bias, torch.where(new_valid, 0.0, float("-inf"))], dim=1)
        valid = torch.cat([prefix_valid, new_valid], dim=1)
        # A decode step (q == 1) keeps the explicit (B, 1, 1, K) mask: without a causal part it costs
        # SDPA nothing, while the extra-column trick would copy the layer's whole K/V cache every
        # step. SDPA's is_causal aligns top-left, so 1 < q < K needs the mask too; only q == K
        # (queries and keys of one chunk) takes the fast path.
        if allow_fast and st.fast and q == bias.shape[1]:
            return None, self._bias(bias, valid)
        return self._mask(bias, valid, q, hidden.dtype), None

    # --- the reduction step -------------------------------------------------------------------

    def _initial_layout(self, hidden: torch.Tensor, kwargs: dict) -> Layout:
        st = self.state
        B, T = st.batch, st.length
        dev = hidden.device
        cos, sin = kwargs["position_embeddings"]
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
        arange = torch.arange(T, device=dev)
        valid = st.valid.to(dev)
        cand = st.candidates.to(dev)
        vis_index = torch.where(cand, cand.long().cumsum(1) - 1, -1)
        bias = torch.where(valid, 0.0, float("-inf")).float()
        # position_mode="renumber": the stock position of each sample's first valid token
        first_valid = valid.long().argmax(1)
        st.first_position = st.positions[0].to(dev).gather(1, first_valid[:, None])[:, 0]
        return Layout(
            slot_orig=torch.where(valid, arange[None], -1),
            visual=cand,
            visual_index=vis_index,
            sizes=torch.ones(B, T, dtype=torch.float32, device=dev),
            cos=cos,
            sin=sin,
            positions=st.positions.to(dev),
            key_bias=bias,
            orig_to_slot=arange[None].expand(B, T).clone(),
        )

    def _reduce(self, i: int, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Run the method on every sample at layer i; install the new layout; return new hidden."""
        st = self.state
        if st.layout is None:
            st.layout = self._initial_layout(hidden, kwargs)
            st.original_rope = (st.layout.cos, st.layout.sin)
        lay = st.layout
        st.timer.start(hidden.device)
        valid_rows = lay.slot_orig >= 0
        if not bool(torch.isfinite(hidden[valid_rows]).all()):
            raise ValueError(
                f"non-finite (NaN/inf) hidden states enter decoder layer {i}; pact cannot reduce them "
                "(check the model's dtype and inputs)"
            )
        B, R, _ = hidden.shape
        plans: list[_SamplePlan] = []
        step_raw: list[tuple | None] = []
        for b in range(B):
            slots = torch.nonzero(valid_rows[b], as_tuple=False).flatten()  # (n,)
            vis = lay.visual[b, slots]
            vis_pos = torch.nonzero(vis, as_tuple=False).flatten()  # indices into slots
            n_vis = int(vis_pos.numel())
            keep_flag = ~vis
            sizes_b = lay.sizes[b, slots].clone()
            rep = torch.arange(slots.numel(), device=hidden.device)
            red = None
            kept_pos = vis_pos[:0]
            if n_vis == 0:
                keep_flag = torch.ones_like(vis)
                step_raw.append(None)
            else:
                red = self._call_method(i, layer, b, hidden, slots, vis, vis_pos)
                kept_pos = vis_pos[red.kept]  # indices into slots
                keep_flag = keep_flag.clone()
                keep_flag[kept_pos] = True
                sizes_b[kept_pos] = red.sizes.to(sizes_b)
                labels = red.labels.to(hidden.device)
                if kept_pos.numel():
                    rep_vis = torch.where(labels >= 0, kept_pos[labels.clamp(min=0)], -1)
                else:  # every visual token removed
                    rep_vis = torch.full_like(labels, -1)
                rep[vis_pos] = rep_vis
                orig_vis = lay.visual_index[b, slots[vis_pos]]
                step_raw.append(self._raw_record(i, b, red, orig_vis, st.visual_before[b]))
                if self.config.position_mode == "mean" and red.kept.numel():
                    self._mean_positions(b, slots, vis_pos, kept_pos, labels)
            if not bool(keep_flag.any()):
                raise ValueError(
                    f"the reduction at layer {i} removed every token of sample {b}; a prompt needs at least "
                    "one non-visual token (or keep some visual tokens)"
                )
            plans.append(_arrange_sample(slots, keep_flag, rep, sizes_b, vis_pos, kept_pos, red))
        R_new = max(int(p.source.numel()) for p in plans)
        index = torch.zeros(B, R_new, dtype=torch.long, device=hidden.device)
        slot_ok = torch.zeros(B, R_new, dtype=torch.bool, device=hidden.device)
        is_new = torch.zeros(B, R_new, dtype=torch.bool, device=hidden.device)
        sizes = torch.ones(B, R_new, dtype=torch.float32, device=hidden.device)
        old_to_new = torch.zeros(B, R, dtype=torch.long, device=hidden.device)
        replace = []
        for b, plan in enumerate(plans):
            off = R_new - int(plan.source.numel())
            index[b, off:] = plan.source
            slot_ok[b, off:] = True
            is_new[b, off:] = plan.is_new
            sizes[b, off:] = plan.sizes
            old_to_new[b, plan.slots] = plan.target + off
            for where, rows in plan.rows:
                replace.append((b, where + off, rows.to(hidden.dtype)))
        new_hidden = _take(hidden, index) * slot_ok[..., None].to(hidden.dtype)
        for b, where, rows in replace:
            new_hidden[b, where] = rows
        lay = self._gather_layout(lay, index, slot_ok, is_new, sizes, old_to_new, new_hidden)
        st.layout = lay
        st.layers_done.append(i)
        st.raw_records.append(step_raw)
        st.timer.stop()
        return new_hidden

    def _call_method(
        self,
        i: int,
        layer: nn.Module,
        b: int,
        hidden: torch.Tensor,
        slots: torch.Tensor,
        vis: torch.Tensor,
        vis_pos: torch.Tensor,
    ) -> Reduction:
        st = self.state
        lay = st.layout
        h_b = hidden[b, slots]
        cos_b, sin_b = lay.cos[b, slots], lay.sin[b, slots]
        orig_valid = torch.nonzero(st.valid[b], as_tuple=False).flatten().to(hidden.device)

        def qk_fn(j: int, h: torch.Tensor, rope: bool, want_q: bool, want_k: bool) -> tuple:
            if j == i:
                c, s = cos_b, sin_b
            else:
                c, s = st.original_rope[0][b, orig_valid], st.original_rope[1][b, orig_valid]
            return self.adapter.queries_keys(
                self.adapter.layers[j], h, c if rope else None, s if rope else None, want_q, want_k
            )

        def layer_input(j: int) -> torch.Tensor:
            if j not in st.layer_inputs:
                raise ValueError(
                    f"{type(self.method).__name__} reads the input of layer {j} but does not list it in "
                    "input_layers()"
                )
            return st.layer_inputs[j][b, orig_valid]

        signals = Signals(
            layer=i,
            sample=b,
            hidden=h_b,
            visual_mask=vis,
            sizes=lay.sizes[b, slots[vis_pos]],
            positions=lay.positions[:, b, slots],
            visual_index=lay.visual_index[b, slots[vis_pos]],
            config=self.config,
            qk_fn=qk_fn,
            cos_sin_fn=lambda: (cos_b, sin_b),
            layer_input_fn=layer_input,
            model=self.model,
            adapter=self.adapter,
            inputs=st.inputs,
            context=st.context,
        )
        red = self.method.reduce(signals)
        red.validate(int(vis_pos.numel()), int(hidden.shape[-1]))
        return red

    def _raw_record(self, i: int, b: int, red: Reduction, orig_vis: torch.Tensor, n0: int) -> tuple:
        """Step record in original visual indices (kept on device; moved to CPU by ``stats``).

        ``orig_vis`` (N,): original visual index of each current visual token, in sequence order."""
        st = self.state
        dev = orig_vis.device
        labels_cur = red.labels.to(dev)
        prev = st.raw_records[-1][b] if st.raw_records else None
        if prev is None:
            full = torch.full((n0,), -1, dtype=torch.long, device=dev)
            full[orig_vis] = labels_cur
        else:
            # The current visual tokens are the previous step's kept ones (possibly reordered):
            # original token -> its previous representative (original index) -> current index.
            prev_kept, prev_labels = prev[1], prev[2]
            current_of = torch.full((n0,), -1, dtype=torch.long, device=dev)
            current_of[orig_vis] = torch.arange(orig_vis.numel(), device=dev)
            rep_orig = prev_kept[prev_labels.clamp(min=0)]
            full = torch.where(prev_labels >= 0, labels_cur[current_of[rep_orig]], -1)
        scores = None
        if red.scores is not None:
            scores = torch.full((n0,), float("nan"), device=dev)
            scores[orig_vis] = red.scores.to(dev).float()
        return (i, orig_vis[red.kept], full, red.sizes, scores, red.order, red.num_extra)

    def _mean_positions(
        self, b: int, slots: torch.Tensor, vis_pos: torch.Tensor, kept_pos: torch.Tensor, labels: torch.Tensor
    ) -> None:
        """position_mode="mean": a merged token takes the rounded mean position (per axis) of its members."""
        lay = self.state.layout
        members = labels >= 0
        pos = lay.positions[:, b, slots[vis_pos]].float()  # (A, N)
        A = pos.shape[0]
        R = kept_pos.numel()
        total = torch.zeros(A, R, device=pos.device).index_add_(1, labels[members], pos[:, members])
        count = torch.zeros(R, device=pos.device).index_add_(
            0, labels[members], torch.ones_like(pos[0, members])
        )
        mean = torch.round(total / count.clamp(min=1)).long()
        # Write into the current layout; the gather that follows carries it to the new layout.
        lay.positions = lay.positions.clone()
        lay.positions[:, b, slots[kept_pos]] = mean
        lay.cos, lay.sin = lay.cos.clone(), lay.sin.clone()
        cos, sin = self.adapter.rotary(lay.cos[b : b + 1, :R].float(), mean[:, None, :])
        lay.cos[b, slots[kept_pos]] = cos[0].to(lay.cos.dtype)
        lay.sin[b, slots[kept_pos]] = sin[0].to(lay.sin.dtype)

    def _gather_layout(
        self,
        lay: Layout,
        index: torch.Tensor,
        slot_ok: torch.Tensor,
        is_new: torch.Tensor,
        sizes: torch.Tensor,
        old_to_new: torch.Tensor,
        new_hidden: torch.Tensor,
    ) -> Layout:
        """The layout after a step: slot r of sample b holds old slot ``index[b, r]`` (a new token:
        the slot of the kept token before it, whose position it takes unless renumbered)."""
        R_new = index.shape[1]
        slot_orig = torch.where(slot_ok, lay.slot_orig.gather(1, index), -1)
        visual = lay.visual.gather(1, index) & slot_ok & ~is_new
        key_bias = torch.where(slot_ok, sizes.log(), float("-inf")).float()
        positions = lay.positions.gather(2, index[None].expand(lay.positions.shape[0], -1, -1))
        cos, sin = _take(lay.cos, index), _take(lay.sin, index)
        if self.renumber:
            # Contiguous positions over each sample's reduced sequence, from the position the stock
            # model gave the sample's first token (0 unless left padding offsets it), as the stock
            # model numbers a prompt that is that short.
            first = self.state.first_position.to(index.device)
            counted = first[:, None] + slot_ok.long().cumsum(1) - 1
            positions = torch.where(slot_ok, counted, 0)[None]
            cos, sin = self.adapter.rotary(new_hidden, positions)
        new = Layout(
            slot_orig=slot_orig,
            visual=visual,
            visual_index=torch.where(visual, lay.visual_index.gather(1, index), -1),
            sizes=sizes,
            cos=cos,
            sin=sin,
            positions=positions,
            key_bias=key_bias,
            orig_to_slot=old_to_new.gather(1, lay.orig_to_slot),
        )
        if not self.state.fast:
            new.mask = self._mask(key_bias, slot_ok, R_new, lay.cos.dtype if not self.flash else torch.bool)
        return new


@dataclass
class _SamplePlan:
    """Where one sample's tokens go in a reduction step.

    slots: (n,) long, the sample's valid slots in the old layout.
    source: (n_new,) long, old slot each new position is read from (a new token: the slot of the
        token right before it, normally the last kept visual token).
    is_new: (n_new,) bool, positions of new tokens (``Reduction.extra``).
    sizes: (n_new,) float32, size of each new position (1 for new tokens).
    target: (n,) long, new position representing each old token (a dropped token: the new position
        of the nearest kept token before it, the first one if none).
    rows: (new positions, hidden rows) to write over the gathered hidden states.
    """

    slots: torch.Tensor
    source: torch.Tensor
    is_new: torch.Tensor
    sizes: torch.Tensor
    target: torch.Tensor
    rows: list[tuple[torch.Tensor, torch.Tensor]]


def _arrange_sample(
    slots: torch.Tensor,
    keep_flag: torch.Tensor,
    rep: torch.Tensor,
    sizes: torch.Tensor,
    vis_pos: torch.Tensor,
    kept_pos: torch.Tensor,
    red: Reduction | None,
) -> _SamplePlan:
    """The new order of one sample: kept tokens in sequence order, the kept visual ones permuted by
    ``red.order`` within the slots they occupy, ``red.extra`` tokens inserted right after the last
    kept visual token (where the last visual token was when none is kept).

    Args (n = valid old slots; every index below points into them): keep_flag (n,) bool, tokens that
    stay; rep (n,) representative of each token (-1: dropped); sizes (n,) sizes after the step;
    vis_pos (N,) current visual tokens; kept_pos (R,) kept visual tokens (increasing); red: the
    step's Reduction (None: the sample has no visual token).
    """
    dev = keep_flag.device
    n = int(keep_flag.numel())
    keep = torch.nonzero(keep_flag, as_tuple=False).flatten()  # increasing
    source = keep.clone()
    at_kept = torch.searchsorted(keep, kept_pos)  # where the kept visual tokens sit in `keep`
    if red is not None and red.order is not None and kept_pos.numel():
        source[at_kept] = kept_pos[red.order.to(dev)]
    is_new = torch.zeros(source.numel(), dtype=torch.bool, device=dev)
    n_extra = 0 if red is None else red.num_extra
    if n_extra:
        # after the last kept visual token; none kept: where the last visual token was
        last = at_kept[-1] + 1 if kept_pos.numel() else torch.searchsorted(keep, vis_pos[-1])
        at = int(last)
        anchor = source[max(at - 1, 0) : max(at, 1)]  # the token before the new ones (their position)
        source = torch.cat([source[:at], anchor.expand(n_extra), source[at:]])
        is_new = torch.cat([is_new[:at], torch.ones(n_extra, dtype=torch.bool, device=dev), is_new[at:]])
    positions = torch.arange(source.numel(), device=dev)
    new_of = torch.full((n,), -1, dtype=torch.long, device=dev)
    new_of[source[~is_new]] = positions[~is_new]
    before = (torch.searchsorted(keep, torch.arange(n, device=dev), right=True) - 1).clamp(min=0)
    target = torch.where(rep >= 0, new_of[rep.clamp(min=0)], new_of[keep[before]])
    new_sizes = torch.where(is_new, 1.0, sizes[source])
    rows = []
    if red is not None and red.hidden is not None and kept_pos.numel():
        rows.append((new_of[kept_pos], red.hidden))
    if n_extra:
        rows.append((positions[is_new], red.extra))
    return _SamplePlan(
        slots=slots, source=slots[source], is_new=is_new, sizes=new_sizes, target=target, rows=rows
    )


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, R, ...) gathered along dim 1 with index (B, R')."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def _is_dynamic_cache(cache: Any) -> bool:
    from transformers.cache_utils import DynamicCache

    return isinstance(cache, DynamicCache)


def check_attention_backend(adapter: ModelAdapter, config: Any, method: Method | None) -> None:
    """Raise ValueError at apply time when the model's attention backend cannot run ``config``."""
    if method is None or not getattr(config, "reduction", True):
        return
    impl = adapter.attn_implementation
    if impl == attention_backend.PACT_SDPA:  # pact is applied already (apply replaces it)
        impl = "sdpa"
    if impl.startswith("flash_attention"):
        if getattr(config, "proportional_attention", True) and method.needs_merge:
            raise ValueError(
                f"the model uses attn_implementation={impl!r}, which cannot add the proportional-attention "
                "bias log(size) to attention logits; set proportional_attention=false in the pact config "
                "(reference name: no_proportional_attention=true) or load the model with "
                "attn_implementation='sdpa' (or 'eager')"
            )
        return
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"pact supports attn_implementation 'sdpa', 'eager' and flash_attention_* (without proportional "
            f"attention); the model uses {impl!r}: call model.set_attn_implementation('sdpa')"
        )


__all__ = ["Engine", "Layout", "ReductionRecord", "ReductionStats", "check_attention_backend"]
