"""Which token is the query (spec §4), when a forward pass asks at all (spec §5), and the state of one call.

A forward pre-hook on the model (on the encoder of an encoder-decoder model) reads the inputs of every call and
leaves a :class:`ForwardQuery` in the model's :class:`CallState`, which the wrapped layers read. Positions are per
row:

* an explicit ``grace_query_positions=`` keyword of the forward call wins;
* with token labels (causal LM teacher forcing): the position before the first labelled token of the row;
* otherwise the last non-padding token of the row (attention mask; left or right padding), or the last token.

A forward that continues sequences whose prompt an earlier forward has seen never queries: its tokens are
generated ones. That is decided from what is certain, never from one release's keyword names:

* a KV cache object that already holds tokens, whichever argument carries it;
* inside one ``generate`` call (:meth:`CallState.generation`), every forward after the first continues the same
  sequences: one that re-runs the whole prompt (generation without a cache) queries the prompt's positions again,
  any other one is a decoding step.

What a prefill decided (positions, and which entry each row hit) is kept in a :class:`Prefill` for the forwards
that continue it: for the rest of the ``generate`` call, or, in a hand-written decoding loop, for as long as the
cache object that the prefill filled is alive.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

QUERY_POSITIONS_KWARG = "grace_query_positions"
IGNORE_INDEX = -100


@dataclass
class Prefill:
    """The forward that saw the prompts of a batch of sequences, and what GRACE decided there."""

    length: int  # prompt tokens per row
    positions: torch.Tensor  # (batch,) query position per row
    input_ids: torch.Tensor | None
    starts: torch.Tensor | None = None  # (batch,) first non-padding position per row (None: 0)
    hits: dict[tuple[Any, str], torch.Tensor] = field(default_factory=dict)  # (layer, adapter) -> (batch,) index/-1

    def is_rerun_of_prompt(self, input_ids: torch.Tensor | None, batch: int, length: int) -> bool:
        """Whether a later forward sees these prompts again from the start (generation without a cache)."""
        if batch != self.positions.shape[0] or length < self.length:
            return False
        if input_ids is None or self.input_ids is None:
            return True
        return torch.equal(input_ids[:, : self.length].to(self.input_ids.device), self.input_ids)


@dataclass(frozen=True)
class ForwardQuery:
    """What the wrapped layers need to know about the current forward pass."""

    positions: torch.Tensor | None  # (batch,) query position per row; None on a decoding step
    decoding: bool  # continues earlier sequences: only generated tokens are seen, nothing queries
    prefill: Prefill | None = None  # the prefill this forward is (or continues); None when unknown
    starts: torch.Tensor | None = None  # (batch,) first non-padding position per row; None: 0 (no padding)


def last_token_positions(length: int, attention_mask: torch.Tensor | None, batch: int,
                         device: torch.device) -> torch.Tensor:
    """Last non-padding position of each row (``length - 1`` for rows without a mask)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    # index of the last 1 in each row, whichever side the padding is on
    return (length - 1 - attention_mask.flip(-1).ne(0).to(torch.int8).argmax(-1)).to(device=device, dtype=torch.long)


