"""Read TensorRT's builder log for the two sparsity lines (and the TensorRT version).

Why the log: the engine inspector says which tactic each layer runs, but only the builder log
says which layers TensorRT found *eligible* for sparse math (their weights passed its 2:4 test).
"Eligible but not picked" — the dense tactic timed faster — is the gap users cannot see without
``--verbose`` (anchors survey §2, §8: TensorRT#2169, #4054/#4056, apex#1780). TensorRT prints, at
INFO severity, once per build::

    [11/22/2026-10:00:00] [I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_0 + Relu_1, MatMul_7
    [11/22/2026-10:00:00] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: Conv_0 + Relu_1

(``trtexec`` prefixes ``[time] [I] [TRT]``; the Python ``trt.Logger`` prefixes ``[time] [TRT] [I]``;
our builder's log, written through Polygraphy's logger, ``[V]``: Polygraphy logs TensorRT INFO at
its VERBOSE.) A missing line is not an empty list: it means sparsity was not enabled or the log was captured below INFO, and the result
says which of the two lines was seen.

List parsing: items are separated by commas *outside* brackets, because TensorRT's own names
contain commas inside them (pointwise fusions ``PWN(PWN(/Sigmoid), /Mul)``). A list may continue
on following lines that carry no log prefix; when the list uses commas, a line break is a soft
wrap (terminal copies break names mid-word, e.g. ``Mat`` / ``Mul_139`` in TensorRT#2169) and is
joined without a separator; a list without commas is read one name per line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mpcompile.errors import UsageError

__all__ = [
    "ELIGIBLE_MARKER",
    "PICKED_MARKER",
    "SparsityLog",
    "decode_trt_version_number",
    "parse_build_log",
    "parse_build_log_file",
    "split_layer_list",
]

logger = logging.getLogger(__name__)

ELIGIBLE_MARKER = "(Sparsity) Layers eligible for sparse math:"
PICKED_MARKER = "(Sparsity) TRT inference plan picked sparse implementation for layers:"

# A line that starts a new log record (so it cannot continue a layer list): a bracketed time
# stamp or severity/tag, trtexec's "&&&&" banners, "=== ... ===" section headers, or a Python
# logging time stamp.
_RECORD_START = re.compile(
    r"^\s*(?:"
    r"\[\s*\d{1,2}/\d{1,2}/\d{2,4}-[\d:.]+\s*\]"  # [11/22/2026-10:00:00]
    r"|\[(?:V|I|W|E|F|!|VERBOSE|INFO|WARNING|ERROR|INTERNAL_ERROR|TRT|TensorRT)\]"
    r"|&&&&"
    r"|={3,}"
    r"|\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}"
    r")"
)
_SEVERITY = re.compile(r"\[(E|ERROR|F|INTERNAL_ERROR|!)\]")
_VERSION_PATTERNS = (
    re.compile(r"TensorRT version:?\s*v?(\d+(?:\.\d+){1,3})", re.IGNORECASE),
    re.compile(r"\[TensorRT v(\d{4,6})\]"),
    re.compile(r"\bTensorRT[ -]v?(\d+\.\d+\.\d+(?:\.\d+)?)\b"),
)
_PLUS = re.compile(r"\s*\+\s*")
_OPEN = "([{"
_CLOSE = ")]}"


@dataclass
class SparsityLog:
    """What a TensorRT build log says about 2:4 sparsity.

    Attributes:
        eligible_layers: TensorRT layer names (fused names kept whole, e.g. ``Conv_0 + Relu_1``)
            whose weights qualified for sparse math, in log order, without duplicates.
        picked_sparse_layers: layers for which the final plan uses a sparse tactic.
        tensorrt_version: ``"10.3.0"`` etc. when the log prints it, else None.
        eligible_line_found / picked_line_found: whether each line appeared at all; False means
            sparsity was off or the log was captured below INFO — *not* "no layer qualified".
        errors: ``[E]`` / ``[F]`` records, first line of each (for error messages).
    """

    eligible_layers: list[str] = field(default_factory=list)
    picked_sparse_layers: list[str] = field(default_factory=list)
    tensorrt_version: str | None = None
    eligible_line_found: bool = False
    picked_line_found: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def eligible_not_picked(self) -> list[str]:
        """Eligible layers whose dense tactic was faster: candidates to get dense weights back."""
        picked = set(self.picked_sparse_layers)
        return [name for name in self.eligible_layers if name not in picked]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["eligible_not_picked"] = self.eligible_not_picked
        return data


def decode_trt_version_number(number: int) -> str:
    """``NV_TENSORRT_VERSION`` → dotted string (trtexec prints ``[TensorRT v100300]``).

    TensorRT 10+ encodes ``major·10000 + minor·100 + patch``; 8.x/9.x used
    ``major·1000 + minor·100 + patch`` (8601 → 8.6.1).
    """
    if number >= 100000:
        return f"{number // 10000}.{(number // 100) % 100}.{number % 100}"
    return f"{number // 1000}.{(number // 100) % 10}.{number % 100}"


def split_layer_list(text: str) -> list[str]:
    """Split ``a, PWN(b, c), d + e`` on commas outside brackets; normalise `` + `` spacing."""
    items: list[str] = []
    depth = 0
    start = 0
    for pos, char in enumerate(text):
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            items.append(text[start:pos])
            start = pos + 1
    items.append(text[start:])
    cleaned = []
    for item in items:
        item = _PLUS.sub(" + ", item.strip())
        if item:
            cleaned.append(item)
    return cleaned


def _has_top_level_comma(text: str) -> bool:
    return len(split_layer_list(text)) > 1 or text.rstrip().endswith(",")


def _collect_list(lines: list[str], index: int, marker_end: int) -> tuple[list[str], int]:
    """The layer list that starts after the marker on ``lines[index]``; returns (items, next index)."""
    head = lines[index][marker_end:]
    continuation: list[str] = []
    nxt = index + 1
    while nxt < len(lines):
        line = lines[nxt]
        if not line.strip() or _RECORD_START.match(line) or "(Sparsity)" in line:
            break
        continuation.append(line)
        nxt += 1
    if not continuation:
        return split_layer_list(head), nxt
    if _has_top_level_comma(head + "".join(continuation)):
        # Comma-separated list broken over lines: a line break is only a wrap.
        joined = head.rstrip("\r\n") + "".join(part.strip("\r\n").lstrip() for part in continuation)
        return split_layer_list(joined), nxt
    items = split_layer_list(head)
    for part in continuation:
        items.extend(split_layer_list(part))
    return items, nxt


def _add_unique(target: list[str], items: list[str]) -> None:
    seen = set(target)
    for item in items:
        if item not in seen:
            target.append(item)
            seen.add(item)


def parse_build_log(text: str) -> SparsityLog:
    """Parse a TensorRT builder log (trtexec ``--verbose`` output or our builder's log file).

    Several builds in one log (dense and sparse, or one per profile) are merged: the union of
    names, in first-seen order.
    """
    result = SparsityLog()
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if result.tensorrt_version is None:
            result.tensorrt_version = _find_version(line)
        if _SEVERITY.search(line[:64]) and not line.lstrip().startswith("&&&&"):
            result.errors.append(line.strip())
        pos_e = line.find(ELIGIBLE_MARKER)
        pos_p = line.find(PICKED_MARKER)
        if pos_e >= 0:
            items, index = _collect_list(lines, index, pos_e + len(ELIGIBLE_MARKER))
            _add_unique(result.eligible_layers, items)
            result.eligible_line_found = True
            continue
        if pos_p >= 0:
            items, index = _collect_list(lines, index, pos_p + len(PICKED_MARKER))
            _add_unique(result.picked_sparse_layers, items)
            result.picked_line_found = True
            continue
        index += 1
    if not result.eligible_line_found:
        logger.info("no '(Sparsity) Layers eligible' line: sparsity off or log captured below INFO")
    return result


def _find_version(line: str) -> str | None:
    if "TensorRT" not in line and "tensorrt" not in line.lower():
        return None
    for pattern in _VERSION_PATTERNS:
        match = pattern.search(line)
        if match:
            value = match.group(1)
            return decode_trt_version_number(int(value)) if "." not in value else value
    return None


def parse_build_log_file(path: str | Path) -> SparsityLog:
    """Read and parse a log file (UsageError if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"TensorRT build log {path} does not exist")
    return parse_build_log(path.read_text(encoding="utf-8", errors="replace"))
