"""Channel-permutation folding: exact on exported MLP / CNN / transformer, blocked where it must."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.errors import UsageError
from mpcompile.io.model_io import load_model
from mpcompile.passes.gemm_discovery import discover_gemms
from mpcompile.passes.permute_channels import (
    PERMUTATION_KEY,
    PermuteChannelsPass,
    apply_fold,
    insert_gather,
    plan_fold,
)

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

EXPORTERS = pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        shape = [d if isinstance(d, int) else 3 for d in value.shape]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def layer_for(model: ir.Model, node: ir.Node):
    return next(layer for layer in discover_gemms(model) if layer.node is node)


def k_view(layer) -> np.ndarray:
    """[out, positions, Cin]: the TensorRT K axis with input channels split out."""
    return layer.matrix().reshape(layer.out_features, -1, layer.in_channels)


def fold_everything(model: ir.Model, seed: int = 1) -> dict[str, tuple[object, np.ndarray | None]]:
    """Fold a random permutation into every foldable layer; check each consumer's K view.

    Returns ``{layer name: (plan, perm or None)}``.
    """
    rng = np.random.default_rng(seed)
    folds = {}
    for node in [layer.node for layer in discover_gemms(model)]:
        layers = discover_gemms(model)
        layer = next(item for item in layers if item.node is node)
        plan = plan_fold(model, layer, layers)
        folds[layer.name] = (plan, None)
        if not plan.foldable:
            assert plan.reason
            continue
        assert not plan.reason and plan.producer is not None
        producer_before = layer_for(model, plan.producer).matrix()
        before = k_view(layer)
        perm = rng.permutation(layer.in_channels)
        assert not np.array_equal(perm, np.arange(layer.in_channels))
        apply_fold(model, plan, perm)
        folds[layer.name] = (plan, perm)
        np.testing.assert_array_equal(k_view(layer_for(model, node)), before[:, :, perm])
        # the producer emits channel perm[j] at position j: its output rows are permuted
        np.testing.assert_array_equal(
            layer_for(model, plan.producer).matrix(), producer_before[perm]
        )
        assert node.metadata_props[PERMUTATION_KEY] == "folded"
    return folds


def reasons_of(folds) -> list[str]:
    return [plan.reason for plan, _ in folds.values()]


# -- MLP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dynamo", "rank"),
    [(False, 2), (False, 3), (True, 2)],
    ids=["legacy-gemm", "legacy-matmul", "dynamo-gemm"],
)
def test_mlp_folds_every_inner_layer(export, dynamo, rank):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(24, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 16),
    )
    args = (torch.randn(2, 24) if rank == 2 else torch.randn(2, 5, 24),)
    model = load_model(export(mlp, args, dynamo=dynamo)).model
    feeds = random_feeds(model)
    reference = run(model, feeds)
    ops = [layer.op_type for layer in discover_gemms(model)]
    assert ops == (["Gemm"] * 3 if rank == 2 else ["MatMul"] * 3)
    n_nodes, n_inits = len(list(model.graph)), len(model.graph.initializers)

    reasons = reasons_of(fold_everything(model))

    assert reasons == ["tensor is a graph input", "", ""]
    assert max_diff(run(model, feeds), reference) < 1e-5
    # exclusive weights are rewritten, not copied; no Gather was needed
    assert (len(list(model.graph)), len(model.graph.initializers)) == (n_nodes, n_inits)


# -- CNN with BatchNorm --------------------------------------------------------------------------


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.BatchNorm2d(32),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 1),
            torch.nn.BatchNorm2d(32),
            torch.nn.PReLU(32),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 16, 3),
        )
        for module in self.body:  # non-trivial running stats so BN really is per-channel
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.data.uniform_(0.5, 2)
                module.bias.data.uniform_(-1, 1)
        self.body[5].weight.data.uniform_(0, 0.5)

    def forward(self, x):
        return self.body(x)


def export_keeping_bn(module, args, path, *, dynamo: bool):
    """Export with BatchNormalization nodes kept (the default exporters fold BN in eval mode)."""
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:  # optimize=False keeps BN but also leaves Reshape(slope): fold constants only
            program = torch.onnx.export(module, args, dynamo=True, optimize=False, verbose=False)
            onnxscript = pytest.importorskip("onnxscript")
            onnxscript.optimizer.fold_constants(program.model)
            program.save(str(path))
        else:
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=17,
                training=torch.onnx.TrainingMode.PRESERVE,
            )
    return path


@pytest.mark.parametrize(
    ("dynamo", "keep_bn"),
    [(False, False), (False, True), (True, True)],
    ids=["legacy-bn_folded", "legacy-bn_kept", "dynamo-bn_kept"],
)
def test_cnn_with_batchnorm_folds_exactly(export, tmp_path, dynamo, keep_bn):
    cnn = SmallCNN()
    args = (torch.randn(2, 16, 10, 10),)
    path = (
        export_keeping_bn(cnn, args, tmp_path / "cnn.onnx", dynamo=dynamo)
        if keep_bn
        else export(cnn, args, dynamo=dynamo)
    )
    model = load_model(path).model
    n_bn = sum(node.op_type == "BatchNormalization" for node in model.graph)
    assert n_bn == (2 if keep_bn else 0)
    feeds = random_feeds(model)
    reference = run(model, feeds)
    bn_params = {
        v.name: v.const_value.numpy().copy()
        for node in model.graph
        if node.op_type == "BatchNormalization"
        for v in node.inputs[1:]
    }

    folds = fold_everything(model)

    assert reasons_of(folds) == ["tensor is a graph input", "", ""]
    assert max_diff(run(model, feeds), reference) < 1e-5
    seen_bn = 0
    for plan, perm in folds.values():  # BN statistics and affine travel with their channels
        for node in plan.through if perm is not None else []:
            if node.op_type == "BatchNormalization":
                seen_bn += 1
                for value in node.inputs[1:]:
                    np.testing.assert_array_equal(
                        value.const_value.numpy(), bn_params[value.name][perm]
                    )
    assert seen_bn == n_bn


# -- transformer block ---------------------------------------------------------------------------


class Block(torch.nn.Module):
    """in-proj, then LN → q/k/v → attention → proj → residual, LN → fc1 → GELU → fc2 → residual."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(16, d)
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.proj = torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        x = self.inp(x)
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (
            m(h).reshape(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v)
        )
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


