"""examples/one_more_step_workflow.json is a ComfyUI workflow whose OMS nodes match their
definitions: every link joins an output to an input of the same type, and each OMS node's
widget values are, in order, valid values of its widget inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import comfy_standins as cs

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = json.loads((ROOT / "examples" / "one_more_step_workflow.json").read_text())
#: ComfyUI's input types that are connections, not widgets.
LINK_TYPES = {"MODEL", "CLIP", "VAE", "LATENT", "IMAGE", "CONDITIONING", "OMS_MODEL"}


@pytest.fixture
def nodes(monkeypatch, tmp_path):
    cs.install(monkeypatch, tmp_path)
    for name in [m for m in sys.modules if m.startswith("oms_ext.comfy")]:
        monkeypatch.delitem(sys.modules, name)
    from oms_ext.comfy import nodes

    return nodes


def test_every_link_joins_an_output_to_an_input_of_its_type():
    by_id = {n["id"]: n for n in WORKFLOW["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in WORKFLOW["links"]:
        output = by_id[src]["outputs"][src_slot]
        target = by_id[dst]["inputs"][dst_slot]
        assert output["type"] == target["type"] == kind
        assert link_id in output["links"] and target["link"] == link_id


def test_the_oms_nodes_widget_values_fit_their_inputs(nodes):
    used = {n["type"] for n in WORKFLOW["nodes"]}
    assert set(nodes.NODE_CLASS_MAPPINGS) <= used
    for node in WORKFLOW["nodes"]:
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        inputs = {**spec["required"], **spec.get("optional", {})}
        widgets = [
            (k, v) for k, v in inputs.items() if not (isinstance(v[0], str) and v[0] in LINK_TYPES)
        ]
        assert len(widgets) == len(node["widgets_values"]), node["type"]
        for (name, (kind, *_)), value in zip(widgets, node["widgets_values"], strict=True):
            if isinstance(kind, list):
                assert value in kind, f"{node['type']}.{name}"
            elif kind == "FLOAT":
                assert isinstance(value, float), f"{node['type']}.{name}"
            else:
                assert kind == "STRING" and isinstance(value, str), f"{node['type']}.{name}"
        links = {i["name"] for i in node["inputs"]}
        assert links == {
            k for k, v in inputs.items() if isinstance(v[0], str) and v[0] in LINK_TYPES
        }
