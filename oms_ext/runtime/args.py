"""The user's OMS choices for one generation: :class:`OMSArgs` and the field table.

One table, :data:`FIELDS`, drives everything that names a field: the UI component order (which
is also the positional order of the API's ``alwayson_scripts`` args), the infotext labels
written into images and read back by "paste parameters" / PNG Info, the XYZ-grid axes and the
named-dict form of the API. Each field has one name, "OMS <name>", used by the accordion, the
infotext and (as "[OMS] <Name>") the XYZ grid. Plain Python, no WebUI import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from oms_ext import __version__

AUTO_MODULE = "Auto"
NOISE_KEEP = "Keep seed noise"
NOISE_FRESH = "Fresh noise"
#: Noise modes: keep the seed's noise x_S (s = 0, deterministic DDIM step of Eq. 20) or draw
#: fresh noise z as the authors' code does (s = sqrt(1 - alpha_bar), DDPM step).
NOISE_MODES = (NOISE_KEEP, NOISE_FRESH)
CFG_MIN, CFG_MAX = 0.0, 20.0
PROMPT_MAX_CHARS = 10_000

#: Infotext key that marks an image made with OMS (value "True").
ENABLED_KEY = "OMS"
VERSION_KEY = "OMS version"
ALPHA_BAR_KEY = "OMS alpha_bar0"
SKIPPED_KEY = "OMS skipped"
NOTE_KEY = "OMS note"
#: What every OMS axis name in the XYZ grid starts with.
XYZ_PREFIX = "[OMS]"

AxisKind = Literal["bool", "str", "float", "module", "noise_mode"]


@dataclass(frozen=True)
class Field:
    """One user-facing OMS setting.

    ``attr``: OMSArgs attribute and API dict key; ``label``: its name, the UI's label and the
    infotext key (None: a view option, never written into images); ``axis``: how the XYZ grid
    offers it (None = no axis).
    """

    attr: str
    label: str | None
    axis: AxisKind | None

    @property
    def axis_label(self) -> str:
        """The XYZ-grid name: ``[OMS] CFG``, ``[OMS] Prompt``, ``[OMS] Enable``."""
        if self.attr == "enabled":
            name = "Enable"
        else:
            name = (self.label or self.attr).removeprefix("OMS ")
        return f"{XYZ_PREFIX} {name[0].upper()}{name[1:]}"


#: UI component order = API positional order.
FIELDS: tuple[Field, ...] = (
    Field("enabled", ENABLED_KEY, "bool"),
    Field("prompt", "OMS prompt", "str"),
    Field("negative_prompt", "OMS negative prompt", None),
    Field("cfg", "OMS CFG", "float"),
    Field("module", "OMS module", "module"),
    Field("noise_mode", "OMS noise", "noise_mode"),
    Field("preview", None, None),
)
FIELD_BY_ATTR = {f.attr: f for f in FIELDS}
#: The fields written into images (infotext) and read back when pasting.
INFOTEXT_FIELDS = tuple(f for f in FIELDS if f.label is not None)


class OMSArgsError(ValueError):
    """An OMS argument is invalid; the message names the field (API key) and the bound."""


@dataclass(frozen=True)
class OMSArgs:
    """OMS settings of one generation (validated on construction).

    ``prompt``: the OMS prompt C_psi; "" means each image's own prompt (WebUI syntax
    stripped). ``negative_prompt``: the OMS unconditional prompt ("" as in the authors' code).
    ``cfg``: OMS guidance w_psi of Eq. 21 (1 = no guidance), in [CFG_MIN, CFG_MAX].
    ``module``: "Auto" (by the checkpoint's family) or a module name. ``noise_mode``: one of
    :data:`NOISE_MODES`. ``preview``: show the OMS prediction after the images (a view
    option: not written into the infotext).
    """

    enabled: bool = False
    prompt: str = ""
    negative_prompt: str = ""
    cfg: float = 2.0
    module: str = AUTO_MODULE
    noise_mode: str = NOISE_KEEP
    preview: bool = False

    def __post_init__(self) -> None:
        for name in ("enabled", "preview"):
            if not isinstance(getattr(self, name), bool):
                raise OMSArgsError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise OMSArgsError(f"{name} must be a string, got {type(value).__name__}")
            if len(value) > PROMPT_MAX_CHARS:
                raise OMSArgsError(f"{name} is longer than {PROMPT_MAX_CHARS} characters")
        if isinstance(self.cfg, bool) or not isinstance(self.cfg, int | float):
            raise OMSArgsError(f"cfg must be a number, got {self.cfg!r}")
        if not (math.isfinite(self.cfg) and CFG_MIN <= self.cfg <= CFG_MAX):
            raise OMSArgsError(f"cfg must lie in [{CFG_MIN}, {CFG_MAX}], got {self.cfg}")
        if not isinstance(self.module, str) or not self.module.strip():
            raise OMSArgsError(
                f"module must be '{AUTO_MODULE}' or a module name, got {self.module!r}"
            )
        if self.noise_mode not in NOISE_MODES:
            raise OMSArgsError(
                f"noise_mode must be one of {list(NOISE_MODES)}, got {self.noise_mode!r}"
            )

    @property
    def fresh_noise(self) -> bool:
        """True for the DDPM-style start (s = sqrt(1 - alpha_bar), fresh noise z)."""
        return self.noise_mode == NOISE_FRESH

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> OMSArgs:
        """From the script's positional args (UI order, :data:`FIELDS`); missing trailing
        values take the defaults, as the WebUI API does. A single dict is read by name."""
        if len(values) >= 1 and isinstance(values[0], Mapping):
            return cls.from_dict(values[0])
        if len(values) > len(FIELDS):
            raise OMSArgsError(
                f"got {len(values)} positional args, expected at most {len(FIELDS)}: "
                + ", ".join(f.attr for f in FIELDS)
            )
        return cls.from_dict({f.attr: v for f, v in zip(FIELDS, values, strict=False)})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OMSArgs:
        """From a named dict (API form ``{"enabled": true, "cfg": 2.0, ...}``); unknown keys
        and wrongly typed values raise :class:`OMSArgsError` naming the field."""
        unknown = sorted(set(data) - set(FIELD_BY_ATTR))
        if unknown:
            raise OMSArgsError(f"unknown OMS field(s) {unknown}; valid: {', '.join(FIELD_BY_ATTR)}")
        clean = {k: _coerce(k, v) for k, v in data.items()}
        return cls(**clean)

    def with_overrides(self, overrides: Mapping[str, Any]) -> OMSArgs:
        """A copy with some fields replaced (XYZ-grid cells); values are coerced and checked."""
        return replace(self, **{k: _coerce(k, v) for k, v in overrides.items()})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def infotext(self) -> dict[str, Any]:
        """Infotext entries: the enabled marker, the version, and the non-default fields."""
        if not self.enabled:
            return {}
        defaults = OMSArgs()
        out: dict[str, Any] = {ENABLED_KEY: "True"}
        for f in INFOTEXT_FIELDS[1:]:
            value = getattr(self, f.attr)
            if value != getattr(defaults, f.attr):
                out[f.label] = value
        out[VERSION_KEY] = __version__
        return out


def _coerce(attr: str, value: Any) -> Any:
    """Accept the string forms that pasted infotext and XYZ cells deliver."""
    if attr in ("enabled", "preview") and isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off", ""):
            return False
        raise OMSArgsError(f"{attr} must be true or false, got {value!r}")
    if attr == "cfg" and isinstance(value, str):
        try:
            return float(value)
        except ValueError as e:
            raise OMSArgsError(f"cfg must be a number, got {value!r}") from e
    if attr == "cfg" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if attr == "module" and value is None:
        return AUTO_MODULE
    if attr in ("prompt", "negative_prompt") and value is None:
        return ""
    return value


def args_from_infotext(params: Mapping[str, Any]) -> OMSArgs:
    """The OMS settings recorded in parsed infotext ``params``; a missing "OMS" key = off.

    Unreadable values fall back to the defaults for that field (a pasted foreign or corrupt
    infotext must never break "paste parameters").
    """
    enabled = str(params.get(ENABLED_KEY, "")).strip().lower() == "true"
    values: dict[str, Any] = {"enabled": enabled}
    for f in INFOTEXT_FIELDS[1:]:
        if f.label in params:
            try:
                values[f.attr] = getattr(OMSArgs.from_dict({f.attr: params[f.label]}), f.attr)
            except OMSArgsError:
                continue
    return OMSArgs(**values)