def match_torch(model: ir.Model, block: Block) -> dict[str, object]:
    """Map torch module names to discovered layers by comparing weights."""
    out = {}
    for layer in discover_gemms(model):
        for name in ("inp", "q", "k", "v", "proj", "fc1", "fc2"):
            if np.array_equal(layer.matrix(), getattr(block, name).weight.detach().numpy()):
                out[name] = layer
    assert sorted(out) == sorted(("inp", "q", "k", "v", "proj", "fc1", "fc2"))
    return out


@EXPORTERS
def test_transformer_block_fc2_folds_rest_blocked(export, dynamo):
    block = Block()
    model = load_model(export(block, (torch.randn(2, 5, 16),), dynamo=dynamo)).model
    feeds = random_feeds(model)
    reference = run(model, feeds)
    layers = match_torch(model, block)
    all_layers = discover_gemms(model)
    plans = {name: plan_fold(model, layer, all_layers) for name, layer in layers.items()}

    assert [name for name, plan in plans.items() if plan.foldable] == ["fc2"]
    assert plans["inp"].reason == "tensor is a graph input"
    for name in ("q", "k", "v", "fc1"):
        assert plans[name].reason.startswith("LayerNorm input is a residual stream"), plans[
            name
        ].reason
        assert "residual Add" in plans[name].reason
    assert {c.node for c in plans["q"].consumers} == {layers[n].node for n in ("q", "k", "v")}
    assert "Reshape" in plans["proj"].reason
    fc2 = plans["fc2"]
    assert fc2.producer is layers["fc1"].node
    assert (dynamo and [n.op_type for n in fc2.through] == ["Add", "Gelu"]) or (
        not dynamo and "Erf" in [n.op_type for n in fc2.through]
    )

    before = layers["fc2"].matrix()
    perm = np.random.default_rng(3).permutation(128)
    apply_fold(model, fc2, perm)
    np.testing.assert_array_equal(layer_for(model, layers["fc2"].node).matrix(), before[:, perm])
    assert max_diff(run(model, feeds), reference) < 1e-5
    with pytest.raises(UsageError, match="residual"):
        apply_fold(model, plans["fc1"], np.arange(32))


def test_fold_through_layernorm_permutes_its_scale_and_bias(export):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)
    )
    net[1].weight.data.uniform_(0.5, 2)
    net[1].bias.data.uniform_(-1, 1)
    model = load_model(export(net, (torch.randn(3, 16),), dynamo=False)).model
    feeds = random_feeds(model)
    reference = run(model, feeds)
    layers = discover_gemms(model)
    plan = plan_fold(model, layers[1], layers)
    assert plan.foldable and [n.op_type for n in plan.through] == ["LayerNormalization"]
    perm = np.random.default_rng(0).permutation(32)
    apply_fold(model, plan, perm)
    ln = plan.through[0]
    np.testing.assert_array_equal(
        ln.inputs[1].const_value.numpy(), net[1].weight.detach().numpy()[perm]
    )
    assert max_diff(run(model, feeds), reference) < 1e-5


