import pickle

import pytest
import torch

from autoflip_strategy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_with_tensors_and_json(tmp_path):
    payload = {"round": 3, "state": {"w": torch.arange(4.0)}, "history": "[1, 2]"}
    save_checkpoint(tmp_path / "c.pt", payload)
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["round"] == 3 and torch.equal(back["state"]["w"], payload["state"]["w"])


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"round": 1})

    def crash(obj, f, *a, **k):
        open(f, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"round": 2})
    assert load_checkpoint(path)["round"] == 1


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"half a file", None], ids=["empty", "garbage", "cut-off"])
def test_an_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content is None:  # a real checkpoint cut short, as a full disk leaves it without the atomic rename
        save_checkpoint(path, {"round": 1, "state": {"w": torch.zeros(1000)}})
        path.write_bytes(path.read_bytes()[:500])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message and len(message) < 300, message
    assert isinstance(err.value, ValueError)


def test_a_checkpoint_that_is_not_a_dict_is_refused(tmp_path):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt holds a list"):
        load_checkpoint(tmp_path / "list.pt")


def test_strategy_state_round_trips_and_refuses_other_settings_or_shapes(tmp_path):
    from autoflip_strategy.checkpoint import StrategyState, restore_strategy_state
    from autoflip_strategy.config import AutoFLIPConfig
    from autoflip_strategy.masks import HybridMask

    config = AutoFLIPConfig(sparsity=0.6)
    mask = HybridMask({"g": torch.tensor([True, False])}, {"w": torch.tensor([[True, False], [False, False]])})
    saved = StrategyState(4, config, {"w": torch.ones(2, 2)}, mask, 3, None, [{"round": 4}])
    save_checkpoint(tmp_path / "s.pt", saved.payload())
    back = restore_strategy_state(load_checkpoint(tmp_path / "s.pt"), AutoFLIPConfig(sparsity=0.6, round_timeout=5.0),
                                  {"w": (2, 2)})  # a timeout may change on resume
    assert (back.round, back.mask_version, back.scores, back.history) == (4, 3, None, [{"round": 4}])
    assert back.mask.equals(mask) and torch.equal(back.state["w"], torch.ones(2, 2))
    with pytest.raises(CheckpointError) as err:
        restore_strategy_state(saved.payload(), AutoFLIPConfig(sparsity=0.5), {"w": (2, 3), "b": (2,)})
    assert all(s in str(err.value) for s in ("sparsity: 0.6 -> 0.5", "tensor b: not in the checkpoint",
                                             "tensor w: shape (2, 2) -> (2, 3)"))
    with pytest.raises(CheckpointError, match="not written by this strategy"):
        restore_strategy_state({"round": 1}, config, {"w": (2, 2)})
