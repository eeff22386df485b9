"""The `path` of a row: the name an archive member, a file under a directory or a Parquet row's
key has, as UTF-8 text that maps back to the name's bytes and tells two rows of one name apart.

A name is bytes (a tar header's, a zip entry's, a directory entry's); kiln holds it as Python
holds file names, a str with each byte that is not UTF-8 as a lone surrogate (surrogateescape).
Its text form:
- a name that is UTF-8 and does not start with `"` is itself: `cat/0001.png`;
- any other name is quoted: `"` + the name + `"`, where a byte that is not UTF-8 is `\\xNN`
  (two lower-case hex digits), and `\\` and `"` are `\\\\` and `\\"`: the Latin-1 name
  b"caf\\xe9.png" is `"caf\\xe9.png"`;
- the second and later members of one name in one source (a tar appended to, a zip with two
  entries of a name, a Parquet `path` column with repeats) add `#N` after the quoted name, N
  counting from 2 in the order they come: `"a.png"#2`.
So every name a source holds is one row with its own text, and a re-run reads the same texts."""

from __future__ import annotations

import re

_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"(?:#(\d+))?\Z', re.S)
_ESCAPE = re.compile(r'\\(x[0-9a-f]{2}|.)', re.S)


def is_text(name: str) -> bool:
    """Whether a name is UTF-8 as it is (no byte held as a surrogate)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text(name: str, occurrence: int = 1) -> str:
    """A name's text form (module docstring); `occurrence`: 1 for the first member of the name
    in its source, 2 for the second, ..."""
    if occurrence == 1 and not name.startswith('"') and is_text(name):
        return name
    out = []
    for ch in name:
        if ch in '\\"':
            out.append("\\" + ch)
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    quoted = '"' + "".join(out) + '"'
    return quoted if occurrence == 1 else f"{quoted}#{occurrence}"


def parse(key: str) -> tuple[str, int]:
    """The name (surrogateescape str) and occurrence of a text form: text()'s inverse."""
    m = _QUOTED.match(key) if key.startswith('"') else None
    if m is None:
        return key, 1

    def one(e: re.Match) -> str:
        s = e.group(1)
        return chr(0xDC00 + int(s[1:], 16)) if len(s) == 3 and s[0] == "x" else s

    return _ESCAPE.sub(one, m.group(1)), int(m.group(2) or 1)


def from_bytes(raw: bytes) -> str:
    """A name given as bytes, held as Python holds file names."""
    return raw.decode("utf-8", "surrogateescape")


def folder(key: str) -> str | None:
    """The text form of the first folder of a row's name (its class, in a class-per-folder
    layout); None where the name has no folder."""
    name, _ = parse(key)
    return text(name.split("/", 1)[0]) if "/" in name else None


class Counter:
    """Occurrences of names in one source, as they come: the n-th member of a name is n. Memory
    is 8 bytes (a digest) per distinct name and a count per repeated one, so a stream of
    millions of members is counted without holding its names."""

    def __init__(self):
        self.seen: set[bytes] = set()
        self.repeats: dict[bytes, int] = {}

    def __call__(self, name: str) -> int:
        import hashlib

        d = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        if d not in self.seen:
            self.seen.add(d)
            return 1
        n = self.repeats[d] = self.repeats.get(d, 1) + 1
        return n

    def key(self, name: str) -> str:
        """The next member of this name: its text form."""
        return text(name, self(name))
