"""``SegmentTrie`` against a dict model and ``identity.matches`` as the brute-force reference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from portdaddy.core.identity import matches
from portdaddy.core.trie import SegmentTrie, _Node

# Small alphabets so keys share prefixes and patterns hit often (same shapes as tests/test_identity.py).
SEG_ALPHABET = "ab.-"
segments = st.text(alphabet=SEG_ALPHABET, min_size=1, max_size=2).filter(lambda s: s.strip(".") != "")
identities = st.lists(segments, min_size=1, max_size=3).map(":".join)
glob_segments = st.lists(st.text(alphabet=SEG_ALPHABET, max_size=2), min_size=2, max_size=3).map("*".join)
patterns = st.lists(st.one_of(segments, st.just("*"), glob_segments), min_size=1, max_size=3).map(":".join)


def brute(model: Mapping[str, Any], pattern: str) -> list[tuple[str, Any]]:
    return sorted((k, v) for k, v in model.items() if matches(pattern, k))


def check_structure(trie: SegmentTrie[Any]) -> None:
    """Sizes equal the values below each node, and no non-root node is empty (removal prunes)."""

    def walk(node: _Node[Any], is_root: bool) -> int:
        total = int(node.has_value) + sum(walk(c, False) for c in node.children.values())
        assert node.size == total
        if not is_root:
            assert total > 0
        if not node.has_value:
            assert node.value is None
        return total

    assert walk(trie._root, True) == len(trie)
    assert not trie._root.has_value


# --- examples ---

KEYS = ["myapp", "myapp:api", "myapp:api:main", "myapp:web", "myapp2:api", "x:api:y", "qa-test", "qa-test-17"]


def _filled() -> SegmentTrie[int]:
    trie: SegmentTrie[int] = SegmentTrie()
    for i, k in enumerate(KEYS):
        trie.insert(k, i)
    return trie


def test_basic_operations() -> None:
    trie = _filled()
    assert len(trie) == len(KEYS)
    assert "myapp:api" in trie and "myapp:ap" not in trie and "myapp:api:main:x" not in trie
    assert 42 not in trie
    assert trie.get("myapp:api") == 1
    assert trie.get("nope") is None
    trie.insert("myapp:api", 99)
    assert trie.get("myapp:api") == 99 and len(trie) == len(KEYS)
    assert trie.remove("myapp:api") == 99
    assert trie.remove("myapp:api") is None
    assert "myapp:api:main" in trie  # the child survives its parent's removal
    assert len(trie) == len(KEYS) - 1
    check_structure(trie)


def test_prefix_node_without_value_is_absent() -> None:
    trie: SegmentTrie[int] = SegmentTrie()
    trie.insert("a:b:c", 1)
    assert "a" not in trie and "a:b" not in trie
    assert trie.get("a:b") is None
    assert trie.remove("a:b") is None
    assert len(trie) == 1


def test_remove_prunes_empty_branches() -> None:
    trie: SegmentTrie[int] = SegmentTrie()
    trie.insert("a:b:c", 1)
    trie.insert("a", 2)
    trie.remove("a:b:c")
    assert list(trie._root.children) == ["a"]
    assert trie._root.children["a"].children == {}
    trie.remove("a")
    assert trie._root.children == {} and len(trie) == 0


def test_none_is_a_value() -> None:
    trie: SegmentTrie[None] = SegmentTrie()
    trie.insert("a", None)
    assert "a" in trie and len(trie) == 1
    assert trie.find("*") == [("a", None)]
    assert list(trie.items()) == [("a", None)]


def test_items_sorted_by_whole_key() -> None:
    # '-' (0x2d) and '.' (0x2e) sort before ':' (0x3a): segment-wise order would differ from string order.
    trie: SegmentTrie[int] = SegmentTrie()
    for k in ["a:b", "a-b", "a", "a.b", "a:a"]:
        trie.insert(k, 0)
    assert [k for k, _ in trie.items()] == ["a", "a-b", "a.b", "a:a", "a:b"]
    assert [k for k, _ in trie.find("*")] == ["a", "a-b", "a.b", "a:a", "a:b"]


def test_find_examples() -> None:
    trie = _filled()

    def keys(p: str) -> list[str]:
        return [k for k, _ in trie.find(p)]

    assert keys("myapp:*") == ["myapp:api", "myapp:api:main", "myapp:web"]
    assert keys("*") == sorted(KEYS)
    assert keys("*:api:*") == ["myapp:api:main", "x:api:y"]
    assert keys("*:api") == ["myapp2:api", "myapp:api"]
    assert keys("myapp:*:main") == ["myapp:api:main"]
    assert keys("qa-test*") == ["qa-test", "qa-test-17"]
    assert keys("myapp") == ["myapp"]
    assert keys("myapp:api") == ["myapp:api"]
    assert keys("nope:*") == []
    assert keys("myapp:**") == ["myapp:api", "myapp:web"]
    for p in ["myapp:*", "*", "*:api:*", "*:api", "my*:*", "*:*:*", "*p*", "qa-test*"]:
        assert trie.find(p) == brute(dict(trie.items()), p), p


def test_empty_trie() -> None:
    trie: SegmentTrie[int] = SegmentTrie()
    assert len(trie) == 0 and list(trie.items()) == [] and trie.find("*") == []
    check_structure(trie)


@given(st.dictionaries(identities, st.integers(), max_size=30), patterns)
def test_find_equals_brute_force(model: dict[str, int], pattern: str) -> None:
    trie: SegmentTrie[int] = SegmentTrie()
    for k, v in model.items():
        trie.insert(k, v)
    assert trie.find(pattern) == brute(model, pattern)


# --- stateful: random inserts and removes against a dict ---


class TrieMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.trie: SegmentTrie[object] = SegmentTrie()
        self.model: dict[str, object] = {}

    @rule(key=identities, value=st.one_of(st.integers(), st.none()))
    def insert(self, key: str, value: object) -> None:
        self.trie.insert(key, value)
        self.model[key] = value

    @rule(key=identities)
    def remove_any(self, key: str) -> None:
        assert self.trie.remove(key) == self.model.pop(key, None)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove_existing(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        assert self.trie.remove(key) == self.model.pop(key)
        assert key not in self.trie

    @rule(key=identities)
    def lookup(self, key: str) -> None:
        assert (key in self.trie) is (key in self.model)
        assert self.trie.get(key) == self.model.get(key)

    @rule(pattern=patterns)
    def find(self, pattern: str) -> None:
        assert self.trie.find(pattern) == brute(self.model, pattern)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def find_existing_key(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        assert self.trie.find(key) == [(key, self.model[key])]

    @invariant()
    def agrees_with_model(self) -> None:
        assert len(self.trie) == len(self.model)
        assert list(self.trie.items()) == sorted(self.model.items(), key=lambda kv: kv[0])
        check_structure(self.trie)


TestTrieMachine = TrieMachine.TestCase
