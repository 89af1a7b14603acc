"""After-the-fact text marks: keyed choices among interchangeable forms, made on returned text.

For answers of upstreams we do not control (no logits to bias), each occurrence of a
lexicon group (see :mod:`.lexicon`) is rewritten to the form the client's key prefers in its
context, as CATER does with synonyms: the preferred member of group ``g`` after previous
word ``w`` is ``mix(seed ^ mix(g << 32 | crc32(w) + C)) mod |g|`` (SplitMix64, the same
finaliser as the green list). The previous word is read from the *marked* text, and a word
that is a one-word form counts as its group, so the detector recomputes every context from
the leaked text alone, and a one-word synonym swapped in by an attacker keeps its
neighbour's context.
Spellings are not context-conditioned (one spelling per word and client).

A left-to-right :class:`Rewriter` finds occurrences and asks a chooser which member to write.
It never touches code blocks, inline code, quoted text, block quotes, JSON answers, words
glued to other characters (URLs, paths, identifiers, hyphenated compounds) or words in
capitals, and skips occurrences whose group guards exclude the neighbouring words.
It is streaming-safe: ``feed`` returns every character it has decided, in order, and holds
back only the trailing partial word plus the last complete words while they are the start
of a lexicon form, or a whole form whose next word (its guards read it) has not come: at
most ``Lexicon.max_words`` words (3 with the shipped lexicon), or twice that when a form
reaches back over them. The output never depends on how the text was split.

>>> from modelfence.watermark.lexicon import default_lexicon
>>> mark = LexicalMark(default_lexicon(), seed=7)
>>> out = mark.text("It is not obvious, but it is important.")
>>> out == mark.text("It is not obvious, but it is important.")
True
"""

from __future__ import annotations

import re
import string
import zlib
from collections.abc import Callable, Mapping
from itertools import accumulate, compress, count, islice
from operator import and_
from typing import NamedTuple

from modelfence.watermark.lexicon import Form, Group, Lexicon, normalize

LEXICAL_PURPOSE = "lexical"  # the key purpose (see WatermarkKey.subkey)
_MASK = (1 << 64) - 1
_CODE = 0x9E3779B97F4A7C15
# What may stand right before and after a rewritten form (also the start and end of text).
_BEFORE_OK = frozenset(" \t\n\r([*\u2013\u2014")
_AFTER_OK = frozenset(" \t\n\r.,;:!?)]*\u2013\u2014")


