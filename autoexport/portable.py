"""Device-portable ExportedPrograms: a model.pt2 exported on a CPU machine must run, and compile with Inductor, on
CUDA after torch.export.passes.move_to_device_pass. Tracing on CPU writes the trace's device into the graph in two
kinds of node, which this pass removes before the program is saved or translated."""

from __future__ import annotations

import torch
from torch._export.passes.lift_constants_pass import ConstantAttrMap, lift_constants_pass
from torch.fx import Node

ASSERT_METADATA = torch.ops.aten._assert_tensor_metadata.default


def _has_device(value: object) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_has_device(v) for v in value)
    if isinstance(value, dict):
        return any(_has_device(v) for v in value.values())
    return isinstance(value, torch.device)


def _has_graph_input(value: object) -> bool:
    """Whether an argument depends on the graph (a node, or a symbolic size of a dynamic dimension)."""
    if isinstance(value, (list, tuple)):
        return any(_has_graph_input(v) for v in value)
    if isinstance(value, dict):
        return any(_has_graph_input(v) for v in value.values())
    return isinstance(value, (Node, torch.SymInt, torch.SymFloat, torch.SymBool))


def _written_through(node: Node) -> bool:
    """Whether an op writes into this node's tensor, directly or through a view of it (a canvas made with zeros()
    and filled with index_put_): such a tensor must stay a computation, since a lifted constant cannot be mutated."""
    pending, seen = [node], {node}
    while pending:
        current = pending.pop()
        for user in current.users:
            schema = getattr(user.target, "_schema", None)
            if schema is None:
                continue
            for position, argument in enumerate(schema.arguments):
                value = user.args[position] if position < len(user.args) else user.kwargs.get(argument.name)
                if not (value is current or (isinstance(value, (list, tuple)) and current in value)):
                    continue
                if argument.alias_info is not None and argument.alias_info.is_write:
                    return True
                if argument.alias_info is not None and user not in seen:  # a view of it: follow the view
                    seen.add(user)
                    pending.append(user)
    return False


def device_pinned_nodes(program: torch.export.ExportedProgram) -> list[Node]:
    """Nodes whose arguments name a device: what move_to_device_pass has to rewrite and Inductor can trip on."""
    return [n for n in program.graph.nodes if n.op == "call_function" and _has_device((n.args, n.kwargs))]


def make_device_portable(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Deletes `aten._assert_tensor_metadata` nodes and folds factory calls of static arguments (arange(32) of the
    pillar encoder's padding mask) into lifted constants, which move_to_device_pass moves with the weights."""
    gm = program.graph_module
    folded: list[Node] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is ASSERT_METADATA and not node.users:
            # A dtype/device check the tracer records for each .to(); it computes nothing, and its device=cpu
            # makes Dynamo fail ("failed to run FX node with fake tensors") once the program moves to CUDA.
            gm.graph.erase_node(node)
        elif (_has_device(node.kwargs) and not _has_graph_input((node.args, node.kwargs))
              and not _written_through(node)):
            folded.append(node)
    for index, node in enumerate(folded):
        value = node.target(*node.args, **node.kwargs)  # a factory call of literals: its value is known now
        name = f"_portable_constant_{index}"
        gm.register_buffer(name, value, persistent=False)  # only until lift_constants_pass lifts it
        with gm.graph.inserting_before(node):
            constant = gm.graph.get_attr(name)
        constant.meta = dict(node.meta)
        node.replace_all_uses_with(constant)
        gm.graph.erase_node(node)
    if folded:
        program._constants.update(lift_constants_pass(gm, program.graph_signature, ConstantAttrMap()))
        for index in range(len(folded)):
            delattr(gm, f"_portable_constant_{index}")
    gm.graph.lint()
    gm.recompile()
    return program
