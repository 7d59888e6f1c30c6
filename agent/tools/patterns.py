"""Glob patterns as regular expressions: `*` and `?` within one component, `[...]`, `**` any depth."""

from __future__ import annotations

import re


def compile_glob(pattern: str) -> re.Pattern[str]:
    out = []
    at = 0
    while at < len(pattern):
        char = pattern[at]
        if pattern.startswith("**/", at):
            out.append("(?:.*/)?")
            at += 3
            continue
        if pattern.startswith("**", at):
            out.append(".*")
            at += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and (end := pattern.find("]", at + 2)) != -1:
            inside = pattern[at + 1 : end]
            negated = inside.startswith("!")
            body = re.escape(inside[1:] if negated else inside).replace("\\-", "-")
            out.append(f"[{'^' if negated else ''}{body}]")
            at = end + 1
            continue
        else:
            out.append(re.escape(char))
        at += 1
    return re.compile("".join(out), re.DOTALL)
