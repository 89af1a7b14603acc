"""The curated lexicon of after-the-fact text marks: groups of interchangeable surface forms.

A group is a set of forms that can replace each other without changing the meaning in the
contexts where its guards let it apply: synonyms (``important|crucial``), equivalent forms
(``toward|towards``, ``for example|for instance``), contractions (``do not|don't``) and
spellings (``color|colour``). The data lives in ``data/lexicon.tsv`` (its header explains the
format); every surface form belongs to exactly one group, so a word read back from a text
names its group without doubt.

Marks are keyed by a group's members: append groups, and never change the members of one
that marks were made with, or those marks stop verifying (guards may be tightened: they
only decide which occurrences count).

>>> lexicon = default_lexicon()
>>> group = lexicon.group_of("don't")
>>> group.members, group.kind
(('do not', "don't"), 'contraction')
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

_FORM = re.compile(r"[a-z]+(?:'[a-z]+)*(?: [a-z]+(?:'[a-z]+)*)*")
KINDS = frozenset({"spelling", "variant", "contraction", "phrase", "synonym"})
# In not_before: what must follow the form, else it is skipped.
FOLLOWERS = {"@end": "word", "@comma": "comma"}  # a word one space later; a comma


def normalize(word: str) -> str:
    """The lookup form of a word: lower case, typographic apostrophes made straight."""
    return word.lower().replace("\u2019", "'")


@dataclass(frozen=True, slots=True)
class Group:
    """One set of interchangeable forms (lower case, words separated by one space)."""

    id: int  # CRC-32 of the members: stable while the group itself is unchanged
    kind: str
    members: tuple[str, ...]
    not_after: frozenset[str]  # skip after these words
    not_before: frozenset[str]  # skip before these words
    follow: str = ""  # "word" or "comma": skip unless one follows (see FOLLOWERS)

    @property
    def contextual(self) -> bool:
        """Whether the keyed choice depends on the previous word (spellings do not: a
        text that spells one word two ways looks careless, one spelling per word does not)."""
        return self.kind != "spelling"


@dataclass(frozen=True, slots=True)
class Form:
    words: tuple[str, ...]
    group: Group
    member: int  # index into group.members

    @property
    def encoded(self) -> tuple[bytes, ...]:
        return tuple(w.encode() for w in self.words)


class LexiconError(ValueError):
    """The lexicon file is malformed; the message names the line."""


class Lexicon:
    """Groups, and their forms by surface text and by first words (see the scanner in
    :mod:`.lexical`: the keys are bytes, as it reads an ASCII-folded copy of the text)."""

    def __init__(self, groups: Iterable[Group]) -> None:
        self.groups = tuple(groups)
        forms: dict[str, Form] = {}
        for group in self.groups:
            for index, member in enumerate(group.members):
                if member in forms:
                    raise LexiconError(
                        f"{member!r} is in two groups: {forms[member].group.members} and "
                        f"{group.members}"
                    )
                forms[member] = Form(tuple(member.split(" ")), group, index)
        self.forms: Mapping[str, Form] = forms
        self.singles: Mapping[bytes, Form] = {
            f.encoded[0]: f for f in forms.values() if len(f.words) == 1
        }
        # (first word, second word) -> the longer forms they open, longest first
        longer: dict[tuple[bytes, bytes], list[Form]] = {}
        for form in forms.values():
            if len(form.words) > 1:
                first, second = form.encoded[:2]
                longer.setdefault((first, second), []).append(form)
        self.longer: Mapping[tuple[bytes, bytes], tuple[tuple[Form, tuple[bytes, ...]], ...]] = {
            pair: tuple((f, f.encoded) for f in sorted(fs, key=lambda f: -len(f.words)))
            for pair, fs in longer.items()
        }
        self.openers = frozenset(first for first, _ in longer)
        self.seconds = frozenset(second for _, second in longer)
        self.first_words = self.openers | self.singles.keys()
        # every form's first 1..n words: a stream holds back words while they are one of these
        self.prefixes = frozenset(f.encoded[:n] for f in forms.values() for n in range(1, len(f.words) + 1))
        self.max_words = max((len(form.words) for form in forms.values()), default=1)

    def __len__(self) -> int:
        return len(self.groups)

    def group_of(self, form: str) -> Group | None:
        found = self.forms.get(normalize(form))
        return None if found is None else found.group


def parse_lexicon(text: str, source: str = "lexicon") -> Lexicon:
    """Parse the tab-separated format (see the header of ``data/lexicon.tsv``)."""
    sets: dict[str, frozenset[str]] = {}
    groups: list[Group] = []

    def words(field: str, where: str) -> frozenset[str]:
        out: set[str] = set()
        for item in filter(None, (w.strip() for w in field.split(","))):
            if item in FOLLOWERS:
                out.add(item)
            elif item.startswith("@"):
                if item not in sets:
                    raise LexiconError(f"{where}: unknown set {item}")
                out |= sets[item]
            else:
                out.add(normalize(item))
        return frozenset(out)

    for number, line in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if fields[0].startswith("@"):
            sets[fields[0]] = words(fields[1] if len(fields) > 1 else "", where)
            continue
        if fields[0] not in KINDS or len(fields) < 2 or len(fields) > 4:
            raise LexiconError(
                f"{where}: expected KIND<TAB>a|b[<TAB>not_after[<TAB>not_before]] with KIND one "
                f"of {', '.join(sorted(KINDS))}"
            )
        members = tuple(normalize(m.strip()) for m in fields[1].split("|"))
        if len(members) < 2 or len(set(members)) != len(members):
            raise LexiconError(f"{where}: a group needs two or more distinct members")
        for member in members:
            if not _FORM.fullmatch(member):
                raise LexiconError(
                    f"{where}: {member!r} is not lower-case ASCII words (apostrophes allowed) "
                    "separated by single spaces"
                )
        not_after = words(fields[2], where) if len(fields) > 2 else frozenset()
        not_before = words(fields[3], where) if len(fields) > 3 else frozenset()
        follows = [FOLLOWERS[f] for f in FOLLOWERS if f in not_before]
        if len(follows) > 1:
            raise LexiconError(f"{where}: at most one of {', '.join(FOLLOWERS)}")
        groups.append(Group(
            zlib.crc32("|".join(members).encode()), fields[0], members, not_after,
            frozenset(not_before - FOLLOWERS.keys()), follows[0] if follows else "",
        ))
    return Lexicon(groups)


@cache
def default_lexicon() -> Lexicon:
    """The lexicon shipped with the package (parsed once per process)."""
    text = resources.files("modelfence.watermark").joinpath("data/lexicon.tsv").read_text("utf-8")
    return parse_lexicon(text, "lexicon.tsv")
