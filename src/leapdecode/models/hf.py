"""A target runner over any Hugging Face causal LM.

Verification feeds the root and the draft nodes in one forward pass with explicit position ids (the committed length
plus each node's depth) and a 4D additive attention mask (committed prefix visible, tree part = ancestor mask).
Models with sliding-window layers (Gemma 3) get one mask per layer type. The KV cache is a plain DynamicCache whose
layers all keep the full sequence; `commit` gathers the root and the accepted path into consecutive slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from leapdecode.drafters.base import Draft
from leapdecode.tree import ancestor_mask, depths


def read_model_facts(runner, hf_model, who: str):
    """Set what a runner over a transformers model needs to know about it: sliding_window (None unless it has
    sliding-window layers), max_positions, device, dtype and vocab_size. Other attention kinds are refused.
    Returns the model's text config."""
    config = hf_model.config.get_text_config(decoder=True) if hasattr(hf_model.config, "get_text_config") \
        else hf_model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    unknown = layer_types - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"{who} supports full and sliding-window attention layers, not {sorted(unknown)}")
    runner.sliding_window = getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None
    runner.max_positions = int(getattr(config, "max_position_embeddings", 1 << 30))
    runner.device = next(hf_model.parameters()).device
    runner.dtype = next(hf_model.parameters()).dtype
    runner.vocab_size = int(hf_model.get_output_embeddings().weight.shape[0])
    return config


class HFRunner:
    supports_trees = True
    supports_aux = True  # can score an auxiliary branch (Draft.aux_*) in the verification pass

    def __init__(self, hf_model) -> None:
        self.model = hf_model
        read_model_facts(self, hf_model, "HFRunner")
        self.reset()

    @property
    def cache_len(self) -> int:
        return self._cache_len

    def reset(self) -> None:
        self.cache = DynamicCache()  # no config: every layer keeps the full sequence, sliding windows live in the mask
        self._cache_len = 0  # committed tokens in the cache (the root is not among them)
        self._verified = 0  # tokens appended by the last verify, not yet committed

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int]) -> None:
        if self._verified:
            raise RuntimeError("prefill after verify without commit")
        if not tokens:
            return
        ids = torch.tensor([list(tokens)], device=self.device)  # [1, L]
        positions = torch.arange(self._cache_len, self._cache_len + ids.shape[1], device=self.device)[None]
        self._forward(ids, positions, attention_mask=None)  # causal mask built by the model
        self._cache_len += ids.shape[1]

    @torch.inference_mode()
    def verify(self, root: int, draft: Draft) -> torch.Tensor:
        if self._verified:
            raise RuntimeError("verify twice without commit")
        n = draft.n
        ids = torch.cat([torch.tensor([root]), draft.tokens.cpu()])  # [n + 1]
        offsets = torch.tensor([0] + depths(draft.parents))  # [n + 1] root at offset 0, nodes at their depth
        tree = ancestor_mask(draft.parents)  # [n + 1, n + 1]
        if draft.m:  # auxiliary branch: appended after the nodes, invisible to them
            ids = torch.cat([ids, draft.aux_tokens.cpu()])
            offsets = torch.cat([offsets, draft.aux_positions.cpu()])
            tree = torch.cat([torch.cat([tree, torch.zeros(n + 1, draft.m, dtype=torch.bool)], 1),
                              draft.aux_mask.cpu()], 0)  # [n + 1 + m, n + 1 + m]
        rows = ids.numel()
        if self._cache_len + int(offsets.max()) + 1 > self.max_positions:
            raise ValueError(f"sequence would reach {self._cache_len + int(offsets.max()) + 1} tokens, beyond the "
                             f"model's {self.max_positions} positions")
        ids = ids.to(self.device)[None]  # [1, rows]
        node_pos = offsets + self._cache_len  # [rows] absolute positions
        mask = torch.cat([torch.ones(rows, self._cache_len, dtype=torch.bool), tree], dim=1)  # [rows, cache + rows]
        attention_mask = self._additive(mask)
        if self.sliding_window is not None:
            key_pos = torch.cat([torch.arange(self._cache_len), node_pos])  # [cache_len + rows]
            local = mask & (node_pos[:, None] - key_pos[None, :] < self.sliding_window)
            attention_mask = {"full_attention": attention_mask, "sliding_attention": self._additive(local)}
        logits = self._forward(ids, node_pos.to(self.device)[None], attention_mask)
        self._verified = rows
        return logits[0]  # [n + 1 + m, vocab]

    @torch.inference_mode()
    def commit(self, path: Sequence[int]) -> None:
        """Keep the root and the accepted nodes' KV (in path order) right after the committed prefix."""
        if not self._verified:
            raise RuntimeError("commit without verify")
        start = self._cache_len
        keep_len = start + 1 + len(path)
        if list(path) != list(range(len(path))):  # not a prefix of the node order: gather into place
            index = torch.tensor([start] + [start + 1 + i for i in path], device=self.device)
            for layer in self.cache.layers:
                layer.keys[:, :, start:keep_len] = layer.keys.index_select(2, index)
                layer.values[:, :, start:keep_len] = layer.values.index_select(2, index)
        for layer in self.cache.layers:  # drop everything past the accepted path
            layer.keys = layer.keys[:, :, :keep_len]
            layer.values = layer.values[:, :, :keep_len]
        self._cache_len = keep_len
        self._verified = 0

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        """bool [q, k] -> additive float mask [1, 1, q, k] in the model dtype (0 = attend, min = blocked)."""
        blocked = torch.finfo(self.dtype).min
        return torch.zeros(mask.shape, dtype=self.dtype).masked_fill(~mask, blocked)[None, None].to(self.device)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attention_mask) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=attention_mask,
                         past_key_values=self.cache, use_cache=True)
        return out.logits
