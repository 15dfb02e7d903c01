"""Shell-text helpers for :mod:`smolvm.guards.safety`.

bashlex (the parser SafetyGuard uses) implements most of bash's grammar but raises on a few
constructs that agents type every day: ``[[ ... ]]``, ``$(( ... ))``, ``case``, ``time``,
arrays and here-documents with a quoted delimiter. When bashlex fails, the guard rewrites
those constructs into parseable text *that still contains every command the original
could run* (command substitutions inside an arithmetic or test expression are kept) and
parses again. Nothing here executes or expands anything.
"""

from __future__ import annotations

import re

_KEYWORD_BEFORE = ("then", "do", "else", "elif", "if", "while", "until", "!", "{", "time")


def quote_levels(s: str) -> list[int]:
    """Per character of ``s``: 0 = unquoted, 1 = inside double quotes (``$`` active),
    2 = inert (single-quoted, ANSI-C quoted, backslash-escaped, or a quote character).

    Command substitutions ``$(...)`` and backticks open a fresh unquoted context, also
    inside double quotes.
    """
    n = len(s)
    out = [0] * n
    # stack of contexts: "top", "dq", "sub" (paren depth tracked separately), "bt"
    stack: list[list] = [["top", 0]]
    i = 0
    while i < n:
        ctx = stack[-1]
        kind = ctx[0]
        c = s[i]
        in_dq = kind == "dq"
        if c == "\\" and i + 1 < n:
            out[i] = out[i + 1] = 2
            i += 2
            continue
        if in_dq:
            if c == '"':
                out[i] = 2
                stack.pop()
                i += 1
                continue
            if c == "$" and s.startswith("$(", i):
                out[i] = out[i + 1] = 1
                stack.append(["sub", 1])
                i += 2
                continue
            if c == "`":
                out[i] = 1
                stack.append(["bt", 0])
                i += 1
                continue
            out[i] = 1
            i += 1
            continue
        # unquoted-like contexts: top, sub, bt
        if c == "'":
            j = s.find("'", i + 1)
            j = n - 1 if j < 0 else j
            for k in range(i, j + 1):
                out[k] = 2
            i = j + 1
            continue
        if c == "$" and s.startswith("$'", i):
            j = i + 2
            while j < n and s[j] != "'":
                j += 2 if s[j] == "\\" else 1
            j = min(j, n - 1)
            for k in range(i, j + 1):
                out[k] = 2
            i = j + 1
            continue
        if c == '"':
            out[i] = 2
            stack.append(["dq", 0])
            i += 1
            continue
        if c == "`":
            if kind == "bt":
                stack.pop()
            else:
                stack.append(["bt", 0])
            i += 1
            continue
        if kind == "sub":
            if c == "(":
                ctx[1] += 1
            elif c == ")":
                ctx[1] -= 1
                if ctx[1] == 0:
                    stack.pop()
                    i += 1
                    continue
        elif c == "$" and s.startswith("$(", i):
            stack.append(["sub", 1])
            i += 2
            continue
        i += 1
    return out


def extract_substitutions(text: str) -> list[str]:
    """Return the inner text of every top-level ``$(...)`` and backtick substitution in
    ``text``, treating single quotes as literal characters (as in a here-document body or
    an arithmetic expression)."""
    subs: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if text.startswith("$(", i):
            j = _match_paren(text, i + 1)
            if j is None:
                subs.append(text[i + 2 :])
                break
            inner = text[i + 2 : j]
            if inner.startswith("(") and inner.endswith(")"):  # $(( arithmetic ))
                subs.extend(extract_substitutions(inner[1:-1]))
            else:
                subs.append(inner)
            i = j + 1
            continue
        if c == "`":
            j = i + 1
            while j < n and text[j] != "`":
                j += 2 if text[j] == "\\" else 1
            subs.append(text[i + 1 : j].replace("\\`", "`"))
            i = j + 1
            continue
        i += 1
    return [s for s in subs if s.strip()]


def _match_paren(s: str, open_idx: int, levels: list[int] | None = None) -> int | None:
    """Index of the ``)`` matching the ``(`` at ``open_idx`` (quotes respected)."""
    depth = 0
    i, n = open_idx, len(s)
    while i < n:
        c = s[i]
        if levels is not None and levels[i] == 2:
            i += 1
            continue
        if levels is None:
            if c == "\\":
                i += 2
                continue
            if c == "'":
                j = s.find("'", i + 1)
                if j < 0:
                    return None
                i = j + 1
                continue
            if c == '"':
                j = i + 1
                while j < n and s[j] != '"':
                    j += 2 if s[j] == "\\" else 1
                i = j + 1
                continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _at_command_position(s: str, i: int) -> bool:
    prefix = s[:i].rstrip(" \t")
    if not prefix or prefix[-1] in ";&|(){}\n`":
        return True
    m = re.search(r"(\S+)$", prefix)
    return bool(m and m.group(1) in _KEYWORD_BEFORE)


