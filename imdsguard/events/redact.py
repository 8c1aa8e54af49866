"""Take secrets out of command lines before they reach an event or a log line.

A command line that talks to IMDS often carries a secret: the IMDSv2 token
in a header, keys just fetched, a database password. Events are for people
to read, so the program, its flags and everything harmless stay; values go.

What is redacted (``[redacted]`` in their place), in every argument and,
re-split with shell rules, inside arguments that are themselves commands
(``sh -c '...'``, ``bash -lc``, ``ssh host '...'``):

- keyed values anywhere in an argument: ``NAME: value`` (HTTP headers,
  JSON, YAML) and ``NAME=value`` (environment, query strings, ``--opt=``)
  where NAME says token, secret, password, credential, key, auth, cookie or
  session (``X-aws-ec2-metadata-token``, ``Authorization``,
  ``AWS_SECRET_ACCESS_KEY``, ``SecretAccessKey``). An argument that *is*
  the pair (``-H 'X-aws-ec2-metadata-token: v'``, ``--header=...``) loses
  everything after the separator; inside a script, the quoted or
  whitespace-delimited value;
- the value of an option whose name says so, in every spelling:
  ``--password x``, ``--password=x``, ``-password x``, and the short
  options that mean a secret in the common tools: ``-p x``/``-px`` (mysql,
  sshpass, ``-phunter2``), ``-t tok``; the password half of ``-u user:pw``
  / ``--user`` (curl) and of ``scheme://user:pw@host``;
- the word after a positional name (``aws configure set
  aws_secret_access_key VALUE``, ``... aws_session_token VALUE``);
- anything shaped like an AWS secret: access key ids (``AKIA``/``ASIA``
  and the other IAM prefixes, 20 characters), 40-character secret access
  keys, and long base64 runs (session tokens, IMDSv2 tokens, JWTs), however
  they got there.

Over-redaction is the cheaper mistake (a port after ``-p`` is lost), but the
program and its flags always stay, so an event still says what ran.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

REDACTED = "[redacted]"
_DEPTH = 2  # scripts inside scripts: re-split this deep

_WORDS = (
    r"secret|passw(?:or)?d|passphrase|pwd|token|credential|api[_-]?key|access[_-]?key"
    r"|private[_-]?key|auth|cookie|session"
)
_SECRET_NAME = re.compile(_WORDS, re.I)
#: Names that contain a secret word but hold none: a token's TTL, a file holding the secret.
_HARMLESS_NAME = re.compile(r"(?:ttl|ttl[_-]seconds|file|path|dir)$", re.I)

#: ``NAME<quote?><sep><quote?>`` where NAME holds a secret word; the value follows.
_KEYED = re.compile(
    r"(?<![A-Za-z0-9_.-])(?P<name>[A-Za-z0-9_.-]*(?:" + _WORDS + r")[A-Za-z0-9_.-]*)"
    r"(?P<close>[\"']?)[ \t]*(?P<sep>[:=])(?![:=])[ \t]*(?P<open>[\"']?)",
    re.I,
)
#: An argument that is ``--option=`` then the pair (``--header=X-...-token: v``).
_OPTION_PREFIX = re.compile(r"-{1,2}[A-Za-z0-9][A-Za-z0-9_.-]*=")
_AUTH_SCHEME = re.compile(r"(?:Bearer|Basic|Digest|Token|AWS4-HMAC-SHA256|Negotiate)$", re.I)
_UNQUOTED_END = re.compile(r"[\s\"'&;|<>)]")
_URL_PASSWORD = re.compile(r"(://[^/@\s:]+:)[^/@\s]+@")

#: Short options whose value is a secret in common tools (``-p`` mysql/sshpass, ``-t`` token).
_SHORT_SECRET = frozenset({"-p", "-t"})
#: Options whose value is ``user:password`` (curl, wget's --user is the user alone).
_USERPASS = frozenset({"-u", "--user", "--proxy-user", "-U"})
#: Positional names after which the next word is the secret (``aws configure set NAME VALUE``).
_POSITIONAL = re.compile(
    r"(?:^|[._])(?:aws_secret_access_key|aws_session_token|aws_security_token"
    r"|secret_access_key|session_token|secret|password|passwd|token|api_key)$",
    re.I,
)

_ACCESS_KEY_ID = re.compile(
    r"(?<![A-Za-z0-9])(?:AKIA|ASIA|AIDA|AROA|AIPA|ANPA|ANVA|AGPA|ABIA|ACCA)[A-Z0-9]{16}"
    r"(?![A-Za-z0-9])"
)
_SECRET_KEY = re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9/+_-])[A-Za-z0-9/+_-]{32,}={0,2}(?![A-Za-z0-9/+=_-])")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


def _secret_name(name: str) -> bool:
    name = name.strip("-:= \"'")
    return bool(_SECRET_NAME.search(name)) and not _HARMLESS_NAME.search(name)


def _mixed(text: str) -> bool:
    """Upper, lower and digit: random material, not a word, a hex hash or a flag."""
    return (
        any(c.isupper() for c in text)
        and any(c.islower() for c in text)
        and any(c.isdigit() for c in text)
    )


_WORDY = re.compile(r"[A-Za-z][a-z]*[0-9]*|[A-Z]+[0-9]*|[0-9]+")


def _words(run: str) -> bool:
    """``X-aws-ec2-metadata-token-ttl-seconds``: short words joined, not random material."""
    parts = re.split(r"[-_/.+]", run.rstrip("="))
    return len(parts) > 1 and all(len(p) < 16 and _WORDY.fullmatch(p) for p in parts if p)


def _shapes(text: str) -> str:
    """Mask what looks like an AWS key id, secret key or token wherever it is."""
    text = _JWT.sub(REDACTED, text)
    text = _ACCESS_KEY_ID.sub(REDACTED, text)
    text = _SECRET_KEY.sub(lambda m: REDACTED if _mixed(m.group()) else m.group(), text)

    def long_token(m: re.Match[str]) -> str:
        run = m.group()
        if not _mixed(run) or _words(run):
            return run  # a path, a flag or hyphenated words: not random material
        return REDACTED

    return _LONG_TOKEN.sub(long_token, text)


def _value_end(text: str, start: int, quote: str, whole: bool) -> int:
    """Where the value starting at ``start`` ends (see :func:`_keyed`)."""
    if quote:
        end = text.find(quote, start)
        return len(text) if end < 0 else end
    if whole:
        return len(text)
    found = _UNQUOTED_END.search(text, start)
    end = len(text) if found is None else found.start()
    if _AUTH_SCHEME.match(text[start:end]):  # "Authorization: Bearer X": X too
        nxt = re.match(r"[ \t]+", text[end:])
        if nxt:
            found = _UNQUOTED_END.search(text, end + nxt.end())
            end = len(text) if found is None else found.start()
    return end


def _keyed(text: str) -> str:
    """``NAME: value`` / ``NAME=value`` with a secret NAME, anywhere in ``text``."""
    out: list[str] = []
    pos = 0
    for m in _KEYED.finditer(text):
        if m.start() < pos or not _secret_name(m.group("name")):
            continue
        head = text[: m.start()]
        # The whole argument is the pair (or --option= then the pair): all the rest is value.
        whole = head == "" or bool(_OPTION_PREFIX.fullmatch(head))
        quote = m.group("open")
        start = m.end()
        end = _value_end(text, start, quote, whole and not quote)
        if end == start:
            continue  # nothing after the separator
        out.append(text[pos:start])
        out.append(REDACTED)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _redact_text(arg: str, depth: int) -> str:
    """One argument: URL passwords, keyed values, shapes, and scripts re-split."""
    text = _URL_PASSWORD.sub(rf"\g<1>{REDACTED}@", arg)
    text = _keyed(text)
    if depth < _DEPTH and any(c.isspace() for c in text):
        text = _script(text, depth + 1)
    return _shapes(text)


def _script(text: str, depth: int) -> str:
    """``text`` as a shell command: redact its words as arguments, keep its layout."""
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    if len(words) < 2:
        return text
    redacted = _redact_list(words, depth)
    changed = [(w, r) for w, r in zip(words, redacted) if w != r]
    for word, new in sorted(changed, key=lambda wr: -len(wr[0])):
        if word in text:
            text = text.replace(word, new)
        else:  # quoting made the word differ from its spelling: fall back to the words
            return shlex.join(redacted)
    return text


def _is_flag(arg: str) -> bool:
    return len(arg) > 1 and arg[0] == "-" and not arg[1:2].isdigit()


def _redact_list(args: list[str], depth: int) -> list[str]:
    out: list[str] = []
    redact_next = False
    userpass_next = False
    for raw in args:
        if redact_next and not (_is_flag(raw) and raw.lstrip("-")):
            out.append(REDACTED)
            redact_next = False
            continue
        if userpass_next and not _is_flag(raw):
            user, sep, _ = raw.partition(":")
            out.append(f"{user}:{REDACTED}" if sep else raw)
            userpass_next = False
            continue
        redact_next = userpass_next = False
        arg = _redact_text(raw, depth)
        if arg == raw and _is_flag(raw):
            name, eq, _ = raw.partition("=")
            if raw in _SHORT_SECRET:
                redact_next = True
            elif raw[:2] in _SHORT_SECRET and not raw.startswith("--") and len(raw) > 2:
                arg = raw[:2] + REDACTED  # -phunter2, -ttok
            elif raw in _USERPASS:
                userpass_next = True
            elif not eq and len(name.lstrip("-")) > 1 and _secret_name(name):
                redact_next = True  # --password x, -password x
        elif not _is_flag(raw) and _POSITIONAL.search(raw):
            redact_next = True
        out.append(arg)
    return out


def redact_args(args: Iterable[str]) -> tuple[str, ...]:
    """``args`` (a command line) with secret values replaced by ``[redacted]``.

    See the module docstring for what counts as a secret.
    """
    return tuple(_redact_list(list(args), 0))
