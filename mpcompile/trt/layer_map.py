"""TensorRT layer names → ONNX node names.

Why: "did my pruned layer get a sparse kernel?" is answered per *TensorRT layer*, but users
prune *ONNX nodes*, and TensorRT renames and fuses them. Most reliable first: the ``Metadata``
field (TensorRT 8.6+) lists the ONNX nodes as ``[ONNX Layer: name]`` separated by
``\\x1e``/``\\x1f``; otherwise the layer name is tokenised: fused layers join names with `` + ``,
pointwise fusions read ``PWN(a, PWN(b, c))``, Myelin regions read ``{ForeignNode[first...last]}``
(expanded to the ONNX nodes between ``first`` and ``last`` in graph order when that order is
known — an approximation: Myelin may skip nodes in that range), and tokens may carry suffixes
(``_output``, `` [Convolution]``) or be wrapped in TensorRT-made names
(``squeeze_after_/fc/MatMul``); a token is matched to the known ONNX node names exactly, then
without suffixes, then as the longest known name it contains at a name boundary.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence

from mpcompile.trt.log_parse import split_layer_list

__all__ = ["NOT_ONNX", "map_layer_name", "metadata_onnx_nodes", "split_profile", "strip_suffixes"]

_PROFILE = re.compile(r"\s*\[profile\s+(\d+)\]\s*$")
_METADATA_ITEM = re.compile(r"\[ONNX Layer:\s*(.*?)\]\s*(?=[\x1e\x1f]|\[ONNX Layer:|$)", re.DOTALL)
_FOREIGN = re.compile(r"^\{ForeignNode\[(.*)\]\}$", re.DOTALL)
_PWN = re.compile(r"^PWN\((.*)\)$", re.DOTALL)
_SUFFIXES = (
    re.compile(r"\s*\[[^\[\]]*\]$"),  # " [Convolution]", "[...]"
    re.compile(r"_output(?:_\d+)?$"),
    re.compile(r"_(?:weights|bias|constant\w*|clone_\d+)$"),
)
NOT_ONNX = ("Reformatting CopyNode", "(Unnamed Layer", "__myl_", "__mye")


def metadata_onnx_nodes(metadata: str | None) -> list[str]:
    """ONNX node names in a ``Metadata`` field (``[ONNX Layer: a]\\x1f[ONNX Layer: b]``)."""
    if not metadata:
        return []
    names = []
    for part in re.split(r"[\x1e\x1f]", metadata):
        for match in _METADATA_ITEM.finditer(part.strip()):
            name = match.group(1).strip()
            if name and name not in names:
                names.append(name)
    return names


def split_profile(name: str) -> tuple[str, int]:
    match = _PROFILE.search(name)
    if not match:
        return name, 0
    return name[: match.start()], int(match.group(1))


def _top_level_split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside (), [], {}."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        char = text[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _tokens(name: str) -> list[str]:
    """Flatten fused / pointwise layer names into candidate node tokens."""
    out: list[str] = []
    for part in _top_level_split(name, " + "):
        match = _PWN.match(part)
        if match:
            for inner in split_layer_list(match.group(1)):
                out.extend(_tokens(inner))
        else:
            out.append(part)
    return out


def strip_suffixes(token: str) -> str:
    previous = None
    while previous != token:
        previous = token
        for pattern in _SUFFIXES:
            stripped = pattern.sub("", token)
            if stripped:
                token = stripped
    return token


def _bounded_contains(haystack: str, needle: str) -> bool:
    """``needle`` occurs in ``haystack`` not glued to more name characters on either side."""
    start = haystack.find(needle)
    while start >= 0:
        end = start + len(needle)
        before_ok = start == 0 or not (haystack[start - 1].isalnum() and needle[0].isalnum())
        after_ok = end == len(haystack) or not (haystack[end].isalnum() and needle[-1].isalnum())
        if before_ok and after_ok:
            return True
        start = haystack.find(needle, start + 1)
    return False


def _match_token(token: str, known: Collection[str], by_length: Sequence[str]) -> str | None:
    if token in known:
        return token
    stripped = strip_suffixes(token)
    if stripped in known:
        return stripped
    for name in by_length:  # longest first
        if len(name) < len(stripped) and _bounded_contains(stripped, name):
            return name
    return None


def _foreign_range(inner: str, known: Collection[str], order: Sequence[str] | None) -> list[str]:
    """``first...last`` → the ONNX nodes between them (inclusive) when the order is known."""
    cut_points = [m.start() for m in re.finditer(r"\.\.\.", inner)]
    first, last = inner, None
    for cut in cut_points:
        a, b = inner[:cut], inner[cut + 3:]
        if not known or (a in known and b in known):
            first, last = a, b
            break
    else:
        if cut_points:
            first, last = inner[: cut_points[0]], inner[cut_points[0] + 3:]
    if last is None:
        return [first]
    if order:
        position = {name: i for i, name in enumerate(order)}
        if first in position and last in position and position[first] <= position[last]:
            return list(order[position[first]: position[last] + 1])
    return [first, last]


def map_layer_name(
    name: str,
    onnx_nodes: Collection[str] | None = None,
    node_order: Sequence[str] | None = None,
    metadata: str | None = None,
) -> tuple[list[str], list[str]]:
    """Map one TensorRT layer to ONNX node names.

    Args:
        name: the TensorRT layer name (a profile suffix is removed).
        onnx_nodes: the known ONNX node names; without them tokens are returned cleaned but
            unverified.
        node_order: ONNX nodes in graph order, to expand Myelin ``{ForeignNode[a...b]}`` ranges.
        metadata: the layer's ``Metadata`` field; when it names ONNX layers it wins.

    Returns:
        ``(matched, unmatched)``: ONNX node names, and tokens that could not be matched
        (TensorRT-internal layers such as reformats land here).
    """
    from_metadata = metadata_onnx_nodes(metadata)
    if from_metadata:
        if onnx_nodes is None:
            return from_metadata, []
        return ([n for n in from_metadata if n in onnx_nodes],
                [n for n in from_metadata if n not in onnx_nodes])
    name, _ = split_profile(name.strip())
    if name.startswith(NOT_ONNX):
        # Reformat / unnamed / Myelin-internal layers: their names may *mention* a node
        # ("Reformatting CopyNode for Input Tensor 0 to Conv_0") but they do not compute it.
        return [], [name]
    known = onnx_nodes if onnx_nodes is not None else ()
    by_length = sorted(known, key=len, reverse=True)
    matched: list[str] = []
    unmatched: list[str] = []

    def add(items: Iterable[str], target: list[str]) -> None:
        for item in items:
            if item not in target:
                target.append(item)

    for token in _tokens(name):
        foreign = _FOREIGN.match(token)
        if foreign:
            span = _foreign_range(foreign.group(1), known, node_order)
            if onnx_nodes is None:
                add(span, matched)
            else:
                add([s for s in span if s in known], matched)
                add([s for s in span if s not in known], unmatched)
            continue
        if onnx_nodes is None:
            if token.startswith(NOT_ONNX):
                add([token], unmatched)
            else:
                add([strip_suffixes(token)], matched)
            continue
        hit = _match_token(token, known, by_length)
        add([hit] if hit else [token], matched if hit else unmatched)
    return matched, unmatched
