"""The OMS module psi: a text-conditioned UNet without any timestep input.

OMS (arXiv 2311.15744, Sec. 4) trains this network to predict v at SNR = 0 from pure noise
x_S ~ N(0, I) in VP space, so ``x0_hat = -psi(x_S, C)``. It is the usual Stable Diffusion
UNet layout with the time embedding removed: the ResNets get no time input and therefore
have no ``time_emb_proj`` weights.

Parameter names follow the diffusers state-dict names of the released
``oms_module/diffusion_pytorch_model*.safetensors`` files (``conv_in``,
``down_blocks.N.resnets.M.conv1``, ``...attentions.M.transformer_blocks.K.attn2.to_k``,
``mid_block``, ``up_blocks.N.upsamplers.0.conv``, ``conv_norm_out``, ``conv_out``), so those
files load with strict key checking and no renaming.

Config fields are those of the released ``oms_module/config.json``. Note the diffusers naming
quirk: ``attention_head_dim`` holds the NUMBER of attention heads per block, not their size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DOWN_PLAIN = "DownBlock2D"
DOWN_ATTN = "CrossAttnDownBlock2D"
UP_PLAIN = "UpBlock2D"
UP_ATTN = "CrossAttnUpBlock2D"
MID_ATTN = "UNetMidBlock2DCrossAttn"

#: GroupNorm eps in front of every transformer (fixed in the reference UNet, not a config field).
TRANSFORMER_GROUP_NORM_EPS = 1e-6
#: LayerNorm eps inside the transformer blocks.
LAYER_NORM_EPS = 1e-5
#: Width of the GEGLU feed-forward relative to the channel count.
FF_MULT = 4

#: Config keys that describe the missing time embedding or only metadata: read and ignored.
_IGNORED_KEYS = frozenset(
    {
        "sample_size",
        "flip_sin_to_cos",
        "freq_shift",
        "time_embedding_type",
        "time_embedding_dim",
        "time_embedding_act_fn",
        "timestep_post_act",
        "time_cond_proj_dim",
        "subfolder",
        # diffusers hands it only to the ResnetDownsample/SimpleCrossAttn block types; the four
        # an OMS module is built from (and the authors' UNet) leave their ResNets unscaled.
        "resnet_out_scale_factor",
    }
)
#: Config keys whose only supported value is the one given here (None = absent is fine too).
_FIXED_KEYS: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "dropout": (0.0,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "reverse_transformer_layers_per_block": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "attention_type": ("default",),
    "addition_embed_type_num_heads": (64,),
}


@dataclass(frozen=True)
class UNetConfig:
    """Validated architecture of an OMS module (one entry per down block where a tuple).

    ``heads`` is the number of attention heads per down block (the config's
    ``attention_head_dim``); up blocks use the reversed tuples, the mid block the last entry.
    ``mid_block``: whether there is one (``mid_block_type`` UNetMidBlock2DCrossAttn, not None).
    """

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: tuple[int, ...]
    heads: tuple[int, ...]
    transformer_layers: tuple[int, ...]
    cross_attention_dim: int
    in_channels: int = 4
    out_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    center_input_sample: bool = False
    mid_block: bool = True

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> UNetConfig:
        """Parse a diffusers-style module config; ValueError names any unsupported field."""
        _reject_unsupported(config)
        n = len(_required(config, "block_out_channels"))
        cfg = cls(
            block_out_channels=_int_tuple(config, "block_out_channels", n),
            down_block_types=tuple(_required(config, "down_block_types")),
            up_block_types=tuple(_required(config, "up_block_types")),
            layers_per_block=_int_tuple(config, "layers_per_block", n, default=2),
            heads=_int_tuple(config, "attention_head_dim", n, default=8),
            transformer_layers=_int_tuple(config, "transformer_layers_per_block", n, default=1),
            cross_attention_dim=_text_width(config),
            in_channels=_plain_int(config, "in_channels", 4),
            out_channels=_plain_int(config, "out_channels", 4),
            norm_num_groups=_plain_int(config, "norm_num_groups", 32),
            norm_eps=float(config.get("norm_eps", 1e-5)),
            use_linear_projection=bool(config.get("use_linear_projection", False)),
            upcast_attention=bool(config.get("upcast_attention", False)),
            downsample_padding=_plain_int(config, "downsample_padding", 1),
            mid_block_scale_factor=float(config.get("mid_block_scale_factor", 1.0)),
            conv_in_kernel=_plain_int(config, "conv_in_kernel", 3),
            conv_out_kernel=_plain_int(config, "conv_out_kernel", 3),
            center_input_sample=bool(config.get("center_input_sample", False)),
            mid_block=config.get("mid_block_type", MID_ATTN) is not None,
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        """Raise ValueError if the fields do not describe a buildable OMS module."""
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("block_out_channels: need at least one block")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types/up_block_types: need {n} entries each (one per "
                f"block_out_channels entry), got {len(self.down_block_types)} and "
                f"{len(self.up_block_types)}"
            )
        for name in self.down_block_types:
            if name not in (DOWN_PLAIN, DOWN_ATTN):
                raise ValueError(f"down_block_types: unsupported block type {name!r}")
        for name in self.up_block_types:
            if name not in (UP_PLAIN, UP_ATTN):
                raise ValueError(f"up_block_types: unsupported block type {name!r}")
        for field, values in (
            ("block_out_channels", self.block_out_channels),
            ("layers_per_block", self.layers_per_block),
            ("attention_head_dim", self.heads),
            ("transformer_layers_per_block", self.transformer_layers),
        ):
            if any(v < 1 for v in values):
                raise ValueError(f"{field}: every entry must be >= 1, got {list(values)}")
        for channels, heads in zip(self.block_out_channels, self.heads, strict=True):
            if channels % heads:
                raise ValueError(
                    f"attention_head_dim (number of heads) {heads} does not divide the block's "
                    f"{channels} channels"
                )
        for channels in (*self.block_out_channels, *self._up_input_channels()):
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"norm_num_groups {self.norm_num_groups} does not divide {channels} channels"
                )
        for field in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, field) % 2 == 0:
                raise ValueError(f"{field}: only odd kernel sizes are supported")

    def _up_input_channels(self) -> list[int]:
        """Channel counts entering the up ResNets (after skip concatenation)."""
        rev = self.block_out_channels[::-1]
        out, prev = [], rev[0]
        for i, ch in enumerate(rev):
            skip_last = rev[min(i + 1, len(rev) - 1)]
            for j in range(self.layers_per_block[::-1][i] + 1):
                skip = skip_last if j == self.layers_per_block[::-1][i] else ch
                out.append((prev if j == 0 else ch) + skip)
            prev = ch
        return out

    def to_dict(self) -> dict[str, Any]:
        """The config in the diffusers field names (lists, ``attention_head_dim`` = heads)."""
        d = asdict(self)
        d["attention_head_dim"] = list(d.pop("heads"))
        d["transformer_layers_per_block"] = list(d.pop("transformer_layers"))
        d["mid_block_type"] = MID_ATTN if d.pop("mid_block") else None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _required(config: Mapping[str, Any], key: str) -> Any:
    if key not in config:
        raise ValueError(f"module config: required field {key!r} is missing")
    value = config[key]
    if not isinstance(value, list | tuple):
        raise ValueError(f"module config: {key!r} must be a list, got {value!r}")
    return value


def _plain_int(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"module config: {key!r} must be an integer, got {value!r}")
    return value


def _text_width(config: Mapping[str, Any]) -> int:
    """``cross_attention_dim``: an integer, or one per down block, all equal (every block
    attends to the same text states)."""
    value = config.get("cross_attention_dim", 1280)
    if isinstance(value, list | tuple):
        widths = set(value)
        if len(widths) != 1 or len(value) != len(_required(config, "block_out_channels")):
            raise ValueError(
                f"module config: 'cross_attention_dim' must be one text width (an integer, or "
                f"one equal entry per block), got {value!r}"
            )
        value = value[0]
    return _plain_int({"cross_attention_dim": value}, "cross_attention_dim", 1280)


def _int_tuple(config: Mapping[str, Any], key: str, n: int, default: int = 0) -> tuple[int, ...]:
    """An int-or-list config field as one int per block."""
    value = config.get(key, default)
    if value is None:
        value = default
    values = list(value) if isinstance(value, list | tuple) else [value] * n
    if len(values) != n or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(
            f"module config: {key!r} must be an integer or a list of {n} integers, got {value!r}"
        )
    return tuple(values)


def _reject_unsupported(config: Mapping[str, Any]) -> None:
    mid = config.get("mid_block_type", MID_ATTN)
    if mid not in (MID_ATTN, None):
        raise ValueError(
            f"module config: mid_block_type {mid!r} is not supported, only {MID_ATTN} or None"
        )
    for key, allowed in _FIXED_KEYS.items():
        if key in config and config[key] not in allowed:
            raise ValueError(
                f"module config: {key}={config[key]!r} is not supported "
                f"(supported: {', '.join(repr(a) for a in allowed)})"
            )
    known = (
        set(_FIXED_KEYS)
        | _IGNORED_KEYS
        | {f.name for f in fields(UNetConfig)}
        | {
            "attention_head_dim",
            "transformer_layers_per_block",
            "mid_block_type",
        }
    )
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"module config: unknown field(s) {unknown}; not an OMS module config?")


def packaged_config(name: str) -> dict[str, Any]:
    """A module config shipped in ``oms_ext/configs`` (e.g. ``"oms_b_openclip_15_21"``)."""
    text = resources.files("oms_ext").joinpath("configs", f"{name}.oms_module.config.json")
    return json.loads(text.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- building blocks


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1 conv) shortcut, the sum divided by ``out_scale``
    (the mid block's ``mid_block_scale_factor``; 1 elsewhere); no time input."""

    def __init__(
        self, cin: int, cout: int, groups: int, eps: float, out_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.out_scale = out_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on fresh tensors: at 1024x1024 px each new activation is 40+ MB to fault in.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = h.add_(skip)
        return out if self.out_scale == 1.0 else out / self.out_scale


class Attention(nn.Module):
    """Multi-head attention (self when ``context`` is None) through SDPA."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool) -> None:
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, c = x.shape
        q, k, v = (
            t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx))
        )
        if self.upcast and q.dtype != torch.float32:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, c))


class GEGLU(nn.Module):
    """Linear projection to 2x width, split into value and gate, value * GELU(gate)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text states, GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = Attention(dim, dim, heads, upcast)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = Attention(dim, context_dim, heads, upcast)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        # Index 1 is a parameter-free slot (dropout at training time), kept for the key names.
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList(
            [GEGLU(dim, FF_MULT * dim), nn.Identity(), nn.Linear(FF_MULT * dim, dim)]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        h = self.norm3(x)
        for layer in self.ff.net:
            h = layer(h)
        return x + h


class SpatialTransformer(nn.Module):
    """GroupNorm, projection in, transformer blocks on the H*W tokens, projection out, residual."""

    def __init__(self, channels: int, cfg: UNetConfig, heads: int, layers: int) -> None:
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=TRANSFORMER_GROUP_NORM_EPS)
        proj = nn.Linear if self.linear else _conv1x1
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, cfg.cross_attention_dim, heads, cfg.upcast_attention)
            for _ in range(layers)
        )
        self.proj_out = proj(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)
        if self.linear:
            t = self.proj_in(t.flatten(2).transpose(1, 2))
        else:
            # One copy to dense [B, H*W, C] rows: left as a channels-major view, every
            # LayerNorm in the blocks would copy it again and every residual add would stride.
            t = self.proj_in(t).flatten(2).transpose(1, 2).contiguous()
        for block in self.transformer_blocks:
            t = block(t, context)
        if self.linear:
            t = self.proj_out(t)
        t = t.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear:
            t = self.proj_out(t)
        return x + t


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1)


