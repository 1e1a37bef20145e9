"""Rewriting an exported fp32 ONNX decoder: each adapted MatMul becomes MatMulNBits.

The fp32 export holds each adapted ``nn.Linear`` as ``MatMul(x, W^T)`` with ``W^T [K, N]``
an initializer. Names are the exporter's business (optimum writes ``onnx::MatMul_732``),
so adapted matrices are found by value: the initializer whose bytes are exactly the
trained base weight's transpose. Every adapted matrix must match one initializer, used
by one MatMul and nothing else, or the rewrite refuses to guess.

The replacement is ORT's own layout (what ``MatMulNBitsQuantizer`` writes): B
``uint8 [N, n_blocks, block * bits / 8]``, scales ``fp32 [N, n_blocks]``, packed zero
points for asymmetric formats only. A side-car LoRA adds ``(x A^T) (s B')^T`` to the
output as two fp32 MatMuls and an Add, the scaling folded into B'.

One more rewrite keeps ONNX Runtime's memory equal to the file's: a weight read through a
Transpose node (a tied embedding as the output head) is read by FusedMatMul instead.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from coalora_edge.errors import ExportError
from coalora_edge.schemes.onnx import MatMulNBitsInitializers, OnnxFormat

MS_DOMAIN = "com.microsoft"
NBITS_OP = "MatMulNBits"
#: MatMulNBits' input roles after A, in order; zero_points is left out for symmetric formats
NBITS_INPUTS = ("b", "scales", "zero_points")


@dataclass(frozen=True)
class AdaptedMatMul:
    """Where one adapted matrix sits in the graph."""

    node: onnx.NodeProto  # MatMul(x, W^T)
    initializer: str  # name of W^T [K, N]


@dataclass(frozen=True)
class LoraBranch:
    """A side-car LoRA of one matrix: ``y += (x A^T) (scaling B')^T``."""

    a_t: np.ndarray  # fp32 (K, r) = A^T
    b_t: np.ndarray  # fp32 (r, N) = (scaling * B')^T


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def find_adapted_matmuls(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> dict[str, AdaptedMatMul]:
    """Matrix name -> its MatMul, matched by the bytes of ``weights[name]`` ``(out, in)``."""
    graph = model.graph
    by_digest: dict[str, list[str]] = defaultdict(list)
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
            by_digest[_digest(numpy_helper.to_array(init))].append(init.name)
    users = _consumers(graph)
    found: dict[str, AdaptedMatMul] = {}
    for name, weight in weights.items():
        candidates = by_digest.get(_digest(weight.T), [])
        if len(candidates) != 1:
            raise ExportError(
                f"{name}: the fp32 ONNX export holds {len(candidates)} initializers equal to its weight "
                "(expected exactly 1, as MatMul's transposed B); the exporter changed the graph in a way "
                "this rewrite does not know, or two adapted matrices have identical weights"
            )
        (init,) = candidates
        nodes = users[init]
        if len(nodes) != 1 or nodes[0].op_type != "MatMul" or list(nodes[0].input).index(init) != 1:
            uses = ", ".join(f"{n.op_type}({n.name})" for n in nodes) or "nothing"
            raise ExportError(
                f"{name}: its weight {init} feeds {uses}, expected a single MatMul as input B; "
                "the graph cannot be quantized per matrix"
            )
        found[name] = AdaptedMatMul(nodes[0], init)
    return found


def _replace_initializer(graph: onnx.GraphProto, old: str, new: list[onnx.TensorProto]) -> None:
    """Drop ``old`` and append ``new``. Initializers are unordered; deleting in place avoids
    copying every other weight, which a rebuilt list would do per matrix."""
    position = next(i for i, init in enumerate(graph.initializer) if init.name == old)
    del graph.initializer[position]
    graph.initializer.extend(new)


def _nbits_initializers(prefix: str, packed: MatMulNBitsInitializers) -> list[onnx.TensorProto]:
    arrays = (packed.b, packed.scales, packed.zero_points)
    return [
        numpy_helper.from_array(array, f"{prefix}.{role}")
        for role, array in zip(NBITS_INPUTS, arrays)
        if array is not None
    ]


def quantize_matmul(
    graph: onnx.GraphProto,
    name: str,
    site: AdaptedMatMul,
    fmt: OnnxFormat,
    packed: MatMulNBitsInitializers,
    in_features: int,
    accuracy_level: int,
    lora: LoraBranch | None = None,
) -> None:
    """Replace ``site``'s MatMul by MatMulNBits (plus the side-car branch when given)."""
    out_features = packed.b.shape[0]
    tensors = _nbits_initializers(name, packed)
    x, y = site.node.input[0], site.node.output[0]
    base_out = f"{name}.base_output" if lora is not None else y
    nodes = [
        helper.make_node(
            NBITS_OP, [x, *(t.name for t in tensors)], [base_out], name=f"{name}.MatMulNBits", domain=MS_DOMAIN,
            K=in_features, N=out_features, bits=fmt.bits, block_size=fmt.block, accuracy_level=accuracy_level,
        )
    ]
    if lora is not None:
        a_t = numpy_helper.from_array(lora.a_t, f"{name}.lora_A_t")
        b_t = numpy_helper.from_array(lora.b_t, f"{name}.lora_B_scaled_t")
        tensors += [a_t, b_t]
        nodes += [
            helper.make_node("MatMul", [x, a_t.name], [f"{name}.lora_hidden"], name=f"{name}.lora_A"),  # (..., r)
            helper.make_node("MatMul", [f"{name}.lora_hidden", b_t.name], [f"{name}.lora_output"], name=f"{name}.lora_B"),
            helper.make_node("Add", [base_out, f"{name}.lora_output"], [y], name=f"{name}.lora_add"),
        ]
    position = list(graph.node).index(site.node)
    graph.node.remove(site.node)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    _replace_initializer(graph, site.initializer, tensors)


def fuse_transposed_weights(model: onnx.ModelProto) -> list[str]:
    """``MatMul(x, Transpose(W))`` with ``W`` an initializer -> ``FusedMatMul(x, W, transB=1)``.

    optimum shares a tied embedding with the head through a Transpose node. ONNX Runtime
    folds it when it loads the model, into a transposed copy: the embedding would sit in
    memory twice while the file, and the resolver, hold it once. FusedMatMul reads W as
    stored. Returns the initializers so read.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    users = _consumers(graph)
    fused = []
    for node in list(graph.node):
        weight = node.input[0] if node.op_type == "Transpose" else None
        if weight not in initializers or len(initializers[weight].dims) != 2:
            continue
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        matmuls = users[node.output[0]]
        if perm not in ([], [[1, 0]]) or not matmuls or any(
            m.op_type != "MatMul" or list(m.input) != [m.input[0], node.output[0]] or m.input[0] == node.output[0]
            for m in matmuls
        ):
            continue
        for m in matmuls:
            position = list(graph.node).index(m)
            graph.node.remove(m)
            graph.node.insert(position, helper.make_node(
                "FusedMatMul", [m.input[0], weight], list(m.output), name=m.name, domain=MS_DOMAIN,
                alpha=1.0, transA=0, transB=1,
            ))
        graph.node.remove(node)
        fused.append(weight)
    return fused


def use_ms_domain(model: onnx.ModelProto) -> None:
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    """Every MatMulNBits computes at ``level`` (0: exact fp32 dequantization; 4: int8 activations)."""
    for node in model.graph.node:
        if node.op_type == NBITS_OP:
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = level


def nbits_nodes(model: onnx.ModelProto) -> dict[str, dict[str, np.ndarray]]:
    """Matrix name -> MatMulNBits initializers by role, read from a (written) model."""
    arrays = {init.name: init for init in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == NBITS_OP:
            name = node.name.removesuffix(f".{NBITS_OP}")
            found[name] = {role: numpy_helper.to_array(arrays[i]) for role, i in zip(NBITS_INPUTS, node.input[1:])}
    return found


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer's data: the weights the runtime loads."""
    return sum(
        helper.tensor_dtype_to_np_dtype(init.data_type).itemsize * int(np.prod(init.dims))
        for init in model.graph.initializer
    )