def mix64(x: int) -> int:
    """SplitMix64's finaliser on one Python int (bit-identical to ``greenlist.mix``)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def occurrence_code(group: Group, context: int) -> int:
    """The 64-bit hash of one (group, context) pair; keyed by ``seed ^ code`` (see module)."""
    return mix64((((group.id << 32) | context) + _CODE) & _MASK)


def preferred(seed: int, group: Group, context: int) -> int:
    """Index of the member that the key with ``seed`` prefers for ``group`` in ``context``."""
    return mix64(seed ^ occurrence_code(group, context)) % len(group.members)


class Occurrence(NamedTuple):  # a tuple: one is made per occurrence on the request path
    """One scoreable use of a group: what the text says and in which context."""

    group: Group
    member: int  # index of the member found in the text
    context: int  # CRC-32 of the previous word's context key; 0 for spellings
    words: int  # words read so far, this occurrence included (for the change cap)


Choose = Callable[[Occurrence], int | None]  # the member to write, or None to keep the text


def _style(surface: str) -> str | None:
    """The case of a form: ``lower``, ``title`` (first letter capital) or None (capitals,
    mixed case: left alone, as they are often acronyms or code)."""
    if surface.islower():
        return "lower"
    if surface[0].isupper() and (len(surface) == 1 or not any(c.isupper() for c in surface[1:])):
        return "title"
    return None


class _NeedMore(Exception):
    """The decision depends on text that has not arrived yet."""


class Rewriter:
    """One text, left to right: ``feed`` chunks, then ``flush``; each returns what to send.

    Forms are found by looking each word of an ASCII-folded copy of the text up in the
    lexicon (see :func:`_scan`), so plain words cost a set lookup and the prose is never
    run through a regex alternation of a thousand forms.
    """

    def __init__(self, lexicon: Lexicon, choose: Choose) -> None:
        self._lexicon = lexicon
        self._choose = choose
        self._buf = ""
        self._out: list[str] = []
        self._json: bool | None = None
        self._fence = self._code = self._quote = self._blockquote = False
        self._tail = ""  # the last characters written (the previous word is read there)
        self._words = 0  # words read, counted as spaces and line breaks (for the change cap)
        self._counted = 0  # self._words covers buf[:self._counted]
        self._curly = False  # the text written uses typographic apostrophes

    def feed(self, chunk: str) -> str:
        self._buf += chunk
        if chunk and not chunk.strip(_WORD_CHARS):
            return ""  # only the partial word grew: nothing new can be decided
        if self._json is False:
            plain = self._plain(self._buf)
            if plain:
                self._write(self._buf[:plain])
                self._words += _words(self._buf, 0, plain)
                return self._send(plain)
        return self._advance(final=False)

    def _plain(self, buf: str) -> int:
        """How much of ``buf`` can go out unchanged without a scan: everything before the
        partial word when no word there may start a form and no character changes state
        (the common case for the deltas of a stream). 0: scan."""
        hold = _trailing(buf)
        if _SPECIAL_CHAR.search(buf, 0, hold):
            return 0
        words = buf[:hold].replace("\u2019", "'").encode("ascii", "replace").translate(_FOLD)
        return hold if self._lexicon.first_words.isdisjoint(words.split()) else 0

    def flush(self, chunk: str = "") -> str:
        """Take the last chunk (if any) and return everything still held."""
        self._buf += chunk
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        buf = self._buf
        if self._json is None:
            head = buf.lstrip()
            if not final and _JSON_UNDECIDED.fullmatch(head):
                return ""  # wait for the character that tells JSON from prose
            self._json = _JSON_START.match(head) is not None
        if self._json:
            self._write(buf)
            return self._send(len(buf))
        hold = len(buf) if final else self._undecided(buf)
        cut = 0  # buf[:cut] is written
        for start, end, form in _scan(buf, self._lexicon):
            if start >= hold:
                break
            if form is not None:
                if end > hold:  # a form reaching into the undecided words waits for them
                    hold = start
                    break
                if self._fence or self._code or self._quote or self._blockquote:
                    continue
                try:
                    replacement = self._decide(buf, form, start, end, final, cut)
                except _NeedMore:
                    hold = start
                    break
                if replacement is not None:
                    self._write(buf[cut:start])
                    self._write(replacement)
                    cut = end
                continue
            text = buf[start:end]
            if text[0] == "`":
                if len(text) >= 3:
                    self._fence, self._code = not self._fence, False
                elif not self._fence:
                    self._code = not self._code
            elif text[0] == "\n":
                self._quote, self._blockquote = False, text.endswith(">")
            elif not (self._fence or self._code):
                self._quote = text == "\u201c" or (text == '"' and not self._quote)
        self._write(buf[cut:hold])
        self._words += _words(buf, self._counted, hold)
        self._counted = 0
        return self._send(hold)

    def _write(self, text: str) -> None:
        if text:
            self._out.append(text)
            self._tail = (self._tail + text)[-_TAIL:]
            self._curly = self._curly or "\u2019" in text

    def _send(self, upto: int) -> str:
        """Return what is written, keeping ``buf[upto:]`` for later."""
        self._buf = self._buf[upto:]
        text, self._out = "".join(self._out), []
        return text

    def _undecided(self, buf: str) -> int:
        """Where the text stops being decidable: a trailing partial word, backtick run or
        line start, and before it the last words while they may still grow into a form
        (or are one, whose next word is not there yet)."""
        hold = _trailing(buf)
        last = list(_WORD.finditer(buf, 0, hold))[-(self._lexicon.max_words + 1) :]
        words = tuple(normalize(w.group()).encode("ascii", "replace") for w in last)
        for j, word in enumerate(last):
            if words[j:] in self._lexicon.prefixes:
                return word.start()
        return hold

    def _decide(
        self, buf: str, form: Form, start: int, end: int, final: bool, cut: int
    ) -> str | None:
        """What to write instead of the form ``buf[start:end]`` (None: keep it)."""
        surface = buf[start:end]
        group = form.group
        after, after2, next_word = _after(buf, end, final)
        before_text = (self._tail + buf[max(cut, start - _TAIL) : start])[-_TAIL:]
        before = before_text[-1:]
        style = _style(surface)
        if not (
            (before == "" or before in _BEFORE_OK)
            and (after == "" or after in _AFTER_OK)
            and (after != "." or after2 == "" or after2.isspace())
            and style is not None
            and (next_word is not None or group.follow != "word")
            and (after == "," or group.follow != "comma")
            and (next_word is None or next_word.partition("'")[0] not in group.not_before)
        ):
            return None
        previous = _WORD.search(before_text[::-1])  # the last word, reversed
        prev_word = normalize(previous.group()[::-1]) if previous else ""
        if prev_word.partition("'")[0] in group.not_after:
            return None
        context = 0
        if group.contextual:
            prev_form = self._lexicon.forms.get(prev_word)
            key = prev_word if prev_form is None else f"\u00a7{prev_form.group.id}"
            context = zlib.crc32(key.encode())
        self._words += _words(buf, self._counted, start)
        self._counted = start
        words = self._words + _words(buf, start, end) + 1
        choice = self._choose(Occurrence(group, form.member, context, words))
        if choice is None or choice == form.member:
            return None
        member = group.members[choice]
        if style == "title":
            member = member[0].upper() + member[1:]
        if self._curly or buf.find("\u2019", cut, end) >= 0:
            member = member.replace("'", "\u2019")
        return member


# A JSON answer opens with "{" or with "[" and a value ("[Read more](...)" is prose).
_JSON_START = re.compile(r"\{|\[\s*[\[{\"\d\-\]]")
_JSON_UNDECIDED = re.compile(r"(?:\[\s*)?")
_TAIL = 64  # characters of written text kept to find the previous word
_WORD = re.compile(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)*")
_WORD_CHARS = string.ascii_letters + "'\u2019"
_NEXT_WORD = re.compile(r" ([A-Za-z]+(?:['\u2019][A-Za-z]+)*)")


def _trailing(buf: str) -> int:
    """Where a trailing partial word, backtick run or line start begins (else the end)."""
    for chars in (_WORD_CHARS, "`"):
        start = len(buf.rstrip(chars))
        if start < len(buf):
            return start
    start = len(buf.rstrip(" \t"))
    return start - 1 if buf[start - 1 : start] == "\n" else len(buf)


def _words(buf: str, start: int, end: int) -> int:
    """Words in ``buf[start:end]``, counted as spaces and line breaks."""
    return buf.count(" ", start, end) + buf.count("\n", start, end)


def _after(buf: str, end: int, final: bool) -> tuple[str, str, str | None]:
    """The two characters after a form and the word one space later (None if none)."""
    if not final and len(buf) < end + 2:
        raise _NeedMore
    after, after2 = buf[end : end + 1], buf[end + 1 : end + 2]
    match = _NEXT_WORD.match(buf, end)
    if match is None:
        return after, after2, None
    if not final and buf[match.end() :] in ("", "'", "\u2019"):
        raise _NeedMore
    return after, after2, normalize(match.group(1))


# A backtick run, a double quote, or a line break with its indent (and ">"); the leading
# character class lets the regex engine skip plain text quickly.
_SPECIAL_CHAR = re.compile("[`\"\u201c\u201d\n]")
_SPECIAL = re.compile("[`\"\u201c\u201d\n](?:(?<=`)`*|(?<=\n)[ \t]*>?)?")
# ASCII letters folded to lower case, apostrophes kept, everything else a space.
_FOLD = bytes.maketrans(
    bytes(range(256)),
    bytes(
        c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or c == 39 else 32 for c in range(256)
    ),
)


def _scan(buf: str, lexicon: Lexicon) -> list[tuple[int, int, Form | None]]:
    """Spans of the special characters (form None) and of the lexicon forms, in text order.

    Words are read from an ASCII-folded copy (same length: one byte per character), split
    on spaces, so plain words cost one set lookup each and no regex runs over the prose. A
    form's words must be whole words separated by exactly one space.
    """
    folded = buf.replace("\u2019", "'").encode("ascii", "replace").translate(_FOLD)
    pieces = folded.split(b" ")
    offsets = list(accumulate(map(len, pieces), initial=0))  # piece i starts at offsets[i] + i
    # Candidate positions, found in C: one-word forms, and openers of longer forms followed
    # by a possible second word; Python only looks at those (a few per hundred words).
    singles, longer = lexicon.singles, lexicon.longer
    openers = map(lexicon.openers.__contains__, pieces)
    seconds = map(lexicon.seconds.__contains__, islice(pieces, 1, None))
    hits = set(compress(count(), map(singles.__contains__, pieces)))
    hits.update(compress(count(), map(and_, openers, seconds)))
    found: list[tuple[int, int, Form | None]] = []
    for i in sorted(hits):
        word = pieces[i]
        pos = offsets[i] + i
        end = pos + len(word)
        # A longer form needs its words separated by real spaces (the folded copy has a
        # space for every other character too).
        form = _longer_form(buf, pieces, i, end, longer) if buf.startswith(" ", end) else None
        if form is not None:
            found.append((pos, form[1], form[0]))
        elif word in singles:
            found.append((pos, end, singles[word]))
    specials: list[tuple[int, int, Form | None]] = [
        (m.start(), m.end(), None) for m in _SPECIAL.finditer(buf)
    ]
    if not specials:
        return _without_overlaps(found)
    return sorted(_without_overlaps(found) + specials, key=lambda span: span[0])


def _longer_form(
    buf: str, pieces: list[bytes], i: int, end: int,
    longer: Mapping[tuple[bytes, bytes], tuple[tuple[Form, tuple[bytes, ...]], ...]],
) -> tuple[Form, int] | None:
    """The longest multi-word form at piece ``i`` (whose first word ends at ``end``) and
    where it ends, or None."""
    for form, words in longer.get((pieces[i], pieces[i + 1]), ()):
        stop = end
        for k in range(1, len(words)):
            nxt = pieces[i + k] if i + k < len(pieces) else b""
            if nxt != words[k] or not buf.startswith(" ", stop):
                break
            stop += 1 + len(nxt)
        else:
            return form, stop
    return None


def _without_overlaps(found: list[tuple[int, int, Form | None]]) -> list[tuple[int, int, Form | None]]:
    """Drop forms that start inside an earlier form ("all of the" hides "of the...")."""
    out: list[tuple[int, int, Form | None]] = []
    end = -1
    for span in found:
        if span[0] >= end:
            out.append(span)
            end = span[1]
    return out


class LexicalMark:
    """One client's after-the-fact mark: rewrite each occurrence to the keyed choice.

    ``max_change_share`` caps the changes on every prefix of the text: a change is made
    only while changes so far < share × words so far, so no stretch of an answer is denser
    in changes than that.
    """

    def __init__(self, lexicon: Lexicon, seed: int, *, max_change_share: float = 0.1) -> None:
        if not 0.0 < max_change_share <= 1.0:
            raise ValueError(f"max_change_share must be in (0, 1], got {max_change_share}")
        self.lexicon = lexicon
        self.seed = seed
        self.max_change_share = max_change_share

    def rewriter(self) -> Rewriter:
        """A fresh streaming rewriter for one answer."""
        changed = 0

        def choose(occ: Occurrence) -> int | None:
            nonlocal changed
            choice = preferred(self.seed, occ.group, occ.context)
            if choice == occ.member or changed >= self.max_change_share * occ.words:
                return None
            changed += 1
            return choice

        return Rewriter(self.lexicon, choose)

    def text(self, text: str) -> str:
        """Mark a whole text (identical to streaming it through :meth:`rewriter`)."""
        return self.rewriter().flush(text)


def occurrences(text: str, lexicon: Lexicon) -> list[Occurrence]:
    """Every scoreable occurrence in ``text``, in order (what a detector reads)."""
    found: list[Occurrence] = []

    def record(occ: Occurrence) -> None:
        found.append(occ)

    Rewriter(lexicon, record).flush(text)
    return found
