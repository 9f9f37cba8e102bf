"""``--where`` expressions of ``ssl-study results`` as pyarrow dataset filters (pushed down to the Parquet scan).

The grammar is Python's expression syntax, restricted: column names, numbers, strings, True/False/None,
comparisons (``==  !=  <  <=  >  >=``, chains included), ``in`` / ``not in`` a list, ``and``, ``or``, ``not``,
and arithmetic (``+ - * /``). For example ``status == 'completed' and base_lr > 1e-3``. The expression is checked
against the table's schema before any file is scanned: a text column compared with a number, say, is refused.
"""

from __future__ import annotations

import ast
import operator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from study.errors import QueryError

_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def parse_where(text: str, schema: pa.Schema) -> ds.Expression:
    """``text`` as a filter over a table of ``schema``; QueryError names what is wrong with it."""
    columns, named = schema.names, []
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise QueryError(f"--where {text!r}: not an expression ({e.msg} at column {e.offset})") from None

    def build(node: ast.AST):
        if isinstance(node, ast.BoolOp):
            parts = [build(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~build(node.operand)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -node.operand.value
        if isinstance(node, ast.Compare):
            out, left = None, build(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, ast.In | ast.NotIn):
                    if not isinstance(right_node, ast.List | ast.Tuple):
                        raise QueryError(f"--where {text!r}: 'in' needs a literal list, e.g. status in ['a', 'b']")
                    test = left.isin([build(e) for e in right_node.elts])
                    test = ~test if isinstance(op, ast.NotIn) else test
                    right = None
                elif type(op) in _COMPARE:
                    right = build(right_node)
                    test = _COMPARE[type(op)](left, right)
                else:
                    raise QueryError(f"--where {text!r}: unsupported comparison {type(op).__name__}")
                out = test if out is None else out & test
                left = right
            return out
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            return _ARITH[type(node.op)](build(node.left), build(node.right))
        if isinstance(node, ast.Name):
            if node.id in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[node.id]
            if node.id not in columns:
                raise QueryError(f"--where {text!r}: unknown column '{node.id}'; columns: {', '.join(columns)}")
            named.append(node.id)
            return pc.field(node.id)
        if isinstance(node, ast.Constant):
            return node.value
        raise QueryError(f"--where {text!r}: {ast.unparse(node)!r} is not supported (columns, literals, "
                         f"comparisons, in, and/or/not, + - * /)")

    try:
        expr = build(tree)
        if isinstance(expr, ds.Expression):
            schema.empty_table().filter(expr)  # binds it to the columns' types: a mismatch raises here
    except (TypeError, ArithmeticError, pa.ArrowException) as e:  # 'a' < 1, 1 / 0, text > 1, a non-condition
        types = ", ".join(f"{n} ({schema.field(n).type})" for n in dict.fromkeys(named))
        raise QueryError(f"--where {text!r}: {str(e).splitlines()[0]}" + (f"; the columns it names: {types}"
                                                                          if types else "")) from None
    if not isinstance(expr, ds.Expression):
        raise QueryError(f"--where {text!r}: the expression names no column")
    return expr
