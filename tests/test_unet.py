"""The OMS module network: architecture from the released configs, diffusers key names,
any latent size, and agreement with diffusers' UNet when its time input is switched off."""

import json
from pathlib import Path

import pytest
import torch

from oms_ext.unet import (
    OMSUNet,
    ResnetBlock,
    SpatialTransformer,
    UNetConfig,
    build_unet,
    config_from_state_dict_shapes,
    expected_parameter_count,
    packaged_config,
)

FIXTURE = Path(__file__).parent / "data" / "oms-tiny"
OMS_B_PARAMETERS = 154_014_564
TINY_PARAMETERS = 2_344_804


def tiny_config() -> dict:
    return json.loads((FIXTURE / "oms_module" / "config.json").read_text())


def _random_tiny(seed: int = 0, **overrides) -> OMSUNet:
    torch.manual_seed(seed)
    return build_unet({**tiny_config(), **overrides}).eval()


def _meta_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_unet(config).state_dict().items()}


def test_oms_b_config_gives_154014564_parameters() -> None:
    assert expected_parameter_count(packaged_config("oms_b_openclip_15_21")) == OMS_B_PARAMETERS


def test_both_shipped_module_configs_build() -> None:
    for name in ("oms_b_openclip_15_21", "oms_b_openclip_xl"):
        assert expected_parameter_count(packaged_config(name)) == OMS_B_PARAMETERS


def test_tiny_config_gives_the_fixture_parameter_count() -> None:
    assert expected_parameter_count(tiny_config()) == TINY_PARAMETERS


def test_parameter_names_equal_the_released_state_dict_names() -> None:
    from safetensors import safe_open

    path = FIXTURE / "oms_module" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        file_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert _meta_shapes(tiny_config()) == file_shapes


def test_resnets_have_no_time_embedding_projection() -> None:
    assert not any("time" in k for k in _meta_shapes(tiny_config()))


def test_attention_head_dim_is_read_as_the_number_of_heads() -> None:
    unet = _random_tiny()
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.heads == 4
    assert unet.up_blocks[2 - 2].attentions[0].transformer_blocks[0].attn1.heads == 4
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 4


@pytest.mark.parametrize("size", [(64, 64), (65, 97), (33, 47), (8, 9)])
def test_output_has_the_input_latent_shape_at_any_size(size: tuple[int, int]) -> None:
    unet = _random_tiny()
    x = torch.randn(1, 4, *size)
    with torch.no_grad():
        out = unet(x, torch.randn(1, 77, 32))
    assert out.shape == x.shape


@pytest.mark.parametrize("first_block", ["DownBlock2D", "CrossAttnDownBlock2D"])
def test_guidance_branches_sharing_the_latent_equal_a_repeated_latent_batch(
    first_block: str,
) -> None:
    unet = _random_tiny(down_block_types=[first_block, "CrossAttnDownBlock2D", "DownBlock2D"])
    x, context = torch.randn(2, 4, 16, 12), torch.randn(4, 77, 32)
    with torch.no_grad():
        shared = unet(x, context)
        repeated = unet(torch.cat([x, x]), context)
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=0)


def test_in_place_activations_leave_every_block_input_and_skip_tensor_unchanged() -> None:
    unet = _random_tiny()
    blocks = [m for m in unet.modules() if isinstance(m, ResnetBlock | SpatialTransformer)]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [
        b.register_forward_pre_hook(lambda _m, args: seen.append((args[0], args[0].clone())))
        for b in blocks
    ]
    x = torch.randn(1, 4, 16, 16)
    x_before = x.clone()
    with torch.no_grad():
        unet(x, torch.randn(2, 77, 32))
    for h in handles:
        h.remove()
    assert len(seen) >= len(blocks)
    for given, before in seen:
        torch.testing.assert_close(given, before, atol=0, rtol=0)
    torch.testing.assert_close(x, x_before, atol=0, rtol=0)