# -- blocked cases, shared initializers, gather fallback -------------------------------------------


class Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc0, self.fc1 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 64)
        self.fc2, self.fc3 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        h = self.fc0(x)
        return self.fc3(h + self.fc2(torch.relu(self.fc1(h))))


def test_residual_add_blocks_and_gather_fallback_is_exact(export):
    model = load_model(export(Residual(), (torch.randn(4, 16),), dynamo=False)).model
    feeds = random_feeds(model)
    reference = run(model, feeds)
    layers = discover_gemms(model)
    plans = [plan_fold(model, layer, layers) for layer in layers]
    assert [p.foldable for p in plans] == [False, False, True, False]
    assert plans[0].reason == "tensor is a graph input"
    assert plans[1].reason.startswith("residual Add")  # fc0's output also feeds the skip
    assert plans[3].reason.startswith("residual Add")  # fc3 reads the sum

    fc3 = layers[3]
    before = fc3.matrix()
    perm = np.random.default_rng(0).permutation(32)
    n_nodes = len(list(model.graph))
    gather = insert_gather(model, plans[3], perm)
    assert gather.op_type == "Gather" and len(list(model.graph)) == n_nodes + 1
    assert gather.metadata_props[PERMUTATION_KEY] == "gather"
    assert fc3.node.inputs[0] is gather.outputs[0]
    np.testing.assert_array_equal(layer_for(model, fc3.node).matrix(), before[:, perm])
    assert max_diff(run(model, feeds), reference) < 1e-5