def _word_at(s: str, levels: list[int], word: str) -> list[int]:
    """Unquoted occurrences of ``word`` as a whole word, at command position."""
    out = []
    for m in re.finditer(r"(?<![\w\-./$])" + re.escape(word) + r"(?![\w\-./=])", s):
        i = m.start()
        if all(levels[k] == 0 for k in range(i, m.end())) and _at_command_position(s, i):
            out.append(i)
    return out


def _subs_replacement(inner: str) -> str:
    subs = extract_substitutions(inner)
    return "$(:" + "".join(f" $({x})" for x in subs) + ")"


def _rewrite_arithmetic(s: str) -> str:
    for _ in range(64):
        levels = quote_levels(s)
        hit = None
        for m in re.finditer(r"\$\(\(|\$\[", s):
            if levels[m.start()] != 2:
                hit = m
                break
        if hit is None:
            return s
        i = hit.start()
        if s[i + 1] == "[":
            j = s.find("]", i)
            if j < 0:
                return s
            s = s[:i] + _subs_replacement(s[i + 2 : j]) + s[j + 1 :]
            continue
        end = _match_paren(s, i + 1, levels)
        if end is None:
            return s
        s = s[:i] + _subs_replacement(s[i + 3 : end - 1]) + s[end + 1 :]
    return s


def _rewrite_double_brackets(s: str) -> str:
    for _ in range(64):
        levels = quote_levels(s)
        starts = [i for i in _word_at(s, levels, "[[")]
        if not starts:
            return s
        i = starts[0]
        end = None
        for m in re.finditer(r"(?<=\s)\]\](?=$|[\s;&|)])", s[i:]):
            k = i + m.start()
            if levels[k] == 0:
                end = k
                break
        if end is None:
            return s
        s = s[:i] + ": " + _subs_replacement(s[i + 2 : end]) + s[end + 2 :]
    return s


def _rewrite_arith_for(s: str) -> str:
    """``for ((i=0; i<n; i++))`` → ``for _ in $(: ...)`` (the loop body is kept)."""
    for _ in range(64):
        levels = quote_levels(s)
        hit = None
        for m in re.finditer(r"\bfor\s*\(\(", s):
            if levels[m.start()] == 0 and _at_command_position(s, m.start()):
                hit = m
                break
        if hit is None:
            return s
        open_idx = hit.end() - 2
        j = _match_paren(s, open_idx, levels)
        if j is None:
            return s
        s = s[: hit.start()] + "for _ in " + _subs_replacement(s[open_idx + 2 : j - 1]) + s[j + 1 :]
    return s


def _rewrite_keywords(s: str) -> str:
    levels = quote_levels(s)
    for i in reversed(_word_at(s, levels, "time")):
        m = re.match(r"time(\s+-p)?\s*", s[i:])
        assert m is not None
        s = s[:i] + s[i + m.end() :]
    levels = quote_levels(s)
    for i in reversed(_word_at(s, levels, "coproc")):
        m = re.match(r"coproc\s+(\w+\s+(?=\{))?", s[i:])
        assert m is not None
        s = s[:i] + s[i + m.end() :]
    levels = quote_levels(s)
    for i in reversed(_word_at(s, levels, "select")):
        s = s[:i] + "for" + s[i + 6 :]
    return s


def _rewrite_arrays(s: str) -> str:
    for _ in range(64):
        levels = quote_levels(s)
        hit = None
        for m in re.finditer(r"(?<![\w$])([A-Za-z_]\w*)\+?=\(", s):
            if levels[m.start()] == 0:
                hit = m
                break
        if hit is None:
            return s
        open_idx = hit.end() - 1
        j = _match_paren(s, open_idx, levels)
        if j is None:
            return s
        content = s[open_idx + 1 : j].replace("\n", " ")
        s = s[: hit.start()] + f"{hit.group(1)}=$(: {content})" + s[j + 1 :]
    return s


