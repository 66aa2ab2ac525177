"""The code states the design: its comments and docstrings say why, and leave to the docs and the commit messages
when something happened and under which tracker number (a repository's readers cannot see our tracker, and a
dated fact goes stale in a comment where no command sits beside it to check it again)."""

import io
import re
import subprocess
import tokenize

import pytest

from conftest import REPO_DIR

# what no comment or docstring may hold: a tracker's number, a date, a time of day. (A measured duration reads like
# a synthetic one, as a test's fake clock: review finds those.)
FORBIDDEN = {
    "a tracker's number": r"\bissues? #?\d|\bPR #?\d|\bpull request #?\d|[\w.-]+/[\w.-]+#\d|(?<![\w&])#\d+\b",
    "a date": r"\b(19|20)\d\d-\d\d-\d\d\b",
    "a time of day": r"\b\d\d:\d\d(:\d\d)? ?(UTC|GMT)\b|\bUTC\b",
}


def comments_and_docstrings(source):
    """(line number, text) of every comment and docstring (a string that is a statement of its own)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    depth = 0  # open brackets: a string inside them (a call's argument, a long string's pieces) is data
    for i, token in enumerate(tokens):
        if token.type == tokenize.OP and token.string in "([{":
            depth += 1
        elif token.type == tokenize.OP and token.string in ")]}":
            depth -= 1
        statement = token.type == tokenize.STRING and depth == 0 and (i == 0 or tokens[i - 1].type in (
            tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE, tokenize.NL))
        if token.type == tokenize.COMMENT or statement:
            for offset, line in enumerate(token.string.splitlines()):
                yield token.start[0] + offset, line


def python_files():
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_DIR, capture_output=True, text=True, check=True)
    return [REPO_DIR / name for name in listed.stdout.split()]


def test_the_patterns_catch_what_they_are_for():
    # a source file that holds each forbidden thing, put together here so that this file itself holds none
    hash_, iss, date, clock = "#", "issue", "-".join(["2026", "12", "06"]), ":".join(["14", "05"])
    source = (f'"""Step times: 0.92 s per step; see {iss} 18."""\n'
              f"x = 1  {hash_} the run of {date}, {clock} {'U' + 'TC'}, took 8.5 minutes (cloudpipe/cloudpickle{hash_}405)\n"
              f"y = '{hash_}1 {iss} 2 in a string is data'  {hash_} colour {hash_}ff0000, 3 x faster, 1:02:05 as a format\n")
    found = {(line, name) for line, text in comments_and_docstrings(source)
             for name, pattern in FORBIDDEN.items() if re.search(pattern, text)}
    assert found == {(1, "a tracker's number"), (2, "a date"), (2, "a time of day"), (2, "a tracker's number")}


@pytest.mark.parametrize("name", FORBIDDEN)
def test_no_comment_or_docstring_holds(name):
    hits = [f"{path.relative_to(REPO_DIR)}:{line}: {text.strip()}" for path in python_files()
            for line, text in comments_and_docstrings(path.read_text()) if re.search(FORBIDDEN[name], text)]
    assert not hits, "\n".join(hits)
