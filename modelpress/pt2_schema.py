"""The fields a ``.pt2`` program's JSON may hold: torch's export schema, as field lists per major version.

``torch.export.load`` reads ``models/model.json`` with ``_dict_to_dataclass``, which *ignores* keys
it does not know (forward compatibility). Here the opposite holds: every object is walked against
the dataclasses of ``torch/_export/serde/schema.py`` and a key that is not a field of its type, a
union with a variant torch does not define, an enum value outside its enum or a value of the wrong
JSON type is refused. The API never imports torch, so the field lists are copied here;
``tests/engine/test_pt2_code_paths.py`` regenerates them from the installed torch and fails when
they drift (update the table from its message when torch is upgraded).

Type expressions: ``str``, ``int``, ``float``, ``bool``, a type name of the tables below,
``list[T]``, ``dict[T]`` (string keys) and ``T?`` (may be null).
"""

from __future__ import annotations

# The serialization major version these lists describe (torch.export writes schema_version 8.x
# since torch 2.5; a minor bump only adds fields, which are then refused as unknown here).
SCHEMA_MAJOR = 8

STRUCTS: dict[str, dict[str, str]] = {
    "Device": {"type": "str", "index": "int?"},
    "SymExpr": {"expr_str": "str", "hint": "SymExprHint?"},
    "TensorMeta": {
        "dtype": "ScalarType",
        "sizes": "list[SymInt]",
        "requires_grad": "bool",
        "device": "Device",
        "strides": "list[SymInt]",
        "storage_offset": "SymInt",
        "layout": "Layout",
    },
    "TensorArgument": {"name": "str"},
    "TokenArgument": {"name": "str"},
    "GraphArgument": {"name": "str", "graph": "Graph"},
    "CustomObjArgument": {"name": "str", "class_fqn": "str"},
    "ComplexValue": {"real": "float", "imag": "float"},
    "NamedArgument": {"name": "str", "arg": "Argument", "kind": "ArgumentKind?"},
    "Node": {
        "target": "str",
        "inputs": "list[NamedArgument]",
        "outputs": "list[Argument]",
        "metadata": "dict[str]",
        "is_hop_single_tensor_return": "bool?",
        "name": "str?",
    },
    "Graph": {
        "inputs": "list[Argument]",
        "outputs": "list[Argument]",
        "nodes": "list[Node]",
        "tensor_values": "dict[TensorMeta]",
        "sym_int_values": "dict[SymInt]",
        "sym_bool_values": "dict[SymBool]",
        "is_single_tensor_return": "bool",
        "custom_obj_values": "dict[CustomObjArgument]",
        "sym_float_values": "dict[SymFloat]",
    },
    "UserInputSpec": {"arg": "Argument"},
    "InputToConstantInputSpec": {"name": "str", "value": "ConstantValue"},
    "InputToParameterSpec": {"arg": "TensorArgument", "parameter_name": "str"},
    "InputToBufferSpec": {"arg": "TensorArgument", "buffer_name": "str", "persistent": "bool"},
    "InputToTensorConstantSpec": {"arg": "TensorArgument", "tensor_constant_name": "str"},
    "InputToCustomObjSpec": {"arg": "CustomObjArgument", "custom_obj_name": "str"},
    "InputTokenSpec": {"arg": "TokenArgument"},
    "UserOutputSpec": {"arg": "Argument"},
    "LossOutputSpec": {"arg": "TensorArgument"},
    "BufferMutationSpec": {"arg": "TensorArgument", "buffer_name": "str"},
    "ParameterMutationSpec": {"arg": "TensorArgument", "parameter_name": "str"},
    "GradientToParameterSpec": {"arg": "TensorArgument", "parameter_name": "str"},
    "GradientToUserInputSpec": {"arg": "TensorArgument", "user_input_name": "str"},
    "UserInputMutationSpec": {"arg": "TensorArgument", "user_input_name": "str"},
    "OutputTokenSpec": {"arg": "TokenArgument"},
    "GraphSignature": {"input_specs": "list[InputSpec]", "output_specs": "list[OutputSpec]"},
    "RangeConstraint": {"min_val": "int?", "max_val": "int?"},
    "ModuleCallSignature": {
        "inputs": "list[Argument]",
        "outputs": "list[Argument]",
        "in_spec": "str",
        "out_spec": "str",
        "forward_arg_names": "list[str]?",
    },
    "ModuleCallEntry": {"fqn": "str", "signature": "ModuleCallSignature?"},
    "NamedTupleDef": {"field_names": "list[str]"},
    "GraphModule": {
        "graph": "Graph",
        "signature": "GraphSignature",
        "module_call_graph": "list[ModuleCallEntry]",
        "metadata": "dict[str]",
        "treespec_namedtuple_fields": "dict[NamedTupleDef]",
    },
    "SchemaVersion": {"major": "int", "minor": "int"},
    "ExportedProgram": {
        "graph_module": "GraphModule",
        "opset_version": "dict[int]",
        "range_constraints": "dict[RangeConstraint]",
        "schema_version": "SchemaVersion",
        "verifiers": "list[str]",
        "torch_version": "str",
        "guards_code": "list[str]",
    },
    "PayloadMeta": {"path_name": "str", "is_param": "bool", "use_pickle": "bool", "tensor_meta": "TensorMeta?"},
    "PayloadConfig": {"config": "dict[PayloadMeta]"},
}

