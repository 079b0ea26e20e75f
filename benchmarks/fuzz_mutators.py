"""Mutated ONNX files for the fuzz campaign: one hostile-input class per mutator, seeded.

Why a module of its own: the CI sample (``tests/test_fuzz.py``) and the long campaign
(``benchmarks/fuzz.py``) must build byte-identical files from the same (source, mutation,
seed), so a failure seen in one is reproduced by the other. Nothing here imports mpcompile:
the mutators model what a user (or a broken exporter) can hand us, not what we accept.

Each mutator gets a private copy of a parsed source model, a seeded ``random.Random`` and
the case's own folder, and returns the model to write as ``model.onnx`` there (a
``ModelProto``, or raw ``bytes`` for byte-level damage). Mutators that need external data
write the data files into the folder themselves.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["FuzzCase", "MUTATIONS", "make_case", "plan_cases", "folder_digest", "SOURCES"]

DATA_DIR = Path(__file__).resolve().parent.parent / "mpcompile" / "data"
SOURCES = ("digits_mlp", "digits_cnn", "digits_vit")
MODEL_NAME = "model.onnx"
DATA_NAME = "weights.bin"

Mutator = Callable[[onnx.ModelProto, random.Random, Path], "onnx.ModelProto | bytes"]


@dataclass(frozen=True)
class FuzzCase:
    """One mutated file: which source, which mutation, which seed (enough to rebuild it)."""

    index: int
    source: str
    mutation: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}_{self.source}_{self.mutation}"


# --------------------------------------------------------------------------- helpers


def _weights(proto: onnx.ModelProto, min_rank: int = 2) -> list[onnx.TensorProto]:
    return [t for t in proto.graph.initializer
            if t.data_type == TensorProto.FLOAT and len(t.dims) >= min_rank and t.raw_data]


def _pick_weight(proto: onnx.ModelProto, rng: random.Random, min_rank: int = 2) -> onnx.TensorProto:
    candidates = _weights(proto, min_rank) or _weights(proto, 1)
    return rng.choice(candidates)


def _to_external(proto: onnx.ModelProto, folder: Path, tensors: list[onnx.TensorProto],
                 with_length: bool = True) -> dict[str, tuple[int, int]]:
    """Move ``tensors`` into ``folder/weights.bin``; return name -> (offset, length)."""
    spans: dict[str, tuple[int, int]] = {}
    blob = bytearray()
    for tensor in tensors:
        data = tensor.raw_data
        offset = len(blob)
        blob += data
        blob += b"\0" * (-len(blob) % 64)
        spans[tensor.name] = (offset, len(data))
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        entries = {"location": DATA_NAME, "offset": str(offset)}
        if with_length:
            entries["length"] = str(len(data))
        for key, value in entries.items():
            tensor.external_data.add(key=key, value=value)
    (folder / DATA_NAME).write_bytes(bytes(blob))
    return spans


def _set_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


# --------------------------------------------------------------------------- byte level


def byte_flip(proto, rng, folder):
    """A few bytes anywhere overwritten with random values (disk or transfer damage)."""
    data = bytearray(proto.SerializeToString())
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def bit_flip(proto, rng, folder):
    """Single bits flipped in the protobuf header region (tags, lengths, varints)."""
    data = bytearray(proto.SerializeToString())
    # Most of a model is weight bytes; aim half the flips at the structural prefix/suffix.
    structural = [i for i in range(min(len(data), 512))] + list(range(max(0, len(data) - 4096), len(data)))
    for _ in range(rng.randint(1, 4)):
        i = rng.choice(structural) if rng.random() < 0.7 else rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def truncate(proto, rng, folder):
    """The file cut short (an interrupted copy)."""
    data = proto.SerializeToString()
    return data[: rng.randrange(1, len(data))]


# --------------------------------------------------------------------------- tensors


def wrong_init_dims(proto, rng, folder):
    """An initializer's dims changed so they no longer match its data (or its consumer)."""
    t = _pick_weight(proto, rng, 1)
    dims = list(t.dims)
    choice = rng.randrange(4)
    if choice == 0:
        dims[rng.randrange(len(dims))] += rng.choice([-1, 1, 7])
    elif choice == 1:
        dims = dims[::-1]
    elif choice == 2:
        dims = dims + [1]
    else:
        dims = [int(np.prod(dims))]
    dims = [max(d, 1) for d in dims]
    del t.dims[:]
    t.dims.extend(dims)
    return proto


