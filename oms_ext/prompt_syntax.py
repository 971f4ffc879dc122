"""The OMS text: the prompt the WebUI itself uses at the first sampling step, with its weights.

OMS acts once, before the first step, so its text encoder must read what the base model reads
at that step. The WebUIs (AUTOMATIC1111 1.6-1.10, every Forge) turn a prompt into conditioning
in four stages, and :func:`first_step_prompt` follows them:

1. extra-network tags ``<lora:name:0.8>`` (any ``<kind:...>``) are removed;
2. composable diffusion: ``a room AND bright daylight :0.8`` splits into parts with weights;
   a part with weight <= 0 pushes the image *away* from its text, so it never reaches OMS;
3. prompt editing and alternation are resolved at the first step: ``[from:to:when]``,
   ``[to:when]``, ``[from::when]`` (a fractional ``when`` counts ``int(when * steps)``, so
   ``[day:night:0.2]`` at 4 steps is "night" from the first step) and ``[a|b]`` ("a");
4. emphasis ``(word:1.3)``, ``(word)``, ``[word]`` gives per-word multipliers, ``BREAK``
   separates chunks; words weighted <= 0 are left out of the OMS text.

The result is a :class:`WeightedPrompt`; :mod:`oms_ext.text` tokenizes it and scales the text
states by the multipliers as the WebUIs' default ("Original") emphasis does.

Stages 1-4 are the WebUI's own code when a WebUI adapter passes its parser in (a
:class:`PromptSyntax`); :class:`PlainSyntax` is this package's own implementation of the same
rules, for use without a WebUI (the core, the demo, tests).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

#: The WebUIs' emphasis modes (option "Emphasis"): "Original" scales the token states and
#: restores their mean, "No norm" only scales, "Ignore" drops the weights, "None" reads
#: brackets and weights as literal text.
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
#: Multiplier of ``(word)`` and divisor of ``[word]``.
BRACKET_FACTOR = 1.1


@dataclass(frozen=True)
class WeightedPrompt:
    """A prompt as text fragments with emphasis multipliers, ready for the text encoder.

    ``fragments``: ``(text, multiplier)`` pairs in order (the text is their concatenation).
    ``restore_mean``: after scaling the token states, rescale them to their original mean
    (the "Original" emphasis); False for "No norm".
    """

    fragments: tuple[tuple[str, float], ...]
    restore_mean: bool = True

    @classmethod
    def plain(cls, text: str) -> WeightedPrompt:
        return cls(((text, 1.0),))

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.fragments)

    @property
    def is_weighted(self) -> bool:
        return any(weight != 1.0 for _, weight in self.fragments)

    def __str__(self) -> str:
        """The text, weighted fragments written ``(text:1.3)``, whitespace tidied."""
        parts = [
            text if weight == 1.0 or not text.strip() else f"({text.strip()}:{weight:.3g})"
            for text, weight in self.fragments
        ]
        return " ".join("".join(parts).split())


def as_weighted(prompt: str | WeightedPrompt) -> WeightedPrompt:
    return prompt if isinstance(prompt, WeightedPrompt) else WeightedPrompt.plain(prompt)


class PromptSyntax(Protocol):
    """The four stages of the WebUI's prompt handling (see the module docstring)."""

    def strip_extra_networks(self, prompt: str) -> str:
        """The prompt without ``<kind:...>`` tags."""

    def composable_parts(self, prompt: str) -> list[tuple[str, float]]:
        """``AND``-separated parts and their weights."""

    def first_step_text(self, prompt: str, steps: int) -> str:
        """The text in effect at the first of ``steps`` sampling steps (emphasis kept)."""

    def attention(self, text: str) -> list[tuple[str, float]]:
        """``(text, multiplier)`` runs; a ``BREAK`` is the pair ``("BREAK", -1)``."""


@dataclass(frozen=True)
class TextRules:
    """How the WebUI reads prompts for the first pass: its ``syntax``, the pass's sampling
    ``steps`` as prompt editing counts them, and its ``emphasis`` mode."""

    syntax: PromptSyntax
    steps: int
    emphasis: str = "Original"

    def read(self, prompt: str, *, composable: bool = True) -> WeightedPrompt:
        """:func:`first_step_prompt` of ``prompt`` under these rules."""
        return first_step_prompt(
            prompt, self.syntax, self.steps, emphasis=self.emphasis, composable=composable
        )


