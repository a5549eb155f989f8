import torch

from autoflip_strategy.geometry import Layout, kept_entries, remove_units, scatter, select, tensor_masks
from autoflip_strategy.masks import compute_hybrid_mask
from autoflip_strategy.structure import discover_structure
from models_under_test import ALL, cnn


def test_kept_entries_select_and_scatter_round_trip():
    model, x = cnn()
    s = discover_structure(model, x)
    keep = torch.ones(64, dtype=torch.bool)
    keep[[0, 5]] = False
    kept = kept_entries(s, {"conv2": keep})
    assert set(kept) == {"conv2.weight", "conv2.bias", "fc1.weight"}
    assert kept["fc1.weight"][0] is None and len(kept["fc1.weight"][1]) == 62 * 4
    w = model.fc1.weight.detach()
    compact = select(w, kept["fc1.weight"])
    assert compact.shape == (512, 248)
    back = scatter(compact, kept["fc1.weight"], tuple(w.shape))
    assert torch.equal(back[:, 0:4], torch.zeros(512, 4))  # unit 0
    assert torch.equal(back[:, 20:24], torch.zeros(512, 4))  # unit 5
    assert torch.equal(back[:, 4:20], w[:, 4:20])


def test_kept_entries_and_remove_units_agree_on_every_model():
    """The two views of unit removal (what survives, what is cleared) come from one loop and must agree."""
    for name, build in ALL.items():
        model, x = build()
        s = discover_structure(model, x)
        scores = {n: torch.rand(s.shapes[n], generator=torch.Generator().manual_seed(1)) for n in s.prunable}
        mask = compute_hybrid_mask(scores, s, 0.5, 0.3)
        kept = kept_entries(s, mask.units)
        cleared = {n: torch.ones(shape, dtype=torch.bool) for n, shape in s.shapes.items()}
        remove_units(cleared, s, mask.units)
        for tensor, ones in cleared.items():
            if tensor in kept:
                assert bool(select(ones, kept[tensor]).all()), (name, tensor)  # kept entries are not cleared
                assert int(ones.sum()) == select(ones, kept[tensor]).numel(), (name, tensor)  # nothing else is
            else:
                assert bool(ones.all()), (name, tensor)
        layout = Layout.build(s, mask)
        assert layout.kept.keys() == kept.keys()
        assert all(tuple(layout.tensor_masks[n].shape) == s.shapes[n] for n in layout.tensor_masks)
        assert tensor_masks(mask, s).keys() == layout.tensor_masks.keys()
