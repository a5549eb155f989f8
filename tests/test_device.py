"""Training on a GPU: the ``device`` option of the reference app and ``AutoFLIPClient(device=...)``.

The CUDA tests run only where PyTorch sees a GPU (never in CI here); the
checks that need none run everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoflip_strategy.enforce import enforce_mask
from autoflip_task.training import resolve_device
from runner.inprocess import run_inprocess

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="PyTorch sees no GPU here")


def test_auto_picks_what_pytorch_sees() -> None:
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(CUDA, reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no GPU"):
        resolve_device("cuda")


@needs_cuda
def test_enforce_mask_moves_the_mask_to_the_parameters_device() -> None:
    layer = torch.nn.Linear(4, 3).cuda()
    keep = torch.rand(3, 4) > 0.5  # on the CPU, as decoded from the wire
    with enforce_mask(layer, {"weight": keep}):
        opt = torch.optim.Adam(layer.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            layer(torch.randn(8, 4, device="cuda")).sum().backward()
            opt.step()
    assert torch.count_nonzero(layer.weight.detach().cpu()[~keep]) == 0


@needs_cuda
def test_a_run_on_the_gpu_prunes_and_learns(tmp_path: Path) -> None:
    """A real (in-process) run with device=cuda: pruned coordinates stay zero, accuracy above chance."""
    config = {"num-server-rounds": 3, "explore-epochs": 1, "local-epochs": 1, "fraction-train": 0.5,
              "partitioning": "iid", "device": "cuda", "seed": 0}
    path = run_inprocess(config, 4, output_dir=tmp_path)
    results = json.loads(path.read_text())
    assert results["device"] != "cpu"
    assert results["rounds"][-1]["accuracy"] > 0.5
    state = torch.load(path.parent / "final_model.pt", weights_only=True)
    masks = torch.load(path.parent / "final_mask.pt", weights_only=True)
    for name, keep in masks.items():
        assert state[name].device.type == "cpu"
        assert torch.count_nonzero(state[name][~keep]) == 0, name
