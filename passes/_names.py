"""Fresh, graph-unique value and node names for passes that add nodes."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["UniqueNamer"]


class UniqueNamer:
    """Hands out names not yet used by any value, initializer or node of ``graph``.

    ONNX requires graph-unique value names; a pass that inserts Casts or an im2col unfold
    must not collide with names the exporter already used (subgraphs included).
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.used: set[str] = {v.name for v in graph.inputs if v.name}
        self.used.update(graph.initializers)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self.used.update(v.name for v in node.outputs if v.name)
            if node.name:
                self.used.add(node.name)

    def __call__(self, base: str) -> str:
        name, suffix = base, 1
        while name in self.used:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self.used.add(name)
        return name
