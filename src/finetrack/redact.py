"""Credentials in URLs: found by parsing the URL's authority, never printed, logged or written.

A user may paste `s3://KEY:p@ss/word@bucket/run` (a password holding `@` or `/`, unescaped). A pattern
such as "the text between :// and the first @" leaks the part after the first `@`; here the userinfo is
everything after `://` up to the *last* `@` of the authority-plus-path, when what precedes that `@`
looks like credentials (it holds a `:`, or it holds no `/`). `hf://datasets/org/repo@main/file` (a
revision, not a user) keeps its `@`. The last `@` is looked for past any `?` or `#` too: those may be part of
the password (`KEY:p#ss@bucket`), and cutting there would miss the credentials. Inside free text a URL ends
only at white space or a quote (a password may hold `;`, `)`, `,`), and a URL that went through `Path()`
(`s3:/KEY:p@ss@bucket`, one slash) is a URL too. This module imports nothing heavy: the report and gate use it too.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

_STOP = " \t\r\n'\"`"  # characters that end a URL inside free text


def split_userinfo(url: str) -> tuple[str, str, str]:
    """`s3://u:p@bucket/x` -> ('s3://', 'u:p', 'bucket/x'); no credentials -> (scheme, '', rest)."""
    scheme, sep, rest = _split_scheme(url)
    if not sep:
        return "", "", url
    at = rest.rfind("@")
    if at <= 0:
        return scheme + sep, "", rest
    userinfo = rest[:at]
    if ":" in userinfo or "/" not in userinfo:
        return scheme + sep, userinfo, rest[at + 1 :]
    return scheme + sep, "", rest  # a path with an '@' in it (e.g. an hf:// revision)


def _split_scheme(url: str) -> tuple[str, str, str]:
    """'s3://b/x' -> ('s3', '://', 'b/x'); also 's3:/b/x' (a URL that went through Path()); not 'C:/x' (a drive)."""
    scheme, sep, rest = url.partition(":/")
    if not sep or len(scheme) < 2 or not scheme[0].isalpha() or not all(c.isalnum() or c in "+.-" for c in scheme):
        return "", "", url
    if rest.startswith("/"):
        sep, rest = "://", rest[1:]
    return scheme, sep, rest


def looks_like_url(text: str) -> bool:
    """`s3://...`, `https://...` (or one that went through Path(): `s3:/...`): not a local path."""
    return bool(_split_scheme(str(text))[1])


def has_credentials(url: str) -> bool:
    """Does this URL carry a user or password in its authority?"""
    return bool(split_userinfo(url)[1])


def redact_url(url: str) -> str:
    """One URL without its `user:password@` part."""
    scheme, userinfo, rest = split_userinfo(url)
    return scheme + rest if userinfo else url


def redact(text: str) -> str:
    """`text` (a URL, or free text holding URLs) with the credentials of every URL removed."""
    out, i = [], 0
    while (j := text.find(":/", i)) != -1:
        start = j
        while start > i and (text[start - 1].isalnum() or text[start - 1] in "+.-"):
            start -= 1
        end = j + 2
        while end < len(text) and text[end] not in _STOP:
            end += 1
        out.append(text[i:start])
        out.append(redact_url(text[start:end]))
        i = end
    out.append(text[i:])
    return "".join(out)


# A fragment of a secret this short is left alone: masking every "ab" in a message would garble it, and
# 3 characters say little about the secret. Longer fragments (between '@', '/' and ':') are masked.
MIN_FRAGMENT_CHARS = 4


def scrub(text: str, url: str) -> str:
    """`text` (e.g. an exception message from a storage backend) with every trace of `url`'s credentials removed:
    backends echo paths, sometimes with the password alone, percent-encoded or decoded, or cut at a '@' or '/'
    (a backend that misreads `s3://user:p@ss/word@bucket` sees a bucket `ss` and a path `word@bucket`)."""
    userinfo = split_userinfo(url)[1]
    whole = {userinfo, userinfo.partition(":")[2]}
    secrets = {form for s in whole for form in (s, unquote(s), quote(unquote(s), safe=""), quote(unquote(s)))}
    fragments = {f for s in list(secrets) for f in re.split(r"[@/:]|%40|%2F|%3A", s, flags=re.IGNORECASE) if len(f) >= MIN_FRAGMENT_CHARS}
    for secret in sorted((s for s in secrets | fragments if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return redact(text)