def dtype_swap(proto, rng, folder):
    """An initializer's data_type changed (the bytes stay): int, double, half, string, bogus."""
    t = _pick_weight(proto, rng, 1)
    t.data_type = rng.choice([TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT64,
                              TensorProto.UINT8, TensorProto.BOOL, TensorProto.STRING, TensorProto.BFLOAT16,
                              TensorProto.COMPLEX64, 0, 99])
    return proto


def raw_data_length(proto, rng, folder):
    """raw_data shorter or longer than dims × itemsize says."""
    t = _pick_weight(proto, rng, 1)
    data = t.raw_data
    if rng.random() < 0.5:
        t.raw_data = data[: rng.randrange(0, len(data))]
    else:
        t.raw_data = data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return proto


def zero_size(proto, rng, folder):
    """A weight with a zero dimension and no data."""
    t = _pick_weight(proto, rng)
    dims = list(t.dims)
    dims[rng.randrange(len(dims))] = 0
    del t.dims[:]
    t.dims.extend(dims)
    t.raw_data = b""
    return proto


def nan_inf(proto, rng, folder):
    """NaN or ±Inf values written into a weight (a diverged training run)."""
    t = _pick_weight(proto, rng)
    array = numpy_helper.to_array(t).copy()
    flat = array.reshape(-1)
    count = max(1, int(flat.size * rng.choice([0.0, 0.01, 0.5, 1.0])))
    positions = rng.sample(range(flat.size), min(count, flat.size))
    flat[positions] = rng.choice([np.nan, np.inf, -np.inf])
    t.CopyFrom(numpy_helper.from_array(array, t.name))
    return proto


def huge_dims(proto, rng, folder):
    """Declared dims whose product is astronomically large (must be refused before allocating)."""
    t = _pick_weight(proto, rng)
    big = rng.choice([2**31, 2**40, 2**62, 10**12])
    dims = list(t.dims)
    dims[rng.randrange(len(dims))] = big
    if rng.random() < 0.5:
        dims[rng.randrange(len(dims))] = big
    del t.dims[:]
    t.dims.extend(dims)
    if rng.random() < 0.5:  # also the graph input
        inp = proto.graph.input[0].type.tensor_type.shape
        if inp.dim:
            inp.dim[-1].ClearField("dim_param")
            inp.dim[-1].dim_value = big
    return proto


# --------------------------------------------------------------------------- graph


def unsupported_op(proto, rng, folder):
    """A node's op_type or domain replaced by something no runtime knows."""
    node = rng.choice(list(proto.graph.node))
    if rng.random() < 0.6:
        node.op_type = rng.choice(["FancyMatMul", "Gemm2", "SparseConv", "Foo"])
    else:
        node.domain = rng.choice(["com.example", "ai.onnx.ml", "com.microsoft.nope"])
    return proto


def wrong_value_info(proto, rng, folder):
    """Declared shapes (value_info / inputs / outputs) that contradict the graph."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    proto.graph.value_info.extend(inferred.graph.value_info)
    targets = [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]
    for vi in rng.sample(targets, min(len(targets), rng.randint(1, 3))):
        shape = vi.type.tensor_type.shape
        if not shape.dim or rng.random() < 0.2:
            shape.dim.add().dim_value = rng.randint(1, 9)
            continue
        d = shape.dim[rng.randrange(len(shape.dim))]
        d.ClearField("dim_param")
        d.dim_value = rng.choice([0, 1, 3, 1000, 77])
        if rng.random() < 0.2:
            vi.type.tensor_type.elem_type = rng.choice([TensorProto.INT64, TensorProto.DOUBLE])
    return proto


def graph_cycle(proto, rng, folder):
    """A node fed by a later node's output (graphs must be acyclic)."""
    nodes = proto.graph.node
    fed = [k for k, node in enumerate(nodes) if node.input]
    i = rng.choice(fed[:-1] or fed)
    j = rng.randrange(i, len(nodes))
    nodes[i].input[0] = nodes[j].output[0]
    return proto