def first_step_prompt(
    prompt: str,
    syntax: PromptSyntax,
    steps: int,
    *,
    emphasis: str = "Original",
    composable: bool = True,
) -> WeightedPrompt:
    """The OMS text of ``prompt`` at the first of ``steps`` sampling steps (module docstring).

    ``composable``: split at ``AND`` (prompts; the WebUIs do not split negative prompts).
    ``emphasis``: the WebUI's emphasis mode, one of :data:`EMPHASIS_MODES`. Parts joined by
    ``AND`` and chunks separated by ``BREAK`` are joined with ", ".
    """
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {list(EMPHASIS_MODES)}, got {emphasis!r}")
    text = syntax.strip_extra_networks(prompt)
    parts = syntax.composable_parts(text) if composable else [(text, 1.0)]
    fragments: list[tuple[str, float]] = []
    for part, part_weight in parts:
        if not part_weight > 0:
            continue
        scheduled = syntax.first_step_text(part, steps)
        runs = [(scheduled, 1.0)] if emphasis == "None" else syntax.attention(scheduled)
        kept: list[tuple[str, float]] = []
        for run, weight in runs:
            if run == "BREAK" and weight == -1:
                kept.append((", ", 1.0))
            elif weight > 0:
                kept.append((run, 1.0 if emphasis == "Ignore" else float(weight)))
        if fragments and kept:
            fragments.append((", ", 1.0))
        fragments.extend(kept)
    return WeightedPrompt(_merge(fragments), restore_mean=emphasis != "No norm")


