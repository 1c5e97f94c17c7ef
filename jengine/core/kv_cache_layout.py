"""How the KV cache's page space is split between layer groups (full attention, each sliding window).

A layer group is a set of layers with the same attention span: full attention, or one sliding window.
Each group has its own host page pool (a `KVCacheManager`) and its own block table per sequence; on the
device every layer of a group owns `num_pages` pages of the one cache array, the groups laid out one after
another (`KVCacheLayout.layer_offsets`). A sliding-window group's need is bounded (the window plus the
tokens of one step per running sequence), so it is sized to that bound and the rest of the memory budget
goes to the full-attention layers (see docs/architecture.md, "Sliding-window memory").

Models without sliding windows, or with the window-aware manager turned off
(`disable_hybrid_kv_cache_manager`), get one group: every layer owns the same page ids, as before.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def layer_sliding_windows(model_config: Any) -> tuple[Optional[int], ...]:
    """Each layer's sliding window (None: full attention), as the model families pass it to attention:
    Gemma by `layer_types`, the Llama family (Mistral, Mixtral, Phi-3) one `sliding_window` for all."""
    n = model_config.num_layers
    window = getattr(model_config, "sliding_window", None)
    if not window:
        return (None,) * n
    kinds = getattr(model_config, "layer_types", None)
    if kinds:
        return tuple(window if kind == "sliding_attention" else None for kind in kinds)
    return (window,) * n


@dataclasses.dataclass(frozen=True)
class KVCacheGroup:
    """Layers sharing one attention span, and the pages each of them owns (page 0 of each is the null page)."""

    sliding_window: Optional[int]  # None: full attention (or a window the manager does not track)
    layers: tuple[int, ...]
    num_pages: int


@dataclasses.dataclass(frozen=True)
class KVCacheLayout:
    """The groups of a model's layers; group 0 is the full-attention one when there is one."""

    page_size: int
    groups: tuple[KVCacheGroup, ...]

    @property
    def num_layers(self) -> int:
        return sum(len(g.layers) for g in self.groups)

    @property
    def total_pages(self) -> int:
        return sum(len(g.layers) * g.num_pages for g in self.groups)

    @property
    def group_windows(self) -> tuple[Optional[int], ...]:
        return tuple(g.sliding_window for g in self.groups)

    def layer_offsets(self) -> tuple[int, ...]:
        """First page of each layer in the device cache: the groups one after another."""
        offsets = [0] * self.num_layers
        base = 0
        for g in self.groups:
            for j, layer in enumerate(g.layers):
                offsets[layer] = base + j * g.num_pages
            base += len(g.layers) * g.num_pages
        return tuple(offsets)


def group_layers(windows: Sequence[Optional[int]], max_model_len: int, enabled: bool = True) -> list[tuple[Optional[int], tuple[int, ...]]]:
    """(window, layers) per group: full attention first, then each distinct window, smallest first.

    A window that covers max_model_len frees nothing, so its layers count as full attention. With
    `enabled` False (or no windows at all) every layer is in one untracked group, as before groups existed.
    """
    eff = [w if w is not None and w < max_model_len else None for w in windows]
    if not enabled or all(w is None for w in eff):
        return [(None, tuple(range(len(windows))))]
    keys = sorted(set(eff), key=lambda w: -1 if w is None else w)
    return [(w, tuple(i for i, x in enumerate(eff) if x == w)) for w in keys]


def sliding_pages_needed(window: int, page_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Pages (with the null page) a sliding-window group's layer can ever need at once.

    Between steps a sequence holds the pages of its last `window - 1` positions: at most
    cdiv(window - 1, page_size) + 1. A step adds cdiv(n, page_size) pages to a row of n tokens, and the
    rows' n add up to at most max_num_batched_tokens, so all rows add at most that / page_size + one
    page per row.
    """
    per_seq = cdiv(window - 1, page_size) + 2
    return max_num_seqs * per_seq + cdiv(max_num_batched_tokens, page_size) + 1


def size_groups(
    groups: Sequence[tuple[Optional[int], tuple[int, ...]]], uniform_pages: int, *, page_size: int,
    max_num_seqs: int, max_num_batched_tokens: int, max_pages_per_seq: int,
) -> list[int]:
    """Pages per layer of each group, from `uniform_pages`: what every layer would get with one group
    (already checked to hold one sequence of max_model_len, and capped at what could ever be used).

    Sliding-window groups take their bound (`sliding_pages_needed`, never more than uniform); the memory
    they leave goes to the full-attention layers, up to what those could ever use.
    """
    if len(groups) == 1:
        return [uniform_pages]
    useful_cap = max_num_seqs * max_pages_per_seq + 1
    budget = uniform_pages * sum(len(layers) for _, layers in groups)  # in pages of one layer
    sliding = {
        window: min(sliding_pages_needed(window, page_size, max_num_seqs, max_num_batched_tokens), uniform_pages)
        for window, _ in groups if window is not None
    }
    budget -= sum(len(layers) * sliding[w] for w, layers in groups if w is not None)
    full_layers = sum(len(layers) for w, layers in groups if w is None)
    full = min(budget // full_layers, useful_cap) if full_layers else 0
    return [full if w is None else sliding[w] for w, _ in groups]


def build_layout(
    model_config: Any, uniform_pages: int, *, page_size: int, max_model_len: int, max_num_seqs: int,
    max_num_batched_tokens: int, enabled: bool = True,
) -> KVCacheLayout:
    """The layout of a model's KV cache (see the module docstring)."""
    groups = group_layers(layer_sliding_windows(model_config), max_model_len, enabled)
    sizes = size_groups(
        groups, uniform_pages, page_size=page_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, max_pages_per_seq=cdiv(max_model_len, page_size),
    )
    return KVCacheLayout(page_size, tuple(KVCacheGroup(w, layers, n) for (w, layers), n in zip(groups, sizes)))