def duplicate_names(proto, rng, folder):
    """Two producers of one value name, a duplicated initializer, or duplicate node names."""
    g = proto.graph
    choice = rng.randrange(3)
    if choice == 0 and len(g.node) >= 2:
        a, b = rng.sample(range(len(g.node)), 2)
        g.node[b].output[0] = g.node[a].output[0]
    elif choice == 1:
        t = _pick_weight(proto, rng, 1)
        dup = g.initializer.add()
        dup.CopyFrom(t)
        if rng.random() < 0.5:
            other = _pick_weight(proto, rng, 1)
            dup.CopyFrom(other)
            dup.name = t.name
    else:
        for node in g.node:
            node.name = "same"
    return proto


def missing_opset(proto, rng, folder):
    """opset_import removed, emptied of the default domain, or set to an impossible version."""
    choice = rng.randrange(3)
    if choice == 0:
        del proto.opset_import[:]
    elif choice == 1:
        proto.opset_import[0].version = rng.choice([0, 1, 999])
    else:
        proto.opset_import[0].domain = "ai.onnx.nothing"
    return proto


def nested_subgraph(proto, rng, folder):
    """The graph's first GEMM wrapped in an If whose branches hold it (optionally broken)."""
    g = proto.graph
    gemm_ids = [i for i, n in enumerate(g.node) if n.op_type in ("Gemm", "MatMul", "Conv")]
    i = rng.choice(gemm_ids)
    node = g.node[i]
    out = node.output[0]
    then_node = onnx.NodeProto()
    then_node.CopyFrom(node)
    then_node.output[0] = out + "_then"
    else_node = onnx.NodeProto()
    else_node.CopyFrom(node)
    else_node.output[0] = out + "_else"
    if rng.random() < 0.3:  # a branch referring to a name that does not exist
        else_node.input[0] = "nowhere"
    branch_out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    then_g = helper.make_graph([then_node], "then", [], [branch_out(out + "_then")])
    else_g = helper.make_graph([else_node], "else", [], [branch_out(out + "_else")])
    if rng.random() < 0.5:  # the weight moves inside the branch
        for t in list(g.initializer):
            if t.name in node.input[1:2]:
                then_g.initializer.append(t)
                break
    cond = helper.make_tensor("fuzz_cond", TensorProto.BOOL, [], [True])
    g.initializer.append(cond)
    if_node = helper.make_node("If", ["fuzz_cond"], [out], name="fuzz_if", then_branch=then_g, else_branch=else_g)
    g.node.remove(node)
    g.node.insert(i, if_node)
    return proto


# --------------------------------------------------------------------------- external data


def ext_bad_offset(proto, rng, folder):
    """External data whose offset/length points past the end, is negative or not a number."""
    tensors = _weights(proto)[: rng.randint(1, 3)]
    spans = _to_external(proto, folder, tensors)
    t = rng.choice(tensors)
    size = (folder / DATA_NAME).stat().st_size
    choice = rng.randrange(5)
    if choice == 0:
        _set_entry(t, "offset", str(size + rng.randint(1, 10**6)))
    elif choice == 1:
        _set_entry(t, "offset", str(-rng.randint(1, 100)))
    elif choice == 2:
        _set_entry(t, "offset", rng.choice(["abc", "1e3", "", "0x10"]))
    elif choice == 3:
        _set_entry(t, "length", str(spans[t.name][1] + rng.randint(1, 999)))
    else:
        _set_entry(t, "length", str(max(0, spans[t.name][1] - rng.randint(1, 16))))
    return proto


