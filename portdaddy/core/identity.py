"""Semantic identities ``project[:stack[:context]]`` and the patterns that select them.

Grammar (one rule for identities and patterns; only ``parse(..., wildcard=False)`` refuses ``*``):

* 1 to 3 segments separated by single ``:``; no segment may be empty (``a::b``, ``a:``, ``:a`` are refused);
* a segment is 1-64 characters from ASCII letters, digits, ``.``, ``_``, ``-`` and ``*``;
* a segment made only of dots (``.``, ``..``, ...) is refused: identities end up in file names, URLs and
  environment variable names, where such segments mean "this/parent directory" or vanish;
* the whole string is at most 200 characters; it is taken verbatim (no trimming, no case folding) and
  matching is case-sensitive.

Pattern semantics (``matches``): within a segment ``*`` matches any run of characters (only ``*`` is special).
If the pattern's last segment is exactly ``*`` it stands for one or more further segments, so ``myapp:*``
matches ``myapp:api`` and ``myapp:api:main`` but not ``myapp``, and ``*`` matches everything. Otherwise the
segment counts must be equal and each segment must glob-match (``myapp:*:main``, ``qa-test*``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from portdaddy.errors import bad_input
from portdaddy.text import quoted

MAX_SEGMENTS = 3
MAX_SEGMENT_LEN = 64
MAX_LEN = 200
WILDCARD = "*"

# Explicit ASCII ranges: \w and \d would admit Unicode letters and digits.
_BAD_CHAR = re.compile(r"[^A-Za-z0-9._*:-]")
_ENV_SUBST = str.maketrans({":": "_", ".": "_", "-": "_"})

# What a directory's name may not keep to be one segment (``segment_of``).
_NOT_SEGMENT = re.compile(r"[^A-Za-z0-9._-]+")
_FORM = "use project[:stack[:context]], e.g. myapp:api"
_CHARS = "segments may use only ASCII letters, digits, '.', '_', '-' (and '*' in patterns)"
_DOTS = "a segment needs a letter, digit, '_', '-' or '*' ('.' and '..' would act as paths)"
_ONE = "name one service, e.g. myapp:api"
_CODE = "IDENTITY_INVALID"


@dataclass(frozen=True, slots=True)
class Identity:
    segments: tuple[str, ...]

    @property
    def project(self) -> str:
        return self.segments[0]

    @property
    def stack(self) -> str | None:
        return self.segments[1] if len(self.segments) > 1 else None

    @property
    def context(self) -> str | None:
        return self.segments[2] if len(self.segments) > 2 else None

    @property
    def text(self) -> str:
        return ":".join(self.segments)

    @property
    def has_wildcard(self) -> bool:
        return any(WILDCARD in s for s in self.segments)

    def __str__(self) -> str:
        return self.text


def _problem(text: str) -> str | None:
    """What is wrong with ``text`` as an identity or pattern, in one line; None if it fits the grammar."""
    if not text:
        return f"identity is empty; {_FORM}"
    if len(text) > MAX_LEN:
        return f"identity is {len(text)} characters; the limit is {MAX_LEN}"
    bad = _BAD_CHAR.search(text)
    if bad:
        return f"identity {quoted(text)} contains {bad.group()!r}; {_CHARS}"
    segments = text.split(":")
    if "" in segments:
        return f"identity {quoted(text)} has an empty segment; separate non-empty segments with a single ':'"
    if len(segments) > MAX_SEGMENTS:
        return f"identity {quoted(text)} has {len(segments)} segments; at most {MAX_SEGMENTS}: {_FORM}"
    for seg in segments:
        if len(seg) > MAX_SEGMENT_LEN:
            return f"identity segment {quoted(seg)} is {len(seg)} characters; the limit is {MAX_SEGMENT_LEN}"
        if seg.strip(".") == "":
            return f"identity segment {seg!r} is only dots; {_DOTS}"
    return None


def parse(text: object, *, wildcard: bool = True) -> Identity:
    """Check ``text`` against the grammar and split it; raise ``IDENTITY_INVALID`` with a one-line reason."""
    if not isinstance(text, str):
        raise bad_input(f"identity must be a string, got {type(text).__name__}; {_FORM}", code=_CODE)
    text = str(text)  # a str subclass must not leak into keys or file names
    problem = _problem(text)
    if problem is not None:
        raise bad_input(problem, code=_CODE)
    ident = Identity(tuple(text.split(":")))
    if not wildcard and ident.has_wildcard:
        raise bad_input(f"cannot claim a wildcard identity {quoted(text)}; {_ONE}", code=_CODE)
    return ident


@functools.lru_cache(maxsize=2048)  # the same few identities arrive on every request of a busy agent
def exact(text: str) -> str:
    """``text`` checked as a claimable identity (no wildcards); raises like ``parse``."""
    return parse(text, wildcard=False).text


def validate_pattern(text: object) -> str:
    """A pattern for ``find``/``release``: the identity grammar with ``*`` allowed; returns the text."""
    return parse(text, wildcard=True).text


def glob_segment(pat: str, s: str) -> bool:
    """Whether one segment ``s`` matches one pattern segment ``pat`` (``*`` = any run of characters)."""
    # Only '*' is special, so a pattern is literal chunks in order: anchor the first and last, then find the
    # middle chunks left to right (leftmost placement is always safe for '*'-only globs).
    if WILDCARD not in pat:
        return pat == s
    chunks = pat.split(WILDCARD)
    head, tail = chunks[0], chunks[-1]
    if len(s) < len(head) + len(tail) or not s.startswith(head) or not s.endswith(tail):
        return False
    pos, end = len(head), len(s) - len(tail)
    for chunk in chunks[1:-1]:
        found = s.find(chunk, pos, end)
        if found < 0:
            return False
        pos = found + len(chunk)
    return True


def matches(pattern: str, ident: str) -> bool:
    """Whether ``ident`` is selected by ``pattern``; the reference semantics the trie is tested against.

    Both arguments are assumed to be valid (see ``parse``); nothing is checked here.
    """
    pat_segs = pattern.split(":")
    id_segs = ident.split(":")
    if pat_segs[-1] == WILDCARD:
        # A trailing lone '*' spans one or more deeper segments.
        fixed = pat_segs[:-1]
        if len(id_segs) <= len(fixed):
            return False
        return all(glob_segment(p, s) for p, s in zip(fixed, id_segs, strict=False))
    if len(pat_segs) != len(id_segs):
        return False
    return all(glob_segment(p, s) for p, s in zip(pat_segs, id_segs, strict=True))


def env_prefix(ident: str) -> str:
    """``myapp:api`` -> ``MYAPP_API`` (for ``MYAPP_API_PORT=``); ``3d:api`` -> ``_3D_API``.

    A shell variable name may not start with a digit (``3D_API_PORT=1`` is run as a command), hence the ``_``.
    Not injective (``a-b``, ``a.b`` and ``A_b`` all give ``A_B``): ``pd env`` leaves out names several identities
    give.
    """
    prefix = ident.upper().translate(_ENV_SUBST)
    return "_" + prefix if prefix[0].isdigit() else prefix


def segment_of(name: str) -> str:
    """``name`` (a directory's: ``My Project``) made into one identity segment (``My-Project``): each run of
    characters a segment may not hold becomes ``-``, outer ``-`` and ``.`` go, at most 64 characters are kept;
    ``project`` when nothing is left."""
    segment = _NOT_SEGMENT.sub("-", name).strip("-.")[:MAX_SEGMENT_LEN].rstrip("-.")
    return segment or "project"