def _rewrite_case(s: str) -> str:
    """``case W in p) A;; q) B;; esac`` → ``{ : W; { A\\n:; }; { B\\n:; }; }``."""
    for _ in range(64):
        levels = quote_levels(s)
        starts = _word_at(s, levels, "case")
        if not starts:
            return s
        i = starts[-1]  # the last one contains no other case
        m = re.compile(r"case\s+(.*?)\s+in\b", re.S).match(s, i)
        if m is None:
            return s
        out = ["{ : " + m.group(1) + "; "]
        k = m.end()
        n = len(s)
        closed = False
        while k < n:
            while k < n and s[k] in " \t\n;":
                k += 1
            if s.startswith("esac", k) and (k + 4 == n or not (s[k + 4].isalnum() or s[k + 4] == "_")):
                out.append("}")
                k += 4
                closed = True
                break
            # pattern up to an unquoted ')'
            if k < n and s[k] == "(":
                k += 1
            while k < n and not (s[k] == ")" and levels[k] == 0):
                k += 1
            k += 1
            # body up to ;; ;& ;;& or esac at command position
            body_start = k
            while k < n:
                if levels[k] == 0 and (s.startswith(";;", k) or s.startswith(";&", k)):
                    break
                if (
                    levels[k] == 0
                    and s.startswith("esac", k)
                    and _at_command_position(s, k)
                    and (k + 4 == n or not (s[k + 4].isalnum() or s[k + 4] == "_"))
                ):
                    break
                k += 1
            out.append("{ " + s[body_start:k] + "\n:; }; ")
            if s.startswith(";;&", k):
                k += 3
            elif k < n and s[k] == ";":
                k += 2
        if not closed:
            return s
        s = s[:i] + "".join(out) + s[k:]
    return s


_HEREDOC_QUOTED = re.compile(r"<<(-?)\s*(?:'([^'\n]+)'|\"([^\"\n]+)\"|\\(\w+))")


def unquote_heredoc_delimiters(s: str) -> tuple[str, set[str]]:
    """Rewrite ``<<'EOF'`` / ``<<"EOF"`` / ``<<\\EOF`` to ``<<EOF`` (bashlex cannot parse the
    quoted forms) and return the delimiter names whose bodies are therefore literal."""
    quoted: set[str] = set()

    def repl(m: re.Match[str]) -> str:
        name = m.group(2) or m.group(3) or m.group(4)
        quoted.add(name)
        return f"<<{m.group(1)}{name}"

    return _HEREDOC_QUOTED.sub(repl, s), quoted


def rewrite_unsupported(s: str) -> str:
    """Apply every rewrite; each is a no-op when its construct is absent."""
    for fn in (
        _rewrite_arith_for,
        _rewrite_arithmetic,
        _rewrite_double_brackets,
        _rewrite_case,
        _rewrite_arrays,
        _rewrite_keywords,
    ):
        try:
            s = fn(s)
        except (IndexError, ValueError, AssertionError):  # pragma: no cover - defensive
            pass
    return s


_ANSI_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
    "e": "\x1b",
    "E": "\x1b",
    "\\": "\\",
    "'": "'",
    '"': '"',
    "?": "?",
}


def shell_unquote(raw: str) -> str:
    """Remove shell quoting from one word, including ANSI-C ``$'...'`` (which bashlex does
    not decode). Expansions are left as text."""
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == "\\" and i + 1 < n:
            if raw[i + 1] != "\n":  # backslash-newline is a line continuation
                out.append(raw[i + 1])
            i += 2
        elif c == "'":
            j = raw.find("'", i + 1)
            j = n if j < 0 else j
            out.append(raw[i + 1 : j])
            i = j + 1
        elif c == "$" and raw.startswith("$'", i):
            i += 2
            while i < n and raw[i] != "'":
                if raw[i] == "\\" and i + 1 < n:
                    e = raw[i + 1]
                    if e in _ANSI_ESCAPES:
                        out.append(_ANSI_ESCAPES[e])
                        i += 2
                    elif e == "x":
                        m = re.match(r"[0-9a-fA-F]{1,2}", raw[i + 2 :])
                        out.append(chr(int(m.group(0), 16)) if m else "x")
                        i += 2 + (len(m.group(0)) if m else 0)
                    elif e in "01234567":
                        m = re.match(r"[0-7]{1,3}", raw[i + 1 :])
                        assert m is not None
                        out.append(chr(int(m.group(0), 8)))
                        i += 1 + len(m.group(0))
                    else:
                        out.append("\\" + e)
                        i += 2
                else:
                    out.append(raw[i])
                    i += 1
            i += 1
        elif c == '"':
            i += 1
            while i < n and raw[i] != '"':
                if raw[i] == "\\" and i + 1 < n and raw[i + 1] in '$`"\\\n':
                    out.append(raw[i + 1])
                    i += 2
                else:
                    out.append(raw[i])
                    i += 1
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand_braces(word: str, limit: int = 64) -> list[str]:
    """Expand simple ``{a,b}`` brace lists (no nesting across quotes), capped at ``limit``."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not m:
        return [word]
    out: list[str] = []
    for alt in m.group(1).split(","):
        for w in expand_braces(word[: m.start()] + alt + word[m.end() :], limit):
            out.append(w)
            if len(out) >= limit:
                return out
    return out
