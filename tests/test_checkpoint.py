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