def first_token_positions(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """First non-padding position of each row (None without a mask: every row starts at 0)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape != (batch, length):
        return None
    return attention_mask.ne(0).to(torch.int8).argmax(-1).to(torch.long)


def label_query_positions(labels: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Position before the first labelled token of each row; ``fallback`` for rows without labels."""
    labelled = labels.ne(IGNORE_INDEX)
    first = labelled.to(torch.int8).argmax(-1)
    positions = (first - 1).clamp_min(0).to(fallback.device)
    return torch.where(labelled.any(-1).to(fallback.device), positions, fallback)


class CallState:
    """Everything one forward or ``generate`` call of a GRACE model establishes, in one place.

    One instance is shared by all GRACE layers of a model. It holds the query of the current forward, the prefill
    of the current ``generate`` call (or of a hand-written decoding loop, by its cache object), and the editor's
    two scoped requests: record what the layers see (:meth:`recording_queries`) and force trained values
    (:meth:`forcing_values`). Each piece is reset by the scope that set it: the forward's post-hook, the end of
    ``generate``, the end of a ``with`` block.
    """

    def __init__(self, labels_mark_targets: bool = False) -> None:
        # Token labels say where the target starts only for causal LMs; classifier labels are class ids and T5's
        # are decoder tokens, which the encoder never sees.
        self.labels_mark_targets = labels_mark_targets
        self.current: ForwardQuery | None = None
        self._generating = False
        self._generation_prefill: Prefill | None = None
        self._prefill_of_cache: weakref.WeakKeyDictionary[Cache, Prefill] = weakref.WeakKeyDictionary()
        self._recorded: dict[tuple[Any, str], tuple[torch.Tensor, torch.Tensor]] | None = None
        self._forced: dict[tuple[Any, str], torch.Tensor] = {}
        self._hit_watchers: list[Callable[[Any, str, torch.Tensor], None]] = []
        self._positional_names: dict[type, list[str]] = {}
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []  # the model's query hooks, removed by unload
        self.key_modules: set[str] = set()  # modules whose input some adapter's key is made of (hooked)
        self.generate_wrapped = False
        self._key_inputs: dict[str, torch.Tensor] = {}  # their inputs in the current forward

    # ------------------------------------------------------------------------------------------ scopes
    @contextmanager
    def generation(self) -> Iterator[None]:
        """Mark one ``generate`` call: its first forward is the prefill, every later one continues it."""
        outer = (self._generating, self._generation_prefill)
        self._generating, self._generation_prefill = True, None
        try:
            yield
        finally:
            self._generating, self._generation_prefill = outer
            self.current = None

    @contextmanager
    def recording_queries(self) -> Iterator[dict[tuple[Any, str], tuple[torch.Tensor, torch.Tensor]]]:
        """Record, per ``(layer, adapter)``, the query rows and the layer's own output at them (float32, detached)
        for every querying forward inside the block."""
        outer, self._recorded = self._recorded, {}
        try:
            yield self._recorded
        finally:
            self._recorded = outer

    @contextmanager
    def forcing_values(self, values: dict[tuple[Any, str], torch.Tensor]) -> Iterator[None]:
        """Inside the block, ``(layer, adapter)`` replaces its output with ``values`` (``(batch, out)``) on every row
        instead of looking its codebook up (the editor trains values this way)."""
        outer, self._forced = self._forced, values
        try:
            yield
        finally:
            self._forced = outer

    @contextmanager
    def watching_hits(self, watcher: Callable[[Any, str, torch.Tensor], None]) -> Iterator[None]:
        """Inside the block, ``watcher(layer, adapter, hits)`` hears every codebook search of an inference forward
        (``hits``: the entry each row retrieved, or -1)."""
        self._hit_watchers.append(watcher)
        try:
            yield
        finally:
            self._hit_watchers.remove(watcher)

    # ------------------------------------------------------------------------------------------ for the layers
    def searched(self, layer: Any, adapter: str, hits: torch.Tensor) -> None:
        for watcher in self._hit_watchers:
            watcher(layer, adapter, hits)

    def record(self, layer: Any, adapter: str, queries: torch.Tensor, outputs: torch.Tensor) -> None:
        if self._recorded is not None:
            self._recorded[(layer, adapter)] = (queries.detach().float(), outputs.detach().float())

    def forced_values(self, layer: Any, adapter: str) -> torch.Tensor | None:
        return self._forced.get((layer, adapter))

    @property
    def recording(self) -> bool:
        return self._recorded is not None

    def key_input_hook(self, name: str):
        """A forward pre-hook for the key module ``name``: keeps its input for the layers of this forward."""
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if self.current is not None and not self.current.decoding and args:
                self._key_inputs[name] = args[0]
        return hook

    def key_input(self, name: str) -> torch.Tensor | None:
        """The input of key module ``name`` in the current forward (None when it has not run)."""
        return self._key_inputs.get(name)

    # ------------------------------------------------------------------------------------------ forward hooks
    def pre_forward_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        """``register_forward_pre_hook(..., with_kwargs=True)`` target: records the query of this call."""
        override = kwargs.pop(QUERY_POSITIONS_KWARG, None)
        self._key_inputs.clear()
        inputs = dict(zip(self._positional(module), args, strict=False))
        inputs.update(kwargs)
        input_ids = inputs.get("input_ids")
        reference = input_ids if input_ids is not None else inputs.get("inputs_embeds")
        if reference is None:
            self.current = None
            return args, kwargs
        batch, length = reference.shape[0], reference.shape[1]
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > length:
            mask = mask[:, -length:]  # the mask also covers cached tokens; this forward's are the last ones
        if not isinstance(mask, torch.Tensor):
            mask = None
        starts = first_token_positions(mask, batch, length)
        if override is not None:
            positions = torch.as_tensor(override, dtype=torch.long, device=reference.device).reshape(-1)
            if positions.numel() != batch or (positions < 0).any() or (positions >= length).any():
                raise ValueError(f"{QUERY_POSITIONS_KWARG} must hold one position in [0, {length}) per row of the "
                                 f"batch ({batch} rows); got {positions.tolist()}.")
            prefill = Prefill(length, positions, input_ids, starts)
            self.current = ForwardQuery(positions, decoding=False, prefill=prefill, starts=starts)
            return args, kwargs
        cache = _cache_in(inputs.values())
        cached = _holds_tokens(cache)
        if self._generating:  # the call's first forward is its prefill (even after a cache given to generate)
            earlier = self._generation_prefill
            if earlier is not None and not cached and earlier.is_rerun_of_prompt(input_ids, batch, length):
                # generation without a cache: the whole sequence again, queried where its prefill was
                self.current = ForwardQuery(earlier.positions, decoding=False, prefill=earlier, starts=earlier.starts)
                return args, kwargs
            decoding = earlier is not None
        else:
            earlier = self._prefill_of_cache.get(cache) if cached else None
            decoding = cached
        if decoding:
            self.current = ForwardQuery(None, decoding=True, prefill=earlier)
            return args, kwargs
        positions = last_token_positions(length, mask, batch, reference.device)
        labels = inputs.get("labels")
        if self.labels_mark_targets and isinstance(labels, torch.Tensor) and labels.shape[:2] == (batch, length):
            positions = label_query_positions(labels, positions)
        prefill = Prefill(length, positions, input_ids, starts)
        if self._generating:
            self._generation_prefill = prefill
        self.current = ForwardQuery(positions, decoding=False, prefill=prefill, starts=starts)
        return args, kwargs

    def post_forward_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        """``register_forward_hook(..., always_call=True)`` target: a prefill's decisions follow the cache object it
        filled (a hand-written decoding loop continues from it); the forward's query ends here."""
        current, self.current = self.current, None
        self._key_inputs.clear()
        if current is None or current.decoding or current.prefill is None or self._generating:
            return
        values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else ()
        cache = _cache_in(values)
        if cache is not None:
            self._prefill_of_cache[cache] = current.prefill

    def _positional(self, module: torch.nn.Module) -> list[str]:
        cls = type(module)
        if cls not in self._positional_names:
            params = inspect.signature(module.forward).parameters.values()
            self._positional_names[cls] = [
                p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        return self._positional_names[cls]


def _cache_in(values: Iterable[Any]) -> Cache | None:
    """The KV cache among a forward's arguments (or outputs), whatever name carries it."""
    return next((value for value in values if isinstance(value, Cache)), None)


def _holds_tokens(cache: Cache | None) -> bool:
    return cache is not None and int(cache.get_seq_length()) > 0
