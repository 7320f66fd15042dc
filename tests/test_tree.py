"""Tree compilation on literal trees."""

import torch

from leapdecode.drafters.base import Draft
from leapdecode.tree import ancestor_mask, children, depths, is_path, paths

# The tree used below (node: token):       root
#                                          /    \
#                                        0       1
#                                       / \       \
#                                      2   3       4
#                                      |
#                                      5
PARENTS = [-1, -1, 0, 0, 1, 2]


def test_depths_count_edges_from_the_root():
    # nodes 0 and 1 hang off the root (depth 1), 2, 3, 4 off depth-1 nodes, 5 off node 2
    assert depths(PARENTS) == [1, 1, 2, 2, 2, 3]
    assert depths([]) == []


def test_ancestor_mask_sees_only_root_self_and_ancestors():
    mask = ancestor_mask(PARENTS)
    assert mask.shape == (7, 7)
    # row r = node r - 1; row 0 = root. Node 5's ancestors are 2 and 0, plus the root: rows 0, 1 (node 0), 3 (node 2)
    assert mask[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    # node 4 (row 5) sees the root, node 1 (row 2) and itself: never its cousin 2 or 3
    assert mask[5].nonzero().flatten().tolist() == [0, 2, 5]
    # the root sees only itself
    assert mask[0].nonzero().flatten().tolist() == [0]
    # every row sees the root
    assert bool(mask[:, 0].all())


def test_chain_mask_is_causal():
    # a chain's ancestor mask is exactly the lower-triangular causal mask
    mask = ancestor_mask(list(range(-1, 4)))
    assert torch.equal(mask, torch.tril(torch.ones(6, 6, dtype=torch.bool)))


def test_children_and_paths():
    assert children(PARENTS) == {-1: [0, 1], 0: [2, 3], 1: [4], 2: [5], 3: [], 4: [], 5: []}
    # leaves are 3, 4, 5; their root-to-leaf paths listed in leaf order
    assert paths(PARENTS) == [[0, 3], [1, 4], [0, 2, 5]]
    assert is_path(PARENTS, [0, 2, 5]) and is_path(PARENTS, []) and not is_path(PARENTS, [2, 5])


def test_draft_validation():
    assert Draft.chain([5, 6, 7]).is_chain
    assert not Draft.tree([1, 2, 3], [-1, -1, 0]).is_chain
    assert Draft.empty().n == 0
    for bad_parents in ([0, -1], [-1, 1], [-2, 0]):  # a node must come after its parent and -1 is the root
        try:
            Draft.tree([1, 2], bad_parents)
        except ValueError:
            continue
        raise AssertionError(f"parents {bad_parents} should be rejected")
