#!/usr/bin/env python3
"""Stamp the platform's public URL into the companion Action as its default (release time).

    python actions/cast/stamp.py --api-url https://spells.example.com [--file action.yml]

The source tree's ``action.yml`` carries no platform URL: its composite step has the line
``SPELL_ACTION_DEFAULT_API_URL: ""``. The release workflow (``action-tag`` job) runs this script
on the tagged commit and moves the major tag (``v1``) to the stamped commit, so
``uses: OWNER/spell-platform@v1`` works with no ``api-url`` and no ``SPELL_API_URL``.

Why an ``env:`` line of the step and not the ``default:`` of the ``api-url`` input: the runner
cannot tell an input's default from a value the caller wrote, so a stamped input default would
beat ``SPELL_API_URL`` in the caller's env. ``cast.py`` reads, in this order, the ``api-url``
input, ``SPELL_API_URL``, then this stamped default.

The edit is textual: only the value on that one line changes (comments, order, quoting style of
everything else and line endings are kept byte for byte); stamping twice with the same URL
leaves the file as it is. The URL is checked exactly as ``cast.py`` checks ``api-url`` (its
``check_api_url``), plus: only RFC 3986 characters, so the value can never hold a ``${{ }}``
expression the runner would evaluate. Exit status 0 when stamped (or already stamped), 2 for a
bad URL or a file without the line.

Standard library only, Python 3.8+ (like ``cast.py``, which it imports from its own directory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from cast import ActionError, check_api_url  # noqa: E402

ENV_NAME = "SPELL_ACTION_DEFAULT_API_URL"
# `NAME: value  # comment` with the value plain, "double" or 'single' quoted.
LINE_RE = re.compile(
    r"^(?P<head>[ \t]+" + ENV_NAME + r":[ \t]*)"
    r"(?P<value>\"(?:[^\"\\\r\n]|\\.)*\"|'(?:[^'\r\n]|'')*'|[^\s#]*)"
    r"(?P<tail>[ \t]+#[^\r\n]*|[ \t]*)"
    r"(?P<eol>\r?\n?)$"
)
INPUT_RE = re.compile(r"\$\{\{\s*inputs\.api-url\s*\}\}")
URL_CHARS = re.compile(r"^[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+$")


class StampError(Exception):
    pass


def public_url(url: str) -> str:
    """The URL as ``cast.py`` will use it, or :class:`StampError` saying why it cannot be."""
    if not url:
        raise StampError("--api-url is empty: the platform's public URL is needed")
    if not URL_CHARS.match(url):
        raise StampError(
            f"{url!r} is not a URL: only RFC 3986 characters (no spaces, quotes, braces)"
        )
    try:
        return check_api_url(url)
    except ActionError as e:
        raise StampError(e.message.replace("`api-url`", "--api-url")) from None


def stamp_text(text: str, url: str) -> str:
    """``text`` (an action.yml) with the stamped default set to ``url`` (already checked)."""
    lines = text.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if LINE_RE.match(line)]
    if len(found) != 1:
        raise StampError(
            f"expected exactly one `{ENV_NAME}:` line in the composite step's env, "
            f"found {len(found)}"
        )
    if not INPUT_RE.search(text):
        raise StampError("the file never passes `${{ inputs.api-url }}` to the script")
    m = LINE_RE.match(lines[found[0]])
    assert m is not None
    head = m.group("head")
    if not head.endswith((" ", "\t")):
        head += " "  # `NAME:` with no value at all: YAML needs the space
    # JSON's string syntax is YAML's double-quoted scalar; the URL has no escapes anyway.
    lines[found[0]] = head + json.dumps(url) + m.group("tail") + m.group("eol")
    return "".join(lines)


def stamp_file(path: Path, url: str) -> bool:
    """Stamp ``path`` in place; False when it already carried ``url`` (nothing written)."""
    clean = public_url(url)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StampError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StampError(f"{path} is not UTF-8") from None
    new = stamp_text(text, clean)
    if new == text:
        return False
    fd, tmp = tempfile.mkstemp(prefix=".stamp-", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(new.encode("utf-8"))
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stamp.py",
        description="Stamp the platform's public URL into action.yml as the Action's default.",
    )
    parser.add_argument("--api-url", required=True, help="e.g. https://spells.example.com")
    parser.add_argument(
        "--file",
        default=str(HERE.parent.parent / "action.yml"),
        help="the action.yml to edit (default: the repository root's)",
    )
    args = parser.parse_args(argv)
    path = Path(args.file)
    try:
        changed = stamp_file(path, args.api_url.strip())
    except StampError as e:
        print(f"stamp.py: error: {e}", file=sys.stderr)
        return 2
    url = public_url(args.api_url.strip())
    print(f"{path}: {ENV_NAME} {'set to' if changed else 'already'} {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
