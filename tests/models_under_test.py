"""The three reference models with small example inputs, shared by the structure/mask tests."""

import torch

from autoflip_task.models import CharLSTM, PaperCNN, SmallResNet


def cnn():
    return PaperCNN(1, 8, 10), torch.randn(4, 1, 8, 8)


def resnet():
    return SmallResNet(3, 10), torch.randn(4, 3, 16, 16)


def lstm():
    return CharLSTM(30, hidden=32), torch.randint(0, 30, (4, 12))


ALL = {"cnn": cnn, "resnet": resnet, "lstm": lstm}


def masked_layout(name: str = "cnn", sparsity: float = 0.6, structured: float = 0.25, zero_pruned: bool = True):
    """(structure, layout, compact state) of a reference model under a random hybrid mask (seed 0).

    With ``zero_pruned`` the state's pruned coordinates are zeroed before it is cut to the compact layout."""
    from autoflip_strategy.geometry import Layout
    from autoflip_strategy.masks import apply_mask, compute_hybrid_mask
    from autoflip_strategy.structure import discover_structure

    torch.manual_seed(0)
    model, x = ALL[name]()
    s = discover_structure(model, x)
    mask = compute_hybrid_mask({n: torch.rand(s.shapes[n]) for n in s.prunable}, s, sparsity, structured)
    layout = Layout.build(s, mask)
    state = {n: t.float() for n, t in model.state_dict().items() if n in s.shapes}
    if zero_pruned:
        apply_mask(state, layout.tensor_masks)
    return s, layout, layout.to_compact(state)