class _ConvHolder(nn.Module):
    """Holds a resampling conv as ``.conv`` (``downsamplers.0.conv``, ``upsamplers.0.conv``)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv


class Downsample(_ConvHolder):
    """The 3x3 stride-2 conv ending a down block, [B, C, H, W] -> [B, C, H', W'].

    With ``downsample_padding`` 0 the input first gets one zero row at the bottom and one zero
    column at the right (as diffusers' ``Downsample2D``), so H' = floor((H - 2) / 2) + 1;
    otherwise the conv pads all sides by its padding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv.padding == (0, 0):
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class _Stage(nn.Module):
    """One down or up block: ResNets, optional transformers, optional resampler."""

    def __init__(
        self,
        resnets: list[ResnetBlock],
        attentions: list[SpatialTransformer] | None,
        resampler: nn.Conv2d | None,
        up: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions is not None:
            self.attentions = nn.ModuleList(attentions)
        if resampler is not None:
            holder = nn.ModuleList([_ConvHolder(resampler) if up else Downsample(resampler)])
            if up:
                self.upsamplers = holder
            else:
                self.downsamplers = holder


class MidBlock(nn.Module):
    """ResNet, then (transformer, ResNet) at the lowest resolution."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        ch = cfg.block_out_channels[-1]
        self.resnets = nn.ModuleList(
            ResnetBlock(ch, ch, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor)
            for _ in range(2)
        )
        self.attentions = nn.ModuleList(
            [SpatialTransformer(ch, cfg, cfg.heads[-1], cfg.transformer_layers[-1])]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x, context))


class OMSUNet(nn.Module):
    """The OMS module psi(x, C): latent [B, C_in, H, W], text states [B, L, D] -> v, latent-shaped.

    No timestep input: the module always works at SNR = 0 (VP space, x = pure noise x_S).
    Any H, W >= 1 work; upsampled features take the size of the matching skip tensor.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        chans = cfg.block_out_channels
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        n = len(chans)
        self.conv_in = nn.Conv2d(
            cfg.in_channels, chans[0], cfg.conv_in_kernel, padding=cfg.conv_in_kernel // 2
        )

        self.down_blocks = nn.ModuleList()
        cin = chans[0]
        for i, (kind, cout) in enumerate(zip(cfg.down_block_types, chans, strict=True)):
            layers = cfg.layers_per_block[i]
            resnets = [
                ResnetBlock(cin if j == 0 else cout, cout, groups, eps) for j in range(layers)
            ]
            attns = (
                [
                    SpatialTransformer(cout, cfg, cfg.heads[i], cfg.transformer_layers[i])
                    for _ in range(layers)
                ]
                if kind == DOWN_ATTN
                else None
            )
            down = (
                nn.Conv2d(cout, cout, 3, stride=2, padding=cfg.downsample_padding)
                if i < n - 1
                else None
            )
            self.down_blocks.append(_Stage(resnets, attns, down, up=False))
            cin = cout

        self.mid_block = MidBlock(cfg) if cfg.mid_block else None

        self.up_blocks = nn.ModuleList()
        rev_chans = chans[::-1]
        rev_layers = cfg.layers_per_block[::-1]
        rev_heads = cfg.heads[::-1]
        rev_tlayers = cfg.transformer_layers[::-1]
        prev = rev_chans[0]
        for i, (kind, cout) in enumerate(zip(cfg.up_block_types, rev_chans, strict=True)):
            skip_in = rev_chans[min(i + 1, n - 1)]
            layers = rev_layers[i] + 1
            resnets = [
                ResnetBlock(
                    (prev if j == 0 else cout) + (skip_in if j == layers - 1 else cout),
                    cout,
                    groups,
                    eps,
                )
                for j in range(layers)
            ]
            attns = (
                [SpatialTransformer(cout, cfg, rev_heads[i], rev_tlayers[i]) for _ in range(layers)]
                if kind == UP_ATTN
                else None
            )
            up = nn.Conv2d(cout, cout, 3, padding=1) if i < n - 1 else None
            self.up_blocks.append(_Stage(resnets, attns, up, up=True))
            prev = cout

        self.conv_norm_out = nn.GroupNorm(groups, chans[0], eps=eps)
        self.conv_out = nn.Conv2d(
            chans[0], cfg.out_channels, cfg.conv_out_kernel, padding=cfg.conv_out_kernel // 2
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Raw module output v for latent ``x`` [B, C_in, H, W] and text states [k*B, L, D].

        With k > 1 (e.g. CFG's ``cat[E(neg), E(prompt)]``, k = 2) the result is that of
        ``x.repeat(k, 1, 1, 1)`` against ``context``, but the text-free leading layers (conv_in
        and the resnets before the first attention, the costliest full-resolution convs) run
        once on ``x`` and are shared by the k branches: the text enters only at attention.
        """
        reps, rem = divmod(context.shape[0], x.shape[0])
        if rem or reps < 1:
            raise ValueError(
                f"context batch {context.shape[0]} must be a multiple of the latent batch "
                f"{x.shape[0]}"
            )
        h = self.conv_in(2 * x - 1 if self.cfg.center_input_sample else x)
        skips = [h]

        def widen() -> None:
            nonlocal h, skips, reps
            if reps > 1:
                h = h.repeat(reps, 1, 1, 1)
                skips = [s.repeat(reps, 1, 1, 1) for s in skips]
                reps = 1

        for block in self.down_blocks:
            attns = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                h = resnet(h)
                if attns is not None:
                    widen()
                    h = attns[j](h, context)
                skips.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
                skips.append(h)

        widen()
        if self.mid_block is not None:
            h = self.mid_block(h, context)

        for block in self.up_blocks:
            attns = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1))
                if attns is not None:
                    h = attns[j](h, context)
            if hasattr(block, "upsamplers"):
                h = F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest")
                h = block.upsamplers[0].conv(h)

        return self.conv_out(F.silu(self.conv_norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    """Total number of parameter elements (works on the meta device too)."""
    return sum(p.numel() for p in module.parameters())


def config_from_state_dict_shapes(
    shapes: Mapping[str, Sequence[int]], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Module config read from tensor shapes (``key -> shape``), as a diffusers-style dict.

    Shapes fix the channels, block types, layer counts, text width (``cross_attention_dim``),
    kernels and ``use_linear_projection``. They cannot show the head count, GroupNorm groups
    and eps, attention upcasting or padding: those come from ``extra`` (e.g. a config in the
    file's metadata) or else from the shipped OMS-B config when the shapes match it; if the
    head count is still unknown a ValueError says so.
    """
    if "conv_in.weight" not in shapes or "conv_out.weight" not in shapes:
        raise ValueError("no conv_in.weight / conv_out.weight: not an OMS module state dict")
    conv_in, conv_out = shapes["conv_in.weight"], shapes["conv_out.weight"]
    n_down = _count_children(shapes, "down_blocks.")
    n_up = _count_children(shapes, "up_blocks.")
    if n_down == 0 or n_down != n_up:
        raise ValueError(f"found {n_down} down blocks and {n_up} up blocks; need equal, >= 1")
    chans, layers, down_types = [], [], []
    for i in range(n_down):
        prefix = f"down_blocks.{i}."
        key = f"{prefix}resnets.0.conv1.weight"
        if key not in shapes:
            raise ValueError(f"missing {key}")
        chans.append(int(shapes[key][0]))
        layers.append(_count_children(shapes, f"{prefix}resnets."))
        has_attn = any(k.startswith(f"{prefix}attentions.") for k in shapes)
        down_types.append(DOWN_ATTN if has_attn else DOWN_PLAIN)
    up_types = [
        UP_ATTN if any(k.startswith(f"up_blocks.{i}.attentions.") for k in shapes) else UP_PLAIN
        for i in range(n_up)
    ]
    tlayers = [_transformer_depth(shapes, i, n_down) for i in range(n_down)]
    k_shapes = [v for k, v in shapes.items() if k.endswith("attn2.to_k.weight")]
    if not k_shapes:
        raise ValueError("no cross-attention (attn2.to_k) weights: not an OMS module")
    proj_in = next(v for k, v in shapes.items() if k.endswith("proj_in.weight"))
    inferred: dict[str, Any] = {
        "in_channels": int(conv_in[1]),
        "out_channels": int(conv_out[0]),
        "conv_in_kernel": int(conv_in[2]),
        "conv_out_kernel": int(conv_out[2]),
        "block_out_channels": chans,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "mid_block_type": MID_ATTN if any(k.startswith("mid_block.") for k in shapes) else None,
        "cross_attention_dim": int(k_shapes[0][1]),
        "transformer_layers_per_block": tlayers[0] if len(set(tlayers)) == 1 else tlayers,
        "use_linear_projection": len(proj_in) == 2,
    }
    defaults = dict(extra or {})
    if "attention_head_dim" not in defaults:
        known = packaged_config("oms_b_openclip_15_21")
        if _same_shape_fields(known, inferred):
            defaults = {**known, **defaults}
    if "attention_head_dim" not in defaults:
        raise ValueError(
            f"the attention head count cannot be read from tensor shapes (block channels "
            f"{chans} match no known OMS module); put the module's config.json beside the file "
            f"under the same name with a .json suffix"
        )
    keep = {
        "attention_head_dim",
        "norm_num_groups",
        "norm_eps",
        "upcast_attention",
        "downsample_padding",
        "mid_block_scale_factor",
    }
    merged = {k: v for k, v in defaults.items() if k in keep}
    mismatch = {
        k: (defaults[k], v)
        for k, v in inferred.items()
        if k in defaults and not _eq(defaults[k], v)
    }
    if mismatch:
        raise ValueError(f"config fields disagree with tensor shapes (config, shapes): {mismatch}")
    return {**merged, **inferred}


def _transformer_depth(shapes: Mapping[str, Sequence[int]], i: int, n: int) -> int:
    """Transformer layers of level ``i``: from down block i, else its up block, else the mid."""
    candidates = [f"down_blocks.{i}.attentions.0.", f"up_blocks.{n - 1 - i}.attentions.0."]
    if i == n - 1:
        candidates.append("mid_block.attentions.0.")
    for prefix in candidates:
        if any(k.startswith(prefix) for k in shapes):
            return _count_children(shapes, f"{prefix}transformer_blocks.")
    return 1


def _count_children(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    """Number of consecutive numbered children ``prefix0.``, ``prefix1.``, ... in the keys."""
    idx = {
        int(rest.split(".", 1)[0])
        for k in shapes
        if k.startswith(prefix) and (rest := k[len(prefix) :]).split(".", 1)[0].isdigit()
    }
    return len(idx) if idx == set(range(len(idx))) else -1


def _eq(a: Any, b: Any) -> bool:
    """Compare config values treating an int and a list of that int repeated as equal."""
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        la = list(a) if isinstance(a, list | tuple) else None
        lb = list(b) if isinstance(b, list | tuple) else None
        if la is None:
            return all(x == a for x in lb or [])
        if lb is None:
            return all(x == b for x in la)
        return la == lb
    return a == b


def _same_shape_fields(config: Mapping[str, Any], inferred: Mapping[str, Any]) -> bool:
    return all(
        k in config and _eq(config[k], v) for k, v in inferred.items() if k != "mid_block_type"
    )


def build_unet(config: Mapping[str, Any] | UNetConfig) -> OMSUNet:
    """An OMS module for ``config`` (dict or UNetConfig), randomly initialised on the current
    default device; use ``with torch.device("meta")`` to build without allocating weights."""
    cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
    return OMSUNet(cfg)


def expected_parameter_count(config: Mapping[str, Any] | UNetConfig) -> int:
    """Parameter count of the module a config describes, computed without allocating weights."""
    with torch.device("meta"):
        return count_parameters(build_unet(config))


__all__ = [
    "OMSUNet",
    "UNetConfig",
    "build_unet",
    "config_from_state_dict_shapes",
    "count_parameters",
    "expected_parameter_count",
    "packaged_config",
]
