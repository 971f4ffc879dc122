"""AUTOMATIC1111 1.6/1.7 ship torch 2.0.1, whose ``nn.Module.load_state_dict`` has no
``assign`` argument (added in torch 2.1): modules and text encoders still load there."""

import inspect

import pytest
import torch

from oms_ext.loading import load_oms
from oms_ext.precision import load_state_assigned
from tests.test_loading import FIXTURE

_LOAD_STATE_DICT = torch.nn.Module.load_state_dict


def _torch_2_0_load_state_dict(self, state_dict, strict=True):
    """torch 2.0.1's signature (torch/nn/modules/module.py ``Module.load_state_dict``): no
    ``assign``, so tensors are copied into the existing parameters."""
    return _LOAD_STATE_DICT(self, state_dict, strict=strict)


@pytest.fixture
def torch_2_0(monkeypatch):
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", _torch_2_0_load_state_dict)
    assert "assign" not in inspect.signature(torch.nn.Module.load_state_dict).parameters


def test_a_module_and_its_encoder_load_on_torch_2_0_and_predict_as_on_newer_torch(torch_2_0):
    x_S = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    old = load_oms(FIXTURE).predict_x0(x_S, ["a dark room", "red"], 2.0)
    torch.nn.Module.load_state_dict = _LOAD_STATE_DICT  # the monkeypatch undoes this too
    new = load_oms(FIXTURE).predict_x0(x_S, ["a dark room", "red"], 2.0)
    assert torch.equal(old, new)


def test_the_torch_2_0_path_takes_the_tensors_without_copies(torch_2_0):
    with torch.device("meta"):
        layer = torch.nn.Linear(3, 2)
    state = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    assert load_state_assigned(layer, state, strict=True) == ([], [])
    assert layer.weight.data_ptr() == state["weight"].data_ptr()
    assert not layer.weight.is_meta and not layer.bias.is_meta


def test_the_torch_2_0_path_refuses_missing_keys_and_wrong_shapes_when_strict(torch_2_0):
    with torch.device("meta"):
        layer = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="missing"):
        load_state_assigned(layer, {"weight": torch.ones(2, 3)}, strict=True)
    with pytest.raises(RuntimeError, match="wrong shape"):
        wrong = {"weight": torch.ones(3, 3), "bias": torch.zeros(2)}
        load_state_assigned(layer, wrong, strict=False)
    assert load_state_assigned(layer, {"weight": torch.ones(2, 3)}, strict=False) == (["bias"], [])
