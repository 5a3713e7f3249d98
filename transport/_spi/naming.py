"""Validation of every user-given name that becomes part of a topic, subject,
stream, table key or file.

One rule for all backends, so that a name accepted on ``memory://`` is also
accepted on Kafka, NATS and Pulsar: ASCII letters, digits, ``_`` and ``-``;
starting with a letter or digit; at most 100 characters; no ``__`` (reserved
for the library's own suffixes such as ``orders__p0`` or ``orders__dlq``).
That excludes every separator or wildcard of the supported brokers
(``.``, ``*``, ``>``, ``/``, ``:``, ``$``, whitespace, control characters).
"""

from __future__ import annotations

import re

from transport.errors import InvalidNameError

MAX_NAME_LENGTH = 100
#: The rules below as JSON Schema ``pattern`` keywords (docs/schemas/).
NAME_PATTERN = r"^(?!.*__)[A-Za-z0-9][A-Za-z0-9_-]{0,99}$"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,256}$"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,256}")
_FORBIDDEN_IN_VALUES = ("\r", "\n", "\x00")
MAX_HEADER_VALUE_LENGTH = 8192
MAX_ORDERING_KEY_LENGTH = 256
# C0 and C1 control characters and DEL (Unicode category Cc).
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Names already accepted (every request names its task, every delivery is
# re-validated on decode): a set lookup instead of the checks below.
_VALID_NAMES: set[str] = set()
_VALID_NAMES_MAX = 4096


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is safe as a queue/registry/ensemble name, else raise.

    Raises:
        InvalidNameError: not a string, empty, too long, or containing a
            character outside ``[A-Za-z0-9_-]``, or the reserved ``__``.
    """
    if name.__class__ is str and name in _VALID_NAMES:
        return name
    if not isinstance(name, str):
        raise InvalidNameError(what, name, "must be a string")
    if not name:
        raise InvalidNameError(what, name, "must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(what, name, f"longer than {MAX_NAME_LENGTH} characters")
    if not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            what,
            name,
            "only ASCII letters, digits, '_' and '-' are allowed, starting with a letter "
            "or digit (separators and wildcards such as . * > / : $ would change routing)",
        )
    if "__" in name:
        raise InvalidNameError(what, name, "'__' is reserved for internal names")
    if name.__class__ is str:  # not a subclass, whose hash/eq could differ
        if len(_VALID_NAMES) >= _VALID_NAMES_MAX:
            _VALID_NAMES.clear()
        _VALID_NAMES.add(name)
    return name


def validate_request_id(request_id: object) -> str:
    """Return ``request_id`` if usable as a key on every backend, else raise.

    Raises:
        InvalidNameError: not 1-128 characters of ``[A-Za-z0-9_-]``.
    """
    if not isinstance(request_id, str) or not _REQUEST_ID_RE.fullmatch(request_id):
        raise InvalidNameError(
            "request id", request_id, "must be 1-128 characters of A-Z a-z 0-9 _ -"
        )
    return request_id


def validate_ordering_key(key: object) -> str:
    """Return ``key`` if usable as a message key on every backend, else raise.

    Raises:
        InvalidNameError: not a string of 1-256 characters, or containing a
            control character or a lone surrogate (not encodable as UTF-8).
    """
    if not isinstance(key, str):
        raise InvalidNameError("ordering key", key, "must be a string")
    if not key:
        raise InvalidNameError("ordering key", key, "must not be empty")
    if len(key) > MAX_ORDERING_KEY_LENGTH:
        raise InvalidNameError(
            "ordering key", key, f"longer than {MAX_ORDERING_KEY_LENGTH} characters"
        )
    if _CONTROL_RE.search(key):
        raise InvalidNameError("ordering key", key, "must not contain control characters")
    _require_utf8("ordering key", key)
    return key


def _require_utf8(kind: str, text: str) -> None:
    """Raise if ``text`` cannot be sent as UTF-8 (a lone surrogate)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidNameError(
                kind, text, "must be valid Unicode text (no lone surrogates)"
            ) from None


def validate_header(key: object, value: object) -> None:
    """Raise if a header could break a wire protocol's header block.

    Raises:
        InvalidNameError: bad header name, or a value with CR, LF or NUL or
            a lone surrogate (not encodable as UTF-8, so not sendable).
    """
    if not isinstance(key, str) or not _HEADER_NAME_RE.fullmatch(key):
        raise InvalidNameError("header name", key, "must be an HTTP token (no spaces or colons)")
    if not isinstance(value, str):
        raise InvalidNameError("header value", value, "must be a string")
    if len(value) > MAX_HEADER_VALUE_LENGTH:
        raise InvalidNameError("header value", value, "longer than 8192 characters")
    if any(ch in value for ch in _FORBIDDEN_IN_VALUES):
        raise InvalidNameError("header value", value, "must not contain CR, LF or NUL")
    _require_utf8("header value", value)


def internal_name(base: str, suffix: str) -> str:
    """Build a library-owned name such as ``orders__dlq`` from a validated base."""
    return f"{base}__{suffix}"