def test_context_batch_that_is_no_multiple_of_the_latent_batch_raises() -> None:
    with pytest.raises(ValueError, match="context batch 3 must be a multiple"):
        _random_tiny()(torch.randn(2, 4, 8, 8), torch.randn(3, 77, 32))


def test_transformer_layers_per_block_list_sets_the_depth_per_level() -> None:
    unet = _random_tiny(transformer_layers_per_block=[1, 2, 3])
    assert len(unet.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert len(unet.down_blocks[2].attentions[1].transformer_blocks) == 3
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 3
    assert len(unet.up_blocks[0].attentions[0].transformer_blocks) == 3
    assert len(unet.up_blocks[1].attentions[2].transformer_blocks) == 2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("only_cross_attention", True, "only_cross_attention"),
        ("dual_cross_attention", True, "dual_cross_attention"),
        ("act_fn", "gelu", "act_fn"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type"),
        (
            "down_block_types",
            ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"],
            "AttnDownBlock2D",
        ),
        ("attention_head_dim", [3, 4, 4], "does not divide"),
        ("transformer_layers_per_block", [1, 1], "transformer_layers_per_block"),
        ("cross_attention_dim", [32, 32, 64], "one text width"),
        ("encoder_hid_dim", 512, "encoder_hid_dim"),
        ("addition_embed_type", "text_time", "addition_embed_type"),
        ("some_new_option", 1, "unknown field"),
    ],
)
def test_unsupported_config_values_raise_value_error_naming_the_field(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict({**tiny_config(), field: value})


def test_a_module_without_mid_block_has_no_mid_block_weights_and_its_config_is_inferred() -> None:
    config = {**tiny_config(), "mid_block_type": None}
    shapes = _meta_shapes(config)
    assert not any(k.startswith("mid_block.") for k in shapes)
    inferred = config_from_state_dict_shapes(shapes, {"attention_head_dim": [2, 4, 4]})
    assert inferred["mid_block_type"] is None
    assert UNetConfig.from_dict(inferred) == UNetConfig.from_dict(config)


def test_time_embedding_fields_of_diffusers_configs_are_ignored() -> None:
    config = {**tiny_config(), "flip_sin_to_cos": True, "freq_shift": 0, "sample_size": 64}
    assert UNetConfig.from_dict(config) == UNetConfig.from_dict(tiny_config())


def test_config_inferred_from_oms_b_shapes_equals_the_released_config() -> None:
    released = packaged_config("oms_b_openclip_15_21")
    inferred = config_from_state_dict_shapes(_meta_shapes(released))
    assert UNetConfig.from_dict(inferred) == UNetConfig.from_dict(released)


def test_config_inferred_from_shapes_recovers_linear_projection_and_depths() -> None:
    config = {
        **tiny_config(),
        "use_linear_projection": True,
        "transformer_layers_per_block": [1, 2, 3],
        "layers_per_block": [1, 2, 2],
    }
    inferred = config_from_state_dict_shapes(
        _meta_shapes(config), {"attention_head_dim": [2, 4, 4]}
    )
    assert UNetConfig.from_dict(inferred) == UNetConfig.from_dict(config)


def test_inferring_an_unknown_architecture_without_head_count_raises() -> None:
    with pytest.raises(ValueError, match="head count cannot be read from tensor shapes"):
        config_from_state_dict_shapes(_meta_shapes(tiny_config()))


def _diffusers_twin(config: dict, seed: int) -> tuple[torch.nn.Module, OMSUNet]:
    """A diffusers UNet2DConditionModel with zeroed time projections, and ours with its weights."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k != "subfolder"}
    ref = diffusers.UNet2DConditionModel(**keep).eval()
    state = ref.state_dict()
    for name, tensor in state.items():
        if "time_emb_proj" in name:
            tensor.zero_()
        else:
            tensor.add_(0.05 * torch.randn_like(tensor))  # non-trivial norms and biases
    ours = build_unet(config).eval()
    ours.load_state_dict({k: state[k] for k in ours.state_dict()}, strict=True)
    return ref, ours


_ATTN3, _PLAIN = "CrossAttnDownBlock2D", "DownBlock2D"


@pytest.mark.parametrize(
    ("overrides", "size"),
    [
        ({}, (19, 13)),
        ({"use_linear_projection": True, "transformer_layers_per_block": [1, 2, 2]}, (19, 13)),
        (
            {"layers_per_block": 1, "upcast_attention": True, "attention_head_dim": [1, 2, 8]},
            (19, 13),
        ),
        (
            {  # OMS-L's layout (Table 3): attention in the three upper levels, none at the bottom
                "block_out_channels": [32, 32, 64, 64],
                "attention_head_dim": [1, 2, 4, 4],
                "down_block_types": [_ATTN3, _ATTN3, _ATTN3, _PLAIN],
                "up_block_types": ["UpBlock2D", *["CrossAttnUpBlock2D"] * 3],
                "layers_per_block": 1,
            },
            (65, 47),
        ),
        ({"layers_per_block": [1, 2, 3], "attention_head_dim": 4}, (8, 8)),
        ({"conv_in_kernel": 5, "conv_out_kernel": 1, "mid_block_scale_factor": 2.0}, (17, 31)),
        ({"norm_num_groups": 16, "norm_eps": 1e-6, "transformer_layers_per_block": 2}, (7, 5)),
        ({"resnet_out_scale_factor": 2.0}, (19, 13)),
        ({"downsample_padding": 0}, (19, 13)),
        ({"center_input_sample": True}, (19, 13)),
        ({"mid_block_type": None, "down_block_types": [_PLAIN, _ATTN3, _PLAIN]}, (19, 13)),
        ({"cross_attention_dim": [32, 32, 32]}, (19, 13)),
    ],
    ids=[
        "released-options",
        "linear-projection-deeper",
        "one-layer-upcast",
        "oms-l-layout-65x47",
        "layers-list-8x8",
        "kernels-mid-scale-17x31",
        "groups-eps-depth2-7x5",
        "resnet-out-scale-factor",
        "downsample-padding-0",
        "centred-input",
        "no-mid-block",
        "text-width-per-block",
    ],
)
def test_matches_diffusers_unet_with_time_projection_zeroed(
    overrides: dict, size: tuple[int, int]
) -> None:
    ref, ours = _diffusers_twin({**tiny_config(), **overrides}, seed=1)
    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(2))
    ctx = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(x, 999, encoder_hidden_states=ctx).sample
        got = ours(x, ctx)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_resnet_out_scale_factor_leaves_the_output_unchanged() -> None:
    # diffusers hands resnet_out_scale_factor only to the Resnet*/SimpleCrossAttn* block types;
    # the four an OMS module is built from keep their ResNets unscaled (the mid block has its
    # own mid_block_scale_factor).
    plain, scaled = _random_tiny(seed=4), _random_tiny(seed=4, resnet_out_scale_factor=2.0)
    x, ctx = torch.randn(1, 4, 16, 12), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, ctx), plain(x, ctx), atol=0, rtol=0)


@pytest.mark.parametrize(("size", "halved"), [((64, 64), (32, 32)), ((65, 47), (32, 23))])
def test_downsample_padding_0_pads_bottom_and_right_before_the_strided_conv(
    size: tuple[int, int], halved: tuple[int, int]
) -> None:
    # A 3x3 stride-2 conv without padding on H + 1 rows gives floor((H + 1 - 3) / 2) + 1 rows.
    unet = _random_tiny(downsample_padding=0)
    seen: list[tuple[int, ...]] = []
    down = unet.down_blocks[0].downsamplers[0]
    down.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[-2:])))
    x = torch.randn(1, 4, *size)
    with torch.no_grad():
        out = unet(x, torch.randn(1, 77, 32))
    assert seen == [halved]
    assert out.shape == x.shape
    h = torch.randn(1, 32, *size)
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad(h, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2
    )
    torch.testing.assert_close(down(h), expected, atol=0, rtol=0)
