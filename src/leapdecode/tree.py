"""Pure functions over draft trees: depths, ancestor masks, children and root-to-leaf paths.

A tree is given by `parents` [n]: parents[i] is node i's parent index, or -1 for a child of the root, with
parents[i] < i. Verification feeds the root followed by the n nodes, so "row 0" is the root and "row i + 1" is node i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _as_list(parents: Sequence[int] | torch.Tensor) -> list[int]:
    return parents.tolist() if isinstance(parents, torch.Tensor) else list(parents)


def depths(parents: Sequence[int] | torch.Tensor) -> list[int]:
    """Depth of each node: 1 for children of the root, parent's depth + 1 otherwise."""
    out: list[int] = []
    for parent in _as_list(parents):
        out.append(1 if parent < 0 else out[parent] + 1)
    return out


def ancestor_mask(parents: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """[n + 1, n + 1] bool: entry (r, c) is True when row c is row r itself or one of its ancestors.

    Row 0 is the root, an ancestor of every node. This is the attention pattern of tree verification: each node sees
    the committed prefix, the root and its own ancestors, never its siblings or cousins.
    """
    parents = _as_list(parents)
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[0, 0] = True
    for i, parent in enumerate(parents):
        mask[i + 1] = mask[parent + 1]  # inherit the parent's ancestors (parent row is parent + 1; root row is 0)
        mask[i + 1, i + 1] = True
    return mask


def children(parents: Sequence[int] | torch.Tensor) -> dict[int, list[int]]:
    """Node -> list of its children, in node order; key -1 is the root."""
    out: dict[int, list[int]] = {-1: []}
    for i, parent in enumerate(_as_list(parents)):
        out.setdefault(parent, []).append(i)
        out.setdefault(i, [])
    return out


def paths(parents: Sequence[int] | torch.Tensor) -> list[list[int]]:
    """Every root-to-leaf path as a list of node indices, leaves in node order."""
    parents = _as_list(parents)
    kids = children(parents)
    out = []
    for leaf in (i for i in range(len(parents)) if not kids[i]):
        path = [leaf]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        out.append(path[::-1])
    return out


def is_path(parents: Sequence[int] | torch.Tensor, path: Sequence[int]) -> bool:
    """True when `path` starts at a child of the root and each node is the parent of the next."""
    parents = _as_list(parents)
    previous = -1
    for node in path:
        if not 0 <= node < len(parents) or parents[node] != previous:
            return False
        previous = node
    return True