# Unions are JSON objects with exactly one key: the variant.
UNIONS: dict[str, dict[str, str]] = {
    "SymExprHint": {"as_int": "int", "as_bool": "bool", "as_float": "float"},
    "SymInt": {"as_expr": "SymExpr", "as_int": "int"},
    "SymFloat": {"as_expr": "SymExpr", "as_float": "float"},
    "SymBool": {"as_expr": "SymExpr", "as_bool": "bool"},
    "SymIntArgument": {"as_name": "str", "as_int": "int"},
    "SymFloatArgument": {"as_name": "str", "as_float": "float"},
    "SymBoolArgument": {"as_name": "str", "as_bool": "bool"},
    "OptionalTensorArgument": {"as_tensor": "TensorArgument", "as_none": "bool"},
    "Argument": {
        "as_none": "bool",
        "as_tensor": "TensorArgument",
        "as_tensors": "list[TensorArgument]",
        "as_int": "int",
        "as_ints": "list[int]",
        "as_float": "float",
        "as_floats": "list[float]",
        "as_string": "str",
        "as_strings": "list[str]",
        "as_sym_int": "SymIntArgument",
        "as_sym_ints": "list[SymIntArgument]",
        "as_scalar_type": "ScalarType",
        "as_memory_format": "MemoryFormat",
        "as_layout": "Layout",
        "as_device": "Device",
        "as_bool": "bool",
        "as_bools": "list[bool]",
        "as_sym_bool": "SymBoolArgument",
        "as_sym_bools": "list[SymBoolArgument]",
        "as_graph": "GraphArgument",
        "as_optional_tensors": "list[OptionalTensorArgument]",
        "as_custom_obj": "CustomObjArgument",
        "as_operator": "str",
        "as_sym_float": "SymFloatArgument",
        "as_sym_floats": "list[SymFloatArgument]",
        "as_optional_tensor": "OptionalTensorArgument",
        "as_complex": "ComplexValue",
        "as_nested_tensors": "list[list[TensorArgument]]",
        "as_int_lists": "list[list[int]]",
        "as_string_to_argument": "dict[Argument]",
        "as_float_lists": "list[list[float]]",
    },
    "ConstantValue": {"as_none": "bool", "as_int": "int", "as_float": "float", "as_string": "str", "as_bool": "bool"},
    "InputSpec": {
        "user_input": "UserInputSpec",
        "parameter": "InputToParameterSpec",
        "buffer": "InputToBufferSpec",
        "tensor_constant": "InputToTensorConstantSpec",
        "custom_obj": "InputToCustomObjSpec",
        "token": "InputTokenSpec",
        "constant_input": "InputToConstantInputSpec",
    },
    "OutputSpec": {
        "user_output": "UserOutputSpec",
        "loss_output": "LossOutputSpec",
        "buffer_mutation": "BufferMutationSpec",
        "gradient_to_parameter": "GradientToParameterSpec",
        "gradient_to_user_input": "GradientToUserInputSpec",
        "user_input_mutation": "UserInputMutationSpec",
        "token": "OutputTokenSpec",
        "parameter_mutation": "ParameterMutationSpec",
    },
}

ENUMS: dict[str, tuple[int, ...]] = {
    "ArgumentKind": (0, 1, 2),
    "Layout": (0, 1, 2, 3, 4, 5, 6, 7),
    "MemoryFormat": (0, 1, 2, 3, 4),
    "ScalarType": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 28, 29, 30, 31, 32, 33, 34, 35),
}

# Floats torch's serializer writes as strings (allow_nan=False JSON).
FLOAT_WORDS = frozenset({"Infinity", "-Infinity", "NaN"})


def reachable(root: str) -> set[str]:
    """The type names ``root`` reaches through its fields (what the drift test compares)."""
    seen, stack = set(), [root]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for expression in {**STRUCTS.get(name, {}), **UNIONS.get(name, {})}.values():
            stack.extend(part for part in _names(expression) if part not in seen)
    return seen


def _names(expression: str) -> list[str]:
    for token in ("list[", "dict[", "]", "?"):
        expression = expression.replace(token, " ")
    return [part for part in expression.split() if part in STRUCTS or part in UNIONS or part in ENUMS]
