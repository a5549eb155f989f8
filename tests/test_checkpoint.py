import pickle

import pytest
import torch

from autoflip_strategy.checkpoint import load_checkpoint, save_checkpoint


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
