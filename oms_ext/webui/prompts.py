"""Turn a WebUI prompt into the plain text the OMS text encoder should read.

The WebUIs' prompt syntax means nothing to OMS's CLIP encoder (the authors fed it plain
prompts), so when the OMS prompt is left empty the image's prompt is rendered as plain text:

* emphasis ``(word)``, ``((word))``, ``(word:1.2)``, de-emphasis ``[word]`` -> ``word``;
* escaped brackets ``\\(`` ``\\)`` ``\\[`` ``\\]`` (and any ``\\x``) -> the literal character;
* extra-network tags ``<lora:name:0.8>``, ``<lyco:...>``, ``<hypernet:...>`` (any
  ``<kind:...>``) -> removed;
* ``BREAK`` -> a comma; composable ``a :1.2 AND b`` -> ``a, b``;
* prompt editing and alternation are rendered as the prompt in effect at the FIRST sampling
  step, because OMS acts before that step: ``[from:to:when]`` -> ``from``, ``[to:when]`` ->
  nothing, ``[from::when]`` -> ``from``, ``[a|b|c]`` -> ``a``. A switch at ``when`` = 0 takes
  effect immediately, so there ``to`` is used.

Unbalanced brackets are kept as literal characters. Whitespace and commas are tidied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EXTRA_NETWORK = re.compile(r"<\w+:[^>]*>")
_BREAK = re.compile(r"\bBREAK\b")
_AND = re.compile(r"\bAND\b")
_TRAILING_WEIGHT = re.compile(r":\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*$")
_NUMBER = re.compile(r"^\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*$")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_COMMA = re.compile(r"\s+,")
_REPEATED_COMMAS = re.compile(r",(\s*,)+")


@dataclass(frozen=True)
class _Text:
    text: str
    escaped: bool = False


@dataclass(frozen=True)
class _Group:
    opener: str  # "(" or "["
    children: tuple[_Text | _Group, ...]


_Node = _Text | _Group
_CLOSER = {"(": ")", "[": "]"}


def strip_webui_syntax(prompt: str) -> str:
    """Plain-text rendering of a WebUI prompt for the OMS text encoder (see module doc)."""
    text = _EXTRA_NETWORK.sub(" ", prompt)
    text = _BREAK.sub(",", text)
    parts = [_TRAILING_WEIGHT.sub("", part) for part in _AND.split(text)]
    text = ", ".join(part.strip() for part in parts)
    nodes, _, _ = _parse(text, 0, None)
    return _tidy(_render(nodes))


def _parse(text: str, i: int, closer: str | None) -> tuple[list[_Node], int, bool]:
    """Parse from ``i`` until ``closer``; returns (nodes, next index, whether it closed)."""
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
            nodes.append(_Text(text[i + 1], escaped=True))
            i += 2
        elif c in _CLOSER:
            children, j, closed = _parse(text, i + 1, _CLOSER[c])
            if closed:
                flush()
                nodes.append(_Group(c, tuple(children)))
                i = j
            else:
                buf.append(c)
                i += 1
        elif c == closer:
            flush()
            return nodes, i + 1, True
        else:
            buf.append(c)
            i += 1
    flush()
    return nodes, i, closer is None


def _split(nodes: tuple[_Node, ...], sep: str) -> list[list[_Node]]:
    """Split a group's children at unescaped top-level ``sep`` characters."""
    parts: list[list[_Node]] = [[]]
    for node in nodes:
        if isinstance(node, _Text) and not node.escaped and sep in node.text:
            pieces = node.text.split(sep)
            parts[-1].append(_Text(pieces[0]))
            parts.extend([_Text(piece)] for piece in pieces[1:])
        else:
            parts[-1].append(node)
    return parts


def _number(nodes: list[_Node]) -> float | None:
    raw = _render(nodes)
    plain = all(isinstance(n, _Text) and not n.escaped for n in nodes)
    return float(raw) if plain and _NUMBER.match(raw) else None


def _render(nodes: list[_Node] | tuple[_Node, ...]) -> str:
    return "".join(_render_node(node) for node in nodes)


def _render_node(node: _Node) -> str:
    if isinstance(node, _Text):
        return node.text
    if node.opener == "(":
        parts = _split(node.children, ":")
        if len(parts) > 1 and _number(parts[-1]) is not None:
            parts = parts[:-1]
        return ":".join(_render(part) for part in parts)
    alternatives = _split(node.children, "|")
    if len(alternatives) > 1:
        return _render(alternatives[0])
    parts = _split(node.children, ":")
    when = _number(parts[-1]) if len(parts) in (2, 3) else None
    if when is None:
        return ":".join(_render(part) for part in parts)
    if len(parts) == 2:
        return _render(parts[0]) if when == 0 else ""
    return _render(parts[1] if when == 0 else parts[0])


def _tidy(text: str) -> str:
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_COMMA.sub(",", text)
    text = _REPEATED_COMMAS.sub(",", text)
    return text.strip(" ,")