def ext_missing_file(proto, rng, folder):
    """External data whose file is not there."""
    tensors = _weights(proto)[: rng.randint(1, 3)]
    _to_external(proto, folder, tensors)
    (folder / DATA_NAME).unlink()
    return proto


def ext_symlink(proto, rng, folder):
    """External data reached through a symlink: inside the folder, outside it, or dangling."""
    tensors = _weights(proto)[:2]
    _to_external(proto, folder, tensors)
    real = folder / DATA_NAME
    choice = rng.randrange(3)
    if choice == 0:  # link inside the folder to a file inside the folder: fine
        target = folder / "real.bin"
        os.replace(real, target)
        real.symlink_to(target.name)
    elif choice == 1:  # link to a file outside the model's folder: must be refused
        outside = folder.parent / f".outside_{folder.name}.bin"
        os.replace(real, outside)
        real.symlink_to(outside)
    else:  # dangling
        real.unlink()
        real.symlink_to("no_such_target.bin")
    return proto


def ext_truncated_nolength(proto, rng, folder):
    """External data without a length field whose file is shorter than the tensor."""
    tensors = _weights(proto)[: rng.randint(1, 2)]
    _to_external(proto, folder, tensors, with_length=False)
    path = folder / DATA_NAME
    data = path.read_bytes()
    path.write_bytes(data[: rng.randrange(0, max(1, len(data) - 4))])
    return proto


MUTATIONS: dict[str, Mutator] = {
    "byte_flip": byte_flip,
    "bit_flip": bit_flip,
    "truncate": truncate,
    "wrong_init_dims": wrong_init_dims,
    "dtype_swap": dtype_swap,
    "raw_data_length": raw_data_length,
    "zero_size": zero_size,
    "nan_inf": nan_inf,
    "huge_dims": huge_dims,
    "unsupported_op": unsupported_op,
    "wrong_value_info": wrong_value_info,
    "graph_cycle": graph_cycle,
    "duplicate_names": duplicate_names,
    "missing_opset": missing_opset,
    "nested_subgraph": nested_subgraph,
    "ext_bad_offset": ext_bad_offset,
    "ext_missing_file": ext_missing_file,
    "ext_symlink": ext_symlink,
    "ext_truncated_nolength": ext_truncated_nolength,
}


def plan_cases(count: int, seed: int = 0, mutations: tuple[str, ...] | None = None) -> list[FuzzCase]:
    """``count`` cases cycling over mutations × sources, each with a seed derived from ``seed``."""
    names = tuple(mutations or MUTATIONS)
    cases = []
    for index in range(count):
        mutation = names[index % len(names)]
        source = SOURCES[(index // len(names)) % len(SOURCES)]
        case_seed = int.from_bytes(hashlib.sha256(f"{seed}:{index}:{mutation}".encode()).digest()[:8], "little")
        cases.append(FuzzCase(index, source, mutation, case_seed))
    return cases


_SOURCE_CACHE: dict[str, bytes] = {}


def make_case(case: FuzzCase, root: Path) -> Path:
    """Write ``case`` into ``root/<case.name>/`` and return the model's path."""
    folder = root / case.name
    folder.mkdir(parents=True, exist_ok=True)
    if case.source not in _SOURCE_CACHE:
        _SOURCE_CACHE[case.source] = (DATA_DIR / f"{case.source}.onnx").read_bytes()
    proto = onnx.ModelProto()
    proto.ParseFromString(_SOURCE_CACHE[case.source])
    rng = random.Random(case.seed)
    result = MUTATIONS[case.mutation](proto, rng, folder)
    data = result if isinstance(result, bytes) else result.SerializeToString()
    path = folder / MODEL_NAME
    path.write_bytes(data)
    return path


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` (symlinks by their target text): proves the input is untouched."""
    digest = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            digest[entry.name] = "->" + os.readlink(entry)
        elif entry.is_file():
            digest[entry.name] = hashlib.sha256(entry.read_bytes()).hexdigest()
    return digest