def shared_weight_model(sibling: bool = False) -> ir.Model:
    """X→MatMul(W1)→Add(b1)→Relu→Mul(per-channel Constant)→MatMul(Transpose(W2t))→Y1,
    with W1 also read by MatMul(X2, W1)→Y2 and W2t also read by Gemm(X3, W2t, transB=1)→Y3;
    ``sibling`` adds MatMul(rs, Ws)→Y4 reading the same tensor as fc2."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    inits = [
        numpy_helper.from_array((0.3 * rng.standard_normal(s)).astype(np.float32), n)
        for n, s in (("W1", (16, 32)), ("b1", (32,)), ("W2t", (8, 32)), ("Ws", (32, 16)))
    ]
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node(
            "Constant",
            [],
            ["c"],
            name="const",
            value=numpy_helper.from_array(rng.uniform(0.5, 2, (1, 32)).astype(np.float32)),
        ),
        helper.make_node("Mul", ["r", "c"], ["rs"], name="scale"),
        helper.make_node("Transpose", ["W2t"], ["W2"], name="tW2", perm=[1, 0]),
        helper.make_node("MatMul", ["rs", "W2"], ["Y1"], name="fc2"),
        helper.make_node("MatMul", ["X2", "W1"], ["Y2"], name="tied"),
        helper.make_node("Gemm", ["X3", "W2t"], ["Y3"], name="other", transB=1),
    ]
    outputs = [("Y1", [4, 8]), ("Y2", [4, 32]), ("Y3", [4, 8])]
    if sibling:
        nodes.append(helper.make_node("MatMul", ["rs", "Ws"], ["Y4"], name="sibling"))
        outputs.append(("Y4", [4, 16]))
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("X", f, [4, 16]),
            helper.make_tensor_value_info("X2", f, [4, 16]),
            helper.make_tensor_value_info("X3", f, [4, 32]),
        ],
        [helper.make_tensor_value_info(n, f, s) for n, s in outputs],
        inits if sibling else inits[:3],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def test_shared_initializers_are_copied_not_mutated():
    model = shared_weight_model()
    feeds = random_feeds(model)
    reference = run(model, feeds)
    graph = model.graph
    w1, w2t = graph.initializers["W1"], graph.initializers["W2t"]
    w1_tensor, w2t_tensor = w1.const_value, w2t.const_value
    w1_before, w2t_before = w1_tensor.numpy().copy(), w2t_tensor.numpy().copy()
    layers = discover_gemms(model)
    fc2 = next(layer for layer in layers if layer.node.name == "fc2")
    plan = plan_fold(model, fc2, layers)
    assert plan.foldable, plan.reason
    assert plan.producer.name == "fc1" and [n.name for n in plan.through] == [
        "bias1",
        "relu",
        "scale",
    ]
    perm = np.random.default_rng(1).permutation(32)
    before = fc2.matrix()

    apply_fold(model, plan, perm)

    assert max_diff(run(model, feeds), reference) < 1e-5
    # the shared tensors are untouched and still read by the nodes outside the fold
    assert w1.const_value is w1_tensor and w2t.const_value is w2t_tensor
    np.testing.assert_array_equal(w1_tensor.numpy(), w1_before)
    np.testing.assert_array_equal(w2t_tensor.numpy(), w2t_before)
    nodes = {node.name: node for node in graph}
    assert nodes["tied"].inputs[1] is w1 and nodes["other"].inputs[1] is w2t
    assert nodes["fc1"].inputs[1].name == "W1__perm"
    np.testing.assert_array_equal(nodes["fc1"].inputs[1].const_value.numpy(), w1_before[:, perm])
    # the consumer reads a permuted copy through a cloned Transpose
    chain = nodes["fc2"].inputs[1].producer()
    assert chain.op_type == "Transpose" and chain.name != "tW2"
    assert chain.inputs[0].name == "W2t__perm"
    np.testing.assert_array_equal(layer_for(model, nodes["fc2"]).matrix(), before[:, perm])
    assert "tW2" not in nodes  # the original Transpose had no other reader and was removed
    # the Constant scale (read only here) and the exclusive bias are permuted in place
    assert graph.initializers["b1"].const_value.numpy().shape == (32,)
    assert "b1__perm" not in graph.initializers


def test_bad_permutation_and_unknown_key_raise():
    model = shared_weight_model()
    layers = discover_gemms(model)
    fc2 = next(layer for layer in layers if layer.node.name == "fc2")
    plan = plan_fold(model, fc2, layers)
    for bad in (np.arange(31), np.zeros(32, dtype=int), np.arange(32.0)):
        with pytest.raises(UsageError, match="permutation"):
            apply_fold(model, plan, bad)
    with pytest.raises(UsageError, match="no GEMM"):
        PermuteChannelsPass({"nope": np.arange(32)})(model)
    # a bad entry is refused before any other entry is applied
    w2t = model.graph.initializers["W2t"].const_value
    with pytest.raises(UsageError, match="permutation"):
        PermuteChannelsPass({"fc2": np.arange(32)[::-1], "tied": np.arange(15)})(model)
    assert model.graph.initializers["W2t"].const_value is w2t


# -- the pass ------------------------------------------------------------------------------------


def test_pass_folds_skips_and_gathers(export):
    model = load_model(export(Residual(), (torch.randn(4, 16),), dynamo=False)).model
    feeds = random_feeds(model)
    reference = run(model, feeds)
    names = [layer.name for layer in discover_gemms(model)]
    rng = np.random.default_rng(0)
    perms = {
        names[1]: rng.permutation(32),
        names[2]: rng.permutation(64),
        names[3]: rng.permutation(32),
    }

    nothing = PermuteChannelsPass({names[0]: rng.permutation(16)})
    assert not nothing(model).modified  # fc0 reads the graph input
    assert [(r.status, r.reason) for r in nothing.records] == [
        ("skipped", "tensor is a graph input")
    ]

    strict = PermuteChannelsPass(perms)
    result = strict(model)
    assert result.modified and result.model is model
    assert [r.status for r in strict.records] == ["skipped", "folded", "skipped"]
    assert "residual Add" in strict.records[0].reason
    assert max_diff(run(model, feeds), reference) < 1e-5

    # fc2's input is already permuted; fc1 and fc3 now go through Gathers
    lenient = PermuteChannelsPass(
        {names[1]: perms[names[1]], names[3]: perms[names[3]]}, allow_gather=True
    )
    assert lenient(model).modified
    assert [r.status for r in lenient.records] == ["gather", "gather"]
    assert sum(node.op_type == "Gather" for node in model.graph) == 2
    assert max_diff(run(model, feeds), reference) < 1e-5


def test_pass_siblings_share_one_permutation():
    """Two consumers reading one tensor: one fold permutes both; a repeat is a no-op."""
    model = shared_weight_model(sibling=True)
    ws_before = model.graph.initializers["Ws"].const_value.numpy().copy()
    feeds = random_feeds(model)
    reference = run(model, feeds)
    perm = np.random.default_rng(2).permutation(32)
    pass_ = PermuteChannelsPass({"fc2": perm, "sibling": perm})
    assert pass_(model).modified
    assert [r.status for r in pass_.records] == ["folded", "skipped"]
    assert sorted(pass_.records[0].layers) == ["fc2", "sibling"]
    assert pass_.records[1].reason == "already permuted (sibling)"
    np.testing.assert_array_equal(
        model.graph.initializers["Ws"].const_value.numpy(), ws_before[perm]
    )
    assert max_diff(run(model, feeds), reference) < 1e-5
    again = PermuteChannelsPass({"fc2": perm})
    # fc2's input was permuted once already; a second fold would permute it again (still exact)
    assert again(model).modified and max_diff(run(model, feeds), reference) < 1e-5
