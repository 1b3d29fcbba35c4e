"""AWS Query API answers as plain values. Pure.

Only defusedxml parses; DTDs are refused outright (no entity expansion, no
external fetches). Callers cap a body's size before it gets here.
"""

from __future__ import annotations

from collections.abc import Iterable
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree


def local_name(tag: object) -> str:
    """``{namespace}Name`` → ``Name``."""
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def xml_root(body: bytes) -> Element:
    """The parsed document's root; ``ValueError`` when the body is not
    well-formed, safe XML."""
    try:
        root: Element = defusedxml.ElementTree.fromstring(body, forbid_dtd=True)
    except (ParseError, defusedxml.DefusedXmlException) as exc:
        raise ValueError(f"not usable XML ({type(exc).__name__})") from None
    return root


def xml_fields(body: bytes, names: Iterable[str]) -> tuple[str, dict[str, str]]:
    """The root's local name, and the text of the first element with each
    local name, at any depth.

    Raises ``ValueError`` when the body is not well-formed, safe XML.
    """
    root = xml_root(body)
    wanted = set(names)
    found: dict[str, str] = {}
    for element in root.iter():
        name = local_name(element.tag)
        if name in wanted and name not in found:
            found[name] = (element.text or "").strip()
    return local_name(root.tag), found