def _merge(fragments: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    out: list[tuple[str, float]] = []
    for text, weight in fragments:
        if out and out[-1][1] == weight:
            out[-1] = (out[-1][0] + text, weight)
        elif text:
            out.append((text, weight))
    return tuple(out) or (("", 1.0),)


# --- PlainSyntax: the same rules without a WebUI ---------------------------------------------

_EXTRA_NETWORK = re.compile(r"<\w+:[^>]+>")
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*$")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_DANGLING_BACKSLASH = re.compile(r"(?<!\\)(?:\\\\)*\\$")
#: Emphasis tokens: an escaped bracket or backslash, a lone backslash (dropped), a bracket, a
#: ``:weight)`` closer, a run of other text, a colon.
_ATTENTION_TOKEN = re.compile(
    r"\\[()\[\]\\]|\\|[(\[\])]|:\s*([+-]?[.\d]+)\s*\)|[^\\()\[\]:]+|:", re.S
)


@dataclass(frozen=True)
class _Text:
    text: str
    escaped: bool = False  # a backslash escape, kept as written for the emphasis stage


@dataclass(frozen=True)
class _Group:
    opener: str  # "(" or "["
    children: tuple[_Text | _Group, ...]


_Node = _Text | _Group
_CLOSER = {"(": ")", "[": "]"}


class PlainSyntax:
    """This package's implementation of the WebUIs' prompt rules (:class:`PromptSyntax`).

    ``old_scheduling``: the WebUI option "use old prompt editing timelines" (a ``when`` below
    1 is a fraction of the steps, 1 and above a step number, whatever its notation).
    Unbalanced or malformed brackets are read as literal text, as the WebUIs do.
    """

    def __init__(self, old_scheduling: bool = False) -> None:
        self.old_scheduling = old_scheduling

    def strip_extra_networks(self, prompt: str) -> str:
        return _EXTRA_NETWORK.sub("", prompt)

    def composable_parts(self, prompt: str) -> list[tuple[str, float]]:
        parts = []
        for part in _AND.split(prompt):
            match = _PART_WEIGHT.match(part)
            text, weight = match.groups() if match else (part, None)
            parts.append((text, float(weight) if weight is not None else 1.0))
        return parts

    def first_step_text(self, prompt: str, steps: int) -> str:
        nodes, _, _ = _parse(prompt, 0, None)
        if _stray_bar(nodes, in_alternation=False) or _DANGLING_BACKSLASH.search(prompt):
            return prompt  # not in the WebUIs' grammar: they read the whole prompt literally
        whens: list[int] = []
        alternates = _collect(nodes, steps, self.old_scheduling, whens)
        step = min([steps, *(w for w in whens if w >= 1), *([1] if alternates else [])])
        return _render(nodes, step, steps, self.old_scheduling)

    def attention(self, text: str) -> list[tuple[str, float]]:
        runs: list[list] = []
        round_open: list[int] = []
        square_open: list[int] = []

        def scale(start: int, factor: float) -> None:
            for run in runs[start:]:
                run[1] *= factor

        for match in _ATTENTION_TOKEN.finditer(text):
            token, weight = match.group(0), _float(match.group(1))
            if token.startswith("\\"):
                runs.append([token[1:], 1.0])
            elif token in "([":
                (round_open if token == "(" else square_open).append(len(runs))
            elif weight is not None and round_open:
                scale(round_open.pop(), weight)
            elif token == ")" and round_open:
                scale(round_open.pop(), BRACKET_FACTOR)
            elif token == "]" and square_open:
                scale(square_open.pop(), 1 / BRACKET_FACTOR)
            else:
                for i, piece in enumerate(_BREAK.split(token)):
                    if i:
                        runs.append(["BREAK", -1.0])
                    runs.append([piece, 1.0])
        for start in round_open:
            scale(start, BRACKET_FACTOR)
        for start in square_open:
            scale(start, 1 / BRACKET_FACTOR)
        merged: list[tuple[str, float]] = []
        for run_text, run_weight in runs or [["", 1.0]]:
            if merged and merged[-1][1] == run_weight:
                merged[-1] = (merged[-1][0] + run_text, run_weight)
            else:
                merged.append((run_text, run_weight))
        return merged


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _parse(text: str, i: int, closer: str | None) -> tuple[list[_Node], int, bool]:
    """Bracket structure from ``i`` until ``closer``: (nodes, next index, whether it closed).
    Escapes stay in the text as written (emphasis parsing reads them later). Outside brackets
    an unbalanced bracket is a literal character; inside a group it makes the group literal
    (as in the WebUIs' grammar, where a group holds only balanced brackets)."""
    nodes: list[_Node] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            nodes.append(_Text("".join(buf)))
            buf.clear()

    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            flush()
            nodes.append(_Text(text[i : i + 2], escaped=True))
            i += 2
        elif c in _CLOSER:
            children, j, closed = _parse(text, i + 1, _CLOSER[c])
            if closed:
                flush()
                nodes.append(_Group(c, tuple(children)))
                i = j
            elif closer is not None:
                return nodes, i, False
            else:
                buf.append(c)
                i += 1
        elif c == closer:
            flush()
            return nodes, i + 1, True
        elif closer is not None and c in ")]":
            return nodes, i, False
        else:
            buf.append(c)
            i += 1
    flush()
    return nodes, i, closer is None


def _stray_bar(nodes: Sequence[_Node], in_alternation: bool) -> bool:
    """Whether a ``|`` stands anywhere but directly in an alternation ``[a|b]`` (a group of
    ``|``-separated parts without ``:``)."""
    for node in nodes:
        if isinstance(node, _Text):
            if not in_alternation and not node.escaped and "|" in node.text:
                return True
            continue
        direct = "".join(c.text for c in node.children if isinstance(c, _Text) and not c.escaped)
        alternation = node.opener == "[" and "|" in direct and ":" not in direct
        if _stray_bar(node.children, alternation):
            return True
    return False


def _split(nodes: Sequence[_Node], sep: str) -> list[list[_Node]]:
    """A group's children split at top-level ``sep`` characters."""
    parts: list[list[_Node]] = [[]]
    for node in nodes:
        if isinstance(node, _Text) and not node.escaped and sep in node.text:
            pieces = node.text.split(sep)
            parts[-1].append(_Text(pieces[0]))
            parts.extend([_Text(piece)] for piece in pieces[1:])
        else:
            parts[-1].append(node)
    return parts


def _schedule(group: _Group) -> tuple[list[_Node], list[_Node], str] | None:
    """``[from:to:when]`` / ``[to:when]`` / ``[from::when]`` as (from, to, when text)."""
    if group.opener != "[":
        return None
    parts = _split(group.children, ":")
    if len(parts) not in (2, 3):
        return None
    last = parts[-1]
    if not (len(last) == 1 and isinstance(last[0], _Text) and not last[0].escaped):
        return None
    match = _NUMBER.match(last[0].text)
    if match is None:
        return None
    before, after = ([], parts[0]) if len(parts) == 2 else (parts[0], parts[1])
    return before, after, match.group(1)


def _alternatives(group: _Group) -> list[list[_Node]] | None:
    if group.opener != "[":
        return None
    options = _split(group.children, "|")
    return options if len(options) > 1 else None


def _when(number: str, steps: int, old_scheduling: bool) -> int:
    """The step a ``when`` stands for (the WebUIs' rule; see :class:`PlainSyntax`)."""
    value = float(number)
    if old_scheduling:
        value = value * steps if value < 1 else value
    elif "." in number:
        value *= steps
    return min(steps, int(value))


def _collect(nodes: Sequence[_Node], steps: int, old: bool, whens: list[int]) -> bool:
    """Gather every schedule's step into ``whens``; return whether any alternation exists."""
    alternates = False
    for node in nodes:
        if isinstance(node, _Text):
            continue
        schedule = _schedule(node)
        if schedule is not None:
            whens.append(_when(schedule[2], steps, old))
            for branch in schedule[:2]:
                alternates |= _collect(branch, steps, old, whens)
            continue
        options = _alternatives(node)
        alternates |= options is not None
        for child in options or [list(node.children)]:
            alternates |= _collect(child, steps, old, whens)
    return alternates


def _render(nodes: Sequence[_Node], step: int, steps: int, old: bool) -> str:
    out = []
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
            continue
        schedule = _schedule(node)
        if schedule is not None:
            before, after, number = schedule
            chosen = before if step <= _when(number, steps, old) else after
            out.append(_render(chosen, step, steps, old))
            continue
        options = _alternatives(node)
        if options is not None:
            out.append(_render(options[(step - 1) % len(options)], step, steps, old))
            continue
        out.append(node.opener + _render(node.children, step, steps, old) + _CLOSER[node.opener])
    return "".join(out)
