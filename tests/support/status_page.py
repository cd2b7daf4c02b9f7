"""Reading the status page's numbers back: every element with ``data-k`` names its JSON path.

``["c", ...]`` is a path into ``/guard/capacity``, ``["h", ...]`` into ``/guard/history``. ``page_values(html)``
reads them from server-rendered HTML; the browser test reads the same from the live DOM (``DOM_VALUES_JS``).
``mismatches`` says which shown values differ from the JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from html.parser import HTMLParser
from typing import Any

from gateway_guard.app.page_render import fmt

# Run in the browser: [[path, text], ...] for every element that carries a JSON path.
DOM_VALUES_JS = (
    "return Array.from(document.querySelectorAll('[data-k]'))"
    ".map(e => [JSON.parse(e.getAttribute('data-k')), e.textContent]);"
)

Shown = tuple[list[str], str]

# One upstream ("default": the CLI's --upstream names its URL), cap 4 with batch headroom 1, three profiles told
# apart by key: alpha (batch, at most 2 in flight and 1 queued: a 429 past that), beta (batch), chat (interactive).
GUARD_CONFIG = """
[upstreams.default]
url = "http://127.0.0.1:9"
max_inflight = 4

[profiles.alpha]
lane = "batch"
max_inflight = 2
max_queued = 1

[profiles.beta]
lane = "batch"

[profiles.chat]
lane = "interactive"

[keys]
alpha = "sk-page-alpha"
beta = "sk-page-beta"
chat = "sk-page-chat"
"""


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[Shown] = []
        self._open: list[tuple[str, list[str], list[str]]] = []  # (tag, path, text parts)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        key = dict(attrs).get("data-k")
        if key is not None:
            self._open.append((tag, json.loads(key), []))

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            _, path, text = self._open.pop()
            self.found.append((path, "".join(text)))

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1][2].append(data)


def page_values(html: str) -> list[Shown]:
    parser = _Collector()
    parser.feed(html)
    parser.close()
    return parser.found


def json_at(capacity: Mapping[str, Any], history: Mapping[str, Any], path: Sequence[str]) -> Any:
    node: Any = {"c": capacity, "h": history}[path[0]]
    for part in path[1:]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def mismatches(shown: Iterable[Shown], capacity: Mapping[str, Any], history: Mapping[str, Any]) -> list[str]:
    """Each shown value that is not what the JSON says at its path (or whose path the JSON lacks)."""
    bad = []
    for path, text in shown:
        try:
            want = fmt(json_at(capacity, history, path))
        except (KeyError, IndexError, TypeError):
            bad.append(f"{path}: shown {text!r}, not in the JSON")
            continue
        if text != want:
            bad.append(f"{path}: shown {text!r}, JSON says {want!r}")
    return bad


def shown_at(shown: Iterable[Shown], path: Sequence[str]) -> str | None:
    for p, text in shown:
        if p == list(path):
            return text
    return None
