"""Reading YAML as finetrack's config, question and item files need it.

`yaml.safe_load` keeps the last of two equal keys (a config that says `lr` twice trains with one of
them, silently), drops line numbers, and lets undecodable bytes or deep nesting escape as tracebacks.
Here: safe types only, a duplicate key is an error naming both lines, undecodable bytes name their
offset, and every key path keeps the line it is on, for errors that point at the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .schema import ConfigError

MAX_DEPTH = 64  # mappings/lists inside each other; a config is 4 deep, an item file 3


@dataclass(frozen=True)
class YamlDoc:
    """The data of a YAML document and the 1-based line of every key path in it."""

    data: Any
    lines: dict[str, int] = field(default_factory=dict)  # "train.lr" -> 12, "eval.suites.0.name" -> 30, "3" -> item 3's line

    def line_of(self, path: list | tuple) -> int | None:
        """The line of `path` (e.g. ('train', 'lr')) or of its nearest enclosing key that the file spells out."""
        parts = [str(p) for p in path]
        while parts:
            if ".".join(parts) in self.lines:
                return self.lines[".".join(parts)]
            parts.pop()
        return None


def read_yaml(path: Path, error: type[Exception] = ConfigError) -> YamlDoc:
    """Read a UTF-8 YAML file (a BOM is allowed); every problem raises `error` with the file, line and what to do."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(
            f"{path}:{line}: byte 0x{raw[e.start]:02x} at byte offset {e.start} is not valid UTF-8; finetrack reads YAML files as UTF-8: "
            "save the file as UTF-8"
        ) from None
    return parse_yaml(text.removeprefix("\ufeff"), str(path), error)


def parse_yaml(text: str, source: str, error: type[Exception] = ConfigError, lines: bool = True) -> YamlDoc:
    """Parse YAML text; `source` names it in messages (a file path, or "override 'k=v'" with lines=False: no line numbers)."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters first: a NUL or other control character raises here
        node = loader.get_single_node()
        if node is None:
            return YamlDoc(None)
        where: dict[str, int] = {}
        _check(node, source, where, error)
        data = loader.construct_document(node)
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        at = f"{source}:{line}" if lines else source
        raise error(f"{at}: character {chr(e.character)!r} (#x{e.character:04x}) is not allowed in YAML; remove it") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{source}:{mark.line + 1}" if mark is not None and lines else source
        problem = getattr(e, "problem", None) or str(e)
        raise error(f"{at}: not valid YAML ({problem}); fix the syntax there (indentation, quotes, ':' inside text)") from None
    except RecursionError:
        raise error(f"{source}: nested too deeply to read (more than {MAX_DEPTH} levels of mappings or lists); flatten it") from None
    finally:
        if loader is not None:
            loader.dispose()
    return YamlDoc(data, where)


def _check(root: yaml.Node, source: str, lines: dict[str, int], error: type[Exception]) -> None:
    """Record the line of every key path; refuse duplicate keys and nesting deeper than MAX_DEPTH (iteratively:
    the constructor would recurse into a deep document and end in a RecursionError traceback)."""
    stack: list[tuple[yaml.Node, tuple[str, ...], frozenset[int]]] = [(root, (), frozenset())]
    visited: set[int] = set()  # an alias repeats a node: walk it once (no exponential walk)
    while stack:
        node, path, ancestors = stack.pop()
        if id(node) in ancestors:
            raise error(f"{source}:{node.start_mark.line + 1}: a YAML alias refers to the value that contains it (endless); write it out")
        if id(node) in visited:
            continue
        visited.add(id(node))
        if len(path) > MAX_DEPTH:
            raise error(f"{source}:{node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep; flatten it")
        if isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                lines[".".join((*path, str(i)))] = child.start_mark.line + 1
                stack.append((child, (*path, str(i)), ancestors | {id(node)}))
        elif isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys written after it override, by design
                    stack.append((value_node, path, ancestors | {id(node)}))
                    continue
                line = key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode):
                    ident = (key_node.tag, key_node.value)
                    if ident in seen:
                        where = ".".join((*path, key_node.value))
                        raise error(
                            f"{source}:{line}: duplicate key '{where}' (first at line {seen[ident]}); YAML keeps only one of them: "
                            "remove one"
                        )
                    seen[ident] = line
                    child_path = (*path, key_node.value)
                    lines[".".join(child_path)] = line
                    stack.append((value_node, child_path, ancestors | {id(node)}))
                else:
                    stack.append((value_node, (*path, "?"), ancestors | {id(node)}))
