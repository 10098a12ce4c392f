"""A segment trie over ``:``-separated keys: exact lookups plus ``find(pattern)`` with ``identity.matches``
semantics.

One node per segment; children live in a dict keyed by the segment string, so literal pattern segments cost
one dict lookup and only glob segments scan a node's children. Each node counts the values in its subtree;
empty nodes are pruned on removal, so every non-root node leads to at least one value. Keys are assumed to
be valid identities (callers validate); the trie itself only splits on ``:``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from portdaddy.core.identity import WILDCARD, glob_segment

V = TypeVar("V")


class _Node(Generic[V]):
    __slots__ = ("children", "has_value", "size", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        # A separate flag, so a stored None is still a value.
        self.has_value = False
        self.value: V | None = None
        self.size = 0  # values in this subtree, this node included


class SegmentTrie(Generic[V]):
    def __init__(self) -> None:
        self._root: _Node[V] = _Node()

    def __len__(self) -> int:
        return self._root.size

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._node(key) is not None

    def _node(self, key: str) -> _Node[V] | None:
        """The node holding a value for ``key``, or None."""
        node: _Node[V] | None = self._root
        for seg in key.split(":"):
            node = node.children.get(seg)
            if node is None:
                return None
        return node if node.has_value else None

    def get(self, key: str) -> V | None:
        node = self._node(key)
        return node.value if node is not None else None

    def insert(self, key: str, value: V) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        existing = self._node(key)
        if existing is not None:
            # Replacing leaves every count unchanged.
            existing.value = value
            return
        node = self._root
        node.size += 1
        for seg in key.split(":"):
            child = node.children.get(seg)
            if child is None:
                child = node.children[seg] = _Node()
            child.size += 1
            node = child
        node.has_value = True
        node.value = value

    def remove(self, key: str) -> V | None:
        """Remove ``key``; return its value, or None if it was absent."""
        if key not in self:
            return None
        path: list[tuple[_Node[V], str]] = []  # (parent, segment) pairs from the root down
        node = self._root
        for seg in key.split(":"):
            path.append((node, seg))
            node = node.children[seg]
        value = node.value
        node.has_value = False
        node.value = None
        self._root.size -= 1
        for parent, seg in path:
            child = parent.children[seg]
            child.size -= 1
            if child.size == 0:
                # Everything below is empty too, so dropping the link prunes the whole dead branch.
                del parent.children[seg]
                break
        return value

    def items(self) -> Iterator[tuple[str, V]]:
        """Every (key, value), sorted by key."""
        out: list[tuple[str, V]] = []
        for seg, child in self._root.children.items():
            self._collect(child, seg, out)
        out.sort(key=lambda kv: kv[0])
        return iter(out)

    @staticmethod
    def _collect(node: _Node[V], key: str, out: list[tuple[str, V]]) -> None:
        """Append every value at or below ``node`` (whose key is ``key``)."""
        stack = [(node, key)]
        while stack:
            n, k = stack.pop()
            if n.has_value:
                out.append((k, n.value))  # type: ignore[arg-type]  # has_value guarantees a V
            stack.extend((c, f"{k}:{seg}") for seg, c in n.children.items())

    def find(self, pattern: str) -> list[tuple[str, V]]:
        """Every (key, value) with ``identity.matches(pattern, key)``, sorted by key."""
        segs = pattern.split(":")
        last = len(segs) - 1
        deep = segs[last] == WILDCARD
        out: list[tuple[str, V]] = []
        # (node, index of the next pattern segment, key so far); the root has an empty key.
        stack: list[tuple[_Node[V], int, str]] = [(self._root, 0, "")]
        while stack:
            node, i, key = stack.pop()
            if i == last and deep:
                # A trailing lone '*': one or more further segments, i.e. the whole subtree minus this node.
                for seg, child in node.children.items():
                    self._collect(child, f"{key}:{seg}" if i else seg, out)
                continue
            if i == len(segs):
                if node.has_value:
                    out.append((key, node.value))  # type: ignore[arg-type]
                continue
            pat = segs[i]
            if WILDCARD not in pat:
                child = node.children.get(pat)
                if child is not None:
                    stack.append((child, i + 1, f"{key}:{pat}" if i else pat))
                continue
            for seg, child in node.children.items():
                if glob_segment(pat, seg):
                    stack.append((child, i + 1, f"{key}:{seg}" if i else seg))
        out.sort(key=lambda kv: kv[0])
        return out
