"""mkdocs hook: lungseg's docstrings name code with Sphinx roles (:func:`name`); the API page
shows the name as code, without the role."""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|exc):(?=<code>)")


def on_page_content(html: str, **_) -> str:
    return _ROLE.sub("", html)
