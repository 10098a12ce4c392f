"""Advisory file-claim paths: normalisation, matching a concrete path, and exact overlap between two claims.

A claim is a repo-relative path of ``/``-separated segments. Grammar:

* ``*`` matches any run of characters (possibly none) inside one segment, never ``/``;
* ``?`` matches exactly one character, never ``/``;
* ``**`` as a whole segment matches zero or more whole segments (``src/**`` matches ``src``, ``src/a`` and
  ``src/a/b/c.py``); ``**`` inside a longer segment (``a**b``) is just ``*``;
* every other character is literal (there is no escaping and no ``[...]`` class: claims name repo paths,
  and a file literally called ``*`` cannot be claimed alone);
* **a plain path (no ``*`` or ``?`` anywhere) claims that path and everything under it**, i.e. ``src/api``
  means ``src/api/**``. A claim on a directory must cover its files, or two agents could "claim" ``src/api``
  and ``src/api/x.ts`` without conflict. Glob claims mean exactly what they match: ``src/api/*`` covers the
  direct children of ``src/api`` only, and ``src/api/**`` the whole subtree.

Concrete paths are non-empty sequences of non-empty segments (a normalised repo-relative file path).
``overlaps`` is exact: it searches the product of both claims' automata for a common concrete path, and
``witness`` returns one, so callers (and tests) can show *which* file two claims would both cover.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

from portdaddy.errors import bad_input
from portdaddy.text import quoted

MAX_CLAIM_LEN = 1024
GLOBSTAR = "**"
_GLOB_CHARS = frozenset("*?")
# The character a witness uses where both claims accept anything: any non-'/' character would do.
_ANY_CHAR = "x"

Claim = tuple[str, ...]  # canonical segments; plain paths end with GLOBSTAR


def _canon_segment(seg: str) -> str:
    """``***`` -> ``**``; runs of ``*`` inside a mixed segment -> one ``*`` (same language, one spelling)."""
    if seg and set(seg) == {"*"}:
        return GLOBSTAR if len(seg) >= 2 else "*"
    while "**" in seg:
        seg = seg.replace("**", "*")
    return seg


def normalize_claim_path(path: object) -> str:
    """Clean a claim as typed by an agent; raise VALIDATION_ERROR saying what to do instead.

    Strips surrounding whitespace, leading ``./`` and ``.`` segments, collapses ``//``, canonicalises runs of
    ``*``, and turns a trailing ``/`` into ``/**`` (``src/api/`` -> ``src/api/**``). Refuses non-strings,
    empty claims, absolute paths, ``..`` segments, NUL and line breaks, and claims over 1024 characters.
    """
    if not isinstance(path, str):
        raise bad_input(f"claim path must be a string, got {type(path).__name__}")
    text = str(path).strip()
    if not text:
        raise bad_input("claim path is empty; name a repo-relative path or glob, e.g. src/api/**")
    if len(text) > MAX_CLAIM_LEN:
        raise bad_input(f"claim path is {len(text)} characters; the limit is {MAX_CLAIM_LEN}")
    if "\x00" in text or "\n" in text or "\r" in text:
        raise bad_input(f"claim path {quoted(text)} contains a NUL or line break; claim one path per entry")
    if text.startswith("/"):
        raise bad_input(f"path {quoted(text)} is absolute; give paths relative to the repo root")
    raw_segments = text.split("/")
    if ".." in raw_segments:
        raise bad_input(f"path {quoted(text)} leaves the worktree; give paths inside it")
    directory = text.endswith("/")
    # Empty segments come from '//' and the trailing '/'; '.' segments from './'. Neither names anything.
    segments = [_canon_segment(s) for s in raw_segments if s not in ("", ".")]
    if directory and segments and segments[-1] != GLOBSTAR:
        segments.append(GLOBSTAR)
    # Adjacent '**' segments match the same paths as one.
    segments = [s for i, s in enumerate(segments) if s != GLOBSTAR or i == 0 or segments[i - 1] != GLOBSTAR]
    if not segments:
        raise bad_input(f"claim path {quoted(text)} names no file; to claim the whole repo use '**'")
    return "/".join(segments)


def is_glob(claim: str) -> bool:
    return any(c in _GLOB_CHARS for c in claim)


@lru_cache(maxsize=4096)
def _parse(claim: str) -> Claim:
    """Canonical segment tuple; a plain path gains a trailing ``**`` (it covers its subtree)."""
    segs = tuple(_canon_segment(s) for s in claim.split("/") if s not in ("", "."))
    if not is_glob(claim):
        segs += (GLOBSTAR,)
    return segs


# --- matching one concrete path -------------------------------------------------------------------------


def _segment_matches(pat: str, s: str) -> bool:
    """Whether segment ``s`` matches glob ``pat`` (``*``, ``?``), in O(len(pat) * len(s)) worst case.

    The classic greedy scan: on a mismatch, retry from the last ``*`` with it swallowing one more
    character. Greedy is enough because a later ``*`` can always absorb what an earlier one would have.
    """
    p = i = 0
    star_p, star_i = -1, 0
    while i < len(s):
        if p < len(pat) and (pat[p] == "?" or (pat[p] != "*" and pat[p] == s[i])):
            p += 1
            i += 1
        elif p < len(pat) and pat[p] == "*":
            star_p, star_i = p, i
            p += 1
        elif star_p >= 0:
            star_i += 1
            p, i = star_p + 1, star_i
        else:
            return False
    while p < len(pat) and pat[p] == "*":
        p += 1
    return p == len(pat)


def matches(claim: str, path: str) -> bool:
    """Whether the concrete repo-relative ``path`` is covered by ``claim`` (both normalised).

    Characters of ``path`` are literal; an empty path or one with empty segments matches nothing.
    """
    segs = path.split("/")
    if "" in segs:
        return False
    pat = _parse(claim)
    n = len(pat)

    def closure(states: set[int]) -> set[int]:
        # '**' may match zero segments: being before it means also being after it.
        out = set(states)
        stack = list(states)
        while stack:
            k = stack.pop()
            if k < n and pat[k] == GLOBSTAR and k + 1 not in out:
                out.add(k + 1)
                stack.append(k + 1)
        return out

    states = closure({0})
    for seg in segs:
        nxt: set[int] = set()
        for k in states:
            if k == n:
                continue
            if pat[k] == GLOBSTAR:
                nxt.add(k)  # '**' swallows this segment and may swallow more
            elif _segment_matches(pat[k], seg):
                nxt.add(k + 1)
        if not nxt:
            return False
        states = closure(nxt)
    return n in states


# --- overlap between two claims ---------------------------------------------------------------------------


def _moves(pat: str, p: int) -> tuple[str | None, int] | None:
    """One character step of glob ``pat`` at position ``p``: (required char or None for any, next p)."""
    if p == len(pat):
        return None
    c = pat[p]
    if c == "*":
        return None, p  # '*' consumes any character and stays
    if c == "?":
        return None, p + 1
    return c, p + 1


@lru_cache(maxsize=8192)
def segment_witness(a: str, b: str) -> str | None:
    """A short non-empty segment (no ``/``) matched by both segment globs, or None if none exists."""
    # Fast paths for the common cases: a literal either equals / is matched, or nothing is.
    if not is_glob(a):
        return a if a and _segment_matches(b, a) else None
    if not is_glob(b):
        return b if b and _segment_matches(a, b) else None
    # Breadth-first search over the product automaton. A state is (position in a, position in b, whether a
    # character was consumed yet); '*' has an empty move past itself and a self-loop on any character.
    # The state space is finite, so the search terminates, and it finds a path iff one exists.
    start = (0, 0, False)
    parent: dict[tuple[int, int, bool], tuple[tuple[int, int, bool], str]] = {}
    seen = {start}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        p, q, nonempty = state
        if p == len(a) and q == len(b) and nonempty:
            chars: list[str] = []
            while state != start:
                state, ch = parent[state]
                chars.append(ch)
            return "".join(reversed(chars))
        steps: list[tuple[tuple[int, int, bool], str]] = []
        if p < len(a) and a[p] == "*":
            steps.append(((p + 1, q, nonempty), ""))
        if q < len(b) and b[q] == "*":
            steps.append(((p, q + 1, nonempty), ""))
        ma, mb = _moves(a, p), _moves(b, q)
        if ma is not None and mb is not None:
            (ca, next_p), (cb, next_q) = ma, mb
            if ca is None or cb is None or ca == cb:
                ch = ca if ca is not None else cb if cb is not None else _ANY_CHAR
                steps.append(((next_p, next_q, True), ch))
        for nxt, ch in steps:
            if nxt not in seen:
                seen.add(nxt)
                parent[nxt] = (state, ch)
                queue.append(nxt)
    return None


def _step(
    sa: str | None,
    sb: str | None,
    after_a: list[str] | None,
    after_b: list[str] | None,
    after_both: list[str] | None,
) -> list[str] | None:
    """One DP cell: a common path from segments ``sa``/``sb`` on, given the paths found after each move.

    ``sa``/``sb`` are None when that claim is exhausted; ``after_a`` is the result with a advanced one
    segment, ``after_b`` with b advanced, ``after_both`` with both advanced.
    """
    # A '**' matching zero segments: emit nothing.
    if sa == GLOBSTAR and after_a is not None:
        return after_a
    if sb == GLOBSTAR and after_b is not None:
        return after_b
    if sa is None or sb is None:
        return None
    if sa == GLOBSTAR and sb == GLOBSTAR:
        return None  # both skips failed, and absorbing a segment together gains nothing over skipping
    if sa == GLOBSTAR:
        # a's '**' absorbs one segment that b's glob matches; a stays put (after_b).
        seg, rest = segment_witness("*", sb), after_b
    elif sb == GLOBSTAR:
        seg, rest = segment_witness(sa, "*"), after_a
    else:
        seg, rest = segment_witness(sa, sb), after_both
    if seg is None or rest is None:
        return None
    return [seg, *rest]


def _claim_witness(a: Claim, b: Claim) -> str | None:
    """A concrete path matched by both canonical claims, or None.

    Dynamic programming over segment positions (i, j), filled from the ends backwards. Moves: a ``**`` is
    skipped (matches zero segments) or absorbs one segment matched by the other side's glob; two globs
    consume one common segment. Every move advances i or j, so the graph is acyclic and the table exact.
    Two ``**`` never need to absorb a segment together: skipping one of them reaches the same paths.
    """
    n, m = len(a), len(b)
    # best[i][j]: segments of a path matched by both a[i:] and b[j:], or None.
    best: list[list[list[str] | None]] = [[None] * (m + 1) for _ in range(n + 1)]
    best[n][m] = []
    for i in range(n, -1, -1):
        for j in range(m, -1, -1):
            if i == n and j == m:
                continue
            sa = a[i] if i < n else None
            sb = b[j] if j < m else None
            after_a = best[i + 1][j] if i < n else None
            after_b = best[i][j + 1] if j < m else None
            after_both = best[i + 1][j + 1] if i < n and j < m else None
            best[i][j] = _step(sa, sb, after_a, after_b, after_both)
    result = best[0][0]
    if result is None:
        return None
    # An empty common path means both claims are only '**': any path is covered by both.
    return "/".join(result) if result else _ANY_CHAR


def witness(a: str, b: str) -> str | None:
    """A concrete path covered by both claims (normalised), or None if they cannot collide.

    The arguments are put in a fixed order first, so ``witness(a, b) == witness(b, a)``: overlap is
    symmetric by construction, not only in theory.
    """
    if b < a:
        a, b = b, a
    return _claim_witness(_parse(a), _parse(b))


def overlaps(a: str, b: str) -> bool:
    """Whether some concrete path is covered by both claims; exact, and symmetric by construction."""
    return witness(a, b) is not None
