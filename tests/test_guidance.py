import pytest
import torch

from autoflip_strategy import guidance as G


def test_local_guidance_is_squared_deviation():
    theta0 = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([9.0])}
    trained = {"w": torch.tensor([1.5, 0.0, 3.0]), "b": torch.tensor([0.0])}
    d = G.local_guidance(theta0, trained, ["w"])
    assert set(d) == {"w"}
    assert torch.equal(d["w"], torch.tensor([0.25, 4.0, 0.0]))


def test_weighted_mean_by_examples_hand_computed():
    d1 = {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([[2.0]])}
    d2 = {"w": torch.tensor([4.0, 2.0]), "v": torch.tensor([[0.0]])}
    g = G.weighted_mean([d1, d2], [1.0, 3.0])  # w = 1/4, 3/4
    assert torch.allclose(g["w"], torch.tensor([0.25 * 1 + 0.75 * 4, 0.75 * 2]))
    assert torch.allclose(g["v"], torch.tensor([[0.5]]))
    uniform = G.weighted_mean([d1, d2], [1.0, 1.0])
    assert torch.allclose(uniform["w"], torch.tensor([2.5, 1.0]))


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError):
        G.weighted_mean([{"w": torch.ones(1)}], [0.0])
    with pytest.raises(ValueError):
        G.weighted_mean([], [])


def test_normalise_per_tensor():
    g = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([100.0, 300.0]), "z": torch.zeros(2)}
    mean = G.normalise(g, "mean")
    assert torch.allclose(mean["a"], torch.tensor([0.5, 1.5]))
    assert torch.allclose(mean["b"], mean["a"])  # layers of different scale become comparable
    assert torch.equal(mean["z"], torch.zeros(2))
    assert torch.allclose(G.normalise(g, "max")["b"], torch.tensor([1 / 3, 1.0]))
    with pytest.raises(ValueError, match="normalisation"):
        G.normalise(g, "l2")


def test_update_statistics_and_sign_agreement():
    stats = G.UpdateStatistics()
    stats.add({"w": torch.tensor([1.0, 1.0, 0.0])}, 1.0)
    stats.add({"w": torch.tensor([1.0, -1.0, 2.0])}, 1.0)
    assert torch.allclose(stats.squared_update()["w"], torch.tensor([1.0, 1.0, 2.0]))
    assert torch.allclose(stats.sign_agreement()["w"], torch.tensor([1.0, 0.0, 0.5]))


def test_refresh_mixes_old_guidance_with_agreeing_updates():
    guidance = {"w": torch.tensor([1.0, 1.0])}
    stats = G.UpdateStatistics()
    stats.add({"w": torch.tensor([1.0, 1.0])}, 1.0)
    stats.add({"w": torch.tensor([1.0, -1.0])}, 1.0)
    fresh = G.refresh(guidance, stats, decay=0.0, agreement_weight=1.0)
    # same magnitude, but clients disagree on the second weight's direction
    assert fresh["w"][0] > 0 and fresh["w"][1] == 0
    unchanged = G.refresh(guidance, G.UpdateStatistics(), decay=0.5, agreement_weight=1.0)
    assert torch.equal(unchanged["w"], guidance["w"])
    kept = G.refresh(guidance, stats, decay=1.0, agreement_weight=1.0)
    assert torch.allclose(kept["w"], guidance["w"])
