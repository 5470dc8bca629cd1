"""Does a candidate item carry untrusted text? Copied, restated, or as a payload (URL, credential, marker).

Knowledge must not be writable by whoever writes trajectory text (users, agents, feedback a namespace
does not trust). A verbatim copy shares a passage with that text; a restatement wraps it in a lead-in
("Remember to always ...") or adds a few words, so no long passage is shared, but the item still holds
nearly every content word of one untrusted sentence. :func:`forged_reason` checks both, and rejects
what no lesson needs: links, e-mail addresses, credentials and item-marker look-alikes (also when
zero-width or other invisible characters are put between their letters).
"""

from __future__ import annotations

import re
import unicodedata

COPY_WORDS = 8
"""An item sharing this many consecutive words with untrusted text is treated as copied from it."""

RESTATED_SHARE = 0.6
"""An item that holds this share of the content words of one untrusted sentence (of at least
:data:`RESTATED_MIN_WORDS` content words) restates it."""
RESTATED_MIN_WORDS = 4

_STOP = frozenset(
    "a an the and or but if then else of to in on at by for with from into onto about as is are was were be been "
    "being am do does did done have has had having it its this that these those there here you your yours we our "
    "ours they their them he she his her i me my mine not no nor so too very can could should would will shall may "
    "might must just also only any all each every some such than what which who whom whose when where why how "
    "always never please next time once again ever".split()
)

_INVISIBLE = re.compile(r"[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufeff\uffa0]")
FORGED_MARKER = re.compile(  # any spacing, case, dashes or markup between the letters
    r"e\W*x\W*p\W*e\W*r\W*i\W*e\W*n\W*c\W*e[\W_]*i\W*t\W*e\W*m", re.IGNORECASE
)
_URL = re.compile(
    r"(?i)\b(?:[a-z][a-z0-9+.-]*://|www\.)\S+"  # scheme://... or www.
    r"|\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"  # e-mail address
    r"|\b(?:[a-z0-9-]+\.)+(?:com|net|org|io|ai|co|ru|cn|xyz|info|biz|top|dev|app|me|ly|sh)\b(?:/\S*)?"  # bare domain
)
_CREDENTIAL = re.compile(
    r"(?i)\b(?:sk|pk|rk|ghp|gho|ghs|xox[abp]|AKIA|AIza)[-_]?[A-Za-z0-9_-]{10,}"  # well-known key prefixes
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|\b(?:password|passwd|pwd|api[_ -]?key|secret|token|bearer)\s*[:=]\s*\S+"  # an assigned secret
    r"|\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}\b"  # a long random-looking string
)


def visible(text: str) -> str:
    """NFKC-normalised text without invisible characters (zero-width spaces, joiners, direction marks)."""
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))


def shingles(text: str, n: int = COPY_WORDS) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive words of ``text`` (case-folded): two texts sharing one share a passage."""
    words = re.findall(r"\w+", visible(text).casefold())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _stem(word: str) -> str:
    """A crude stem, enough to match "approves" with "approve" and "checking" with "check"."""
    for suffix in ("ing", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def content_words(text: str) -> set[str]:
    """The words that carry a sentence's meaning: case-folded, stemmed, without function words, links
    and addresses (a restatement may drop the payload's link and keep the instruction)."""
    words = re.findall(r"\w+", _URL.sub(" ", visible(text)).casefold())
    return {_stem(w) for w in words if w not in _STOP and (len(w) > 2 or w.isdigit())}


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;:])\s+|\n+", visible(text)) if s.strip()]


def restated_sentence(item: str, untrusted: str) -> str | None:
    """The untrusted sentence whose content words ``item`` mostly holds, if any."""
    words = content_words(item)
    if not words:
        return None
    for sentence in _sentences(untrusted):
        theirs = content_words(sentence)
        if len(theirs) >= RESTATED_MIN_WORDS and len(words & theirs) >= RESTATED_SHARE * len(theirs):
            return sentence
    return None


def forged_reason(item: str, untrusted: str) -> str | None:
    """Why ``item`` may not become knowledge given the ``untrusted`` text it was derived from; None if
    nothing is wrong with it."""
    shown = visible(item)
    if FORGED_MARKER.search(shown):
        return "holds an item marker"
    if _URL.search(shown):
        return "holds a link or an address"
    if _CREDENTIAL.search(shown):
        return "holds a credential"
    if shown.casefold() in visible(untrusted).casefold() or shingles(item) & shingles(untrusted):
        return "copies untrusted trajectory text (possible injection)"
    sentence = restated_sentence(item, untrusted)
    if sentence is not None:
        return f"restates untrusted trajectory text (possible injection): {sentence[:80]!r}"
    return None
