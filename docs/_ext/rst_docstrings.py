r"""Griffe extension: render flatmin's reStructuredText docstring markup as Markdown.

flatmin's docstrings are Google style with a few reST constructs (the house style predates the
site): ``:class:`~x.Y``` roles, ``.. math::`` blocks, ``:math:`` inline, literal blocks
introduced by ``::`` and ``Example:`` sections. mkdocstrings renders Markdown, so before a
docstring is parsed this extension rewrites

* a role into an optional cross-reference (a link when the target is documented, plain code
  otherwise; relative targets are tried against the object's module and class),
* ``.. math::`` into a ``$$`` block and ``:math:`x``` into ``\(x\)`` (arithmatex + MathJax),
* a paragraph ending in ``::`` into one ending in ``:`` (the indented block that follows is
  already a Markdown code block),
* ``Example:`` into ``Examples:`` (griffe's section whose ``>>>`` lines render as code),

and gives a module attribute the ``#:`` comment above it as its docstring (Sphinx's convention,
which griffe does not read).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|data|exc|obj):`(~?)([^`<>]+?)(?:\(\))?`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")
_EXAMPLE = re.compile(r"^([ \t]*)Example:[ \t]*$")


def _candidates(target: str, obj: griffe.Object) -> list[str]:
    """Fully qualified names the target may mean, most specific first."""
    target = target.lstrip(".")
    if target.startswith("flatmin."):
        return [target]
    scopes = []
    scope: griffe.Object | None = obj
    while scope is not None:
        scopes.append(scope.path)
        scope = scope.parent
    return [f"{s}.{target}" for s in scopes]


def _role(match: re.Match[str], obj: griffe.Object) -> str:
    tilde, target = match.group(2), match.group(3).strip()
    shown = target.rsplit(".", 1)[-1] if tilde else target.lstrip(".")
    if match.group(1) in ("func", "meth"):
        shown += "()"
    # autorefs resolves the first identifier it knows; an unknown optional one stays code.
    identifier = _candidates(target, obj)[0]
    for candidate in _candidates(target, obj):
        try:
            obj.modules_collection[candidate]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        identifier = candidate
        break
    return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_BLOCK.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group("indent")
        body = [match.group("first").strip()]  # ".. math:: formula" on one line
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out += [f"{indent}$$", *(f"{indent}{b}" for b in body if b), f"{indent}$$", ""]
    return out


def to_markdown(text: str, obj: griffe.Object) -> str:
    """The docstring ``text`` of ``obj`` with its reST markup rewritten as Markdown."""
    lines = _math_blocks(text.splitlines())
    lines = [_EXAMPLE.sub(r"\1Examples:", line) for line in lines]
    lines = [line[:-1] if line.endswith("::") and line.strip() != "::" else line
             for line in lines]
    text = "\n".join(lines)
    text = _MATH_ROLE.sub(r"\\(\1\\)", text)
    return _ROLE.sub(lambda m: _role(m, obj), text)


def _doc_comment(obj: griffe.Object) -> str:
    """The ``#:`` comment lines right above an attribute's definition, joined."""
    if obj.lineno is None or obj.filepath is None or isinstance(obj.filepath, list):
        return ""
    lines = obj.lines_collection[obj.filepath]
    found: list[str] = []
    index = obj.lineno - 2  # the line above the definition (lineno counts from 1)
    while index >= 0 and lines[index].strip().startswith("#:"):
        found.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return "\n".join(found)


class RstDocstrings(griffe.Extension):
    """Rewrite every docstring once its package is loaded (all targets are known by then)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Convert the docstrings of ``pkg`` and everything it contains."""
        self._convert(pkg, set())

    def _convert(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is None and obj.is_attribute:
            comment = _doc_comment(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._convert(member, seen)  # type: ignore[arg-type]
