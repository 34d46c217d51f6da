"""A module's own forward with its residual sums made Admin's, each in the sum's own operation.

A Post-LN layer's code writes each residual sum as ``norm(x + f)``, in the layer (BART's
``hidden_states = residual + hidden_states; hidden_states = self.self_attn_layer_norm(hidden_states)``) or in an
output module called as ``module(f, x)`` (BERT's ``self.LayerNorm(hidden_states + input_tensor)``). Hooks can turn
such a sum into Admin's ``omega * x + f`` (`admin_torch.hooks`), at the price of hook calls and one more operation
per sum (3-4% of a small BERT's or BART's training step on CPU). This module instead reads the class's forward
(its syntax tree, from its source), replaces each of those sums by ``omegas[i].add_scaled(f, x)`` (one operation,
[`OmegaResidual.add_scaled`][admin_torch.OmegaResidual.add_scaled]), compiles that function once per class and sets
it, bound to the module and its omegas, as the instance's ``forward``: the module's own code, with Admin's sums, the
stock number of operations forward and one multiply more per sum backward.

It rewrites only what it can prove is that sum, else nothing (the caller keeps the hooks): each norm is called
exactly once in the forward, as ``self.<norm>(a + b)`` or as ``v = a + b`` followed by ``v = self.<norm>(v)``;
of ``a`` and ``b`` exactly one is the residual stream, a plain name (``x``: the layer's input, or the output of a
LayerNorm of the layer applied to such a proved sum, through plain copies such as ``residual = hidden_states``, on
every branch; for an output module, its second argument), the other is not; the forward has no decorator, no closure
(``super()``), no loop, ``try`` or nested function, no name of its own that the rewrite adds, does not rebind
``self``, and its source is the code it runs (names and constants compared: not edited since its import, no private
name that its class mangles).

Examples:
    >>> from admin_torch.residual import OmegaResidual
    >>> class Block(nn.Module):   # LN(x + fc(x)), written as HuggingFace's BART writes it
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)
    ...     def forward(self, hidden_states):
    ...         residual = hidden_states
    ...         hidden_states = self.fc(hidden_states)
    ...         hidden_states = residual + hidden_states
    ...         hidden_states = self.norm(hidden_states)
    ...         return hidden_states
    >>> block, omega, x = Block(), OmegaResidual(2.0), torch.randn(3, 8)
    >>> expected = block.norm(2.0 * x + block.fc(x))
    >>> handle = install(block, ["norm"], [omega], stream_args=(0,))
    >>> torch.allclose(block(x), expected)
    True
    >>> handle.remove()   # the class's forward again
    >>> "forward" in vars(block)
    False
"""

import ast
import inspect
import textwrap
import functools
import types
import weakref
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

import torch  # noqa: F401 (the doctests' namespace)
from torch import nn

from .residual import OmegaResidual

__all__ = ["FusedForward", "rewrite", "install"]

_OMEGAS = "_admin_omegas_"  # the parameter the rewritten forward takes its omegas in
_UNKNOWN = "?"  # the origin of a value the rewrite cannot follow
_SUM = "sum"  # the origin of a proved sum x + f (not the stream; a LayerNorm of it is)
_NORM_TYPES = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_REFUSED_NODES = (ast.For, ast.AsyncFor, ast.While, ast.Try, ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                  ast.ClassDef, ast.Global, ast.Nonlocal, ast.Match) + ((ast.TryStar,) if hasattr(ast, "TryStar") else ())
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)  # a scope of their own, run later

Origins = Dict[str, FrozenSet[str]]


def _self_path(node: ast.AST, self_name: str) -> Optional[str]:
    """``"a.b"`` for the expression ``self.a.b``; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == self_name and parts:
        return ".".join(reversed(parts))
    return None


def _norm_call(node: ast.AST, self_name: str) -> Optional[Tuple[str, ast.AST]]:
    """``(path, argument)`` of ``self.<path>(argument)`` (one positional argument, no keywords); None otherwise."""
    if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords \
            and not isinstance(node.args[0], ast.Starred):
        path = _self_path(node.func, self_name)
        if path is not None:
            return path, node.args[0]
    return None


def _is_sum(node: ast.AST) -> bool:
    """``a + b`` with a plain name on at least one side (the stream must be one) and no ``:=`` inside (the rewrite
    evaluates ``f`` before ``x``: nothing in ``f`` may rebind ``x``)."""
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) \
        and (isinstance(node.left, ast.Name) or isinstance(node.right, ast.Name)) \
        and not any(isinstance(sub, ast.NamedExpr) for sub in ast.walk(node))


class _Rewriter:
    """Finds the sums of one forward (see the module docstring): ``found[norm path] = (the sum node, (f, x))``."""

    def __init__(self, fn: ast.FunctionDef, module: nn.Module, norms: Sequence[str], stream_args: Tuple[int, ...]):
        self.module, self.norms, self.found = module, list(norms), {}
        params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
        self.self_name, inputs = params[0], params[1:]
        self.stream = frozenset(f"arg:{i}" for i in stream_args)
        self.origins: Origins = {name: frozenset([f"arg:{i}"]) for i, name in enumerate(inputs)}
        for a in fn.args.kwonlyargs + [a for a in (fn.args.vararg, fn.args.kwarg) if a is not None]:
            self.origins[a.arg] = frozenset([_UNKNOWN])
        self.layer_norms = not any(s.startswith("arg:") and s != "arg:0" for s in self.stream)

    def _is_stream_norm(self, path: str) -> bool:
        """A LayerNorm of this module whose output is the residual stream (a layer's; not an output module's)."""
        if not self.layer_norms:
            return False
        try:
            target = self.module.get_submodule(path)
        except AttributeError:
            return False
        return path in self.norms or isinstance(target, _NORM_TYPES)

    def _origin(self, node: ast.AST) -> FrozenSet[str]:
        if isinstance(node, ast.Name):
            return self.origins.get(node.id, frozenset([_UNKNOWN]))
        call = _norm_call(node, self.self_name)
        # a LayerNorm's output is the stream only where it normalizes a proved sum x + f (a sandwich norm's of
        # f alone is not)
        if call is not None and self._is_stream_norm(call[0]) and self._proved_sum(call[1]):
            return frozenset([f"norm:{call[0]}"])
        if self._proved_sum(node):
            return frozenset([_SUM])
        return frozenset([_UNKNOWN])

    def _proved_sum(self, node: ast.AST) -> bool:
        """``node`` is ``a + b`` (or a name bound to it) with exactly one of ``a``, ``b`` the stream."""
        if isinstance(node, ast.Name):
            return self.origins.get(node.id) == frozenset([_SUM])
        return _is_sum(node) and self._sum_operands(node) is not None

    def _in_stream(self, origins: FrozenSet[str]) -> bool:
        return bool(origins) and all(o in self.stream or o.startswith("norm:") for o in origins)

    def _sum_operands(self, node: ast.BinOp) -> Optional[Tuple[ast.expr, str]]:
        """``(f, name of x)`` of ``a + b`` where exactly one of them is the stream, a plain name."""
        sa, sb = (isinstance(n, ast.Name) and self._in_stream(self.origins.get(n.id, frozenset([_UNKNOWN])))
                  for n in (node.left, node.right))
        if sa == sb:
            return None
        return (node.right, node.left.id) if sa else (node.left, node.right.id)

    def _replace(self, node: ast.BinOp, path: str) -> bool:
        operands = self._sum_operands(node)
        if operands is None or path in self.found:
            return False
        self.found[path] = (node, operands)
        return True

    def walk(self, body: List[ast.stmt]) -> None:
        for k, stmt in enumerate(body):
            if isinstance(stmt, ast.If):
                self._forget_stores(stmt.test)  # (a := ...) in the test
                before = dict(self.origins)
                self.walk(stmt.body)
                after_body, self.origins = self.origins, dict(before)
                self.walk(stmt.orelse)
                for name in set(after_body) | set(self.origins):
                    self.origins[name] = after_body.get(name, frozenset([_UNKNOWN])) | \
                        self.origins.get(name, frozenset([_UNKNOWN]))
                continue
            if isinstance(stmt, (ast.With, ast.AsyncWith)):
                for item in stmt.items:  # ``as v`` and (a := ...) bind values the rewrite does not follow
                    self._forget_stores(item)
                self.walk(stmt.body)
                continue
            if not any(isinstance(node, ast.NamedExpr) for node in ast.walk(stmt)):
                # (not inside a comprehension: its own variables, run many times or later)
                deferred = {id(n) for c in ast.walk(stmt) if isinstance(c, _COMPREHENSIONS) for n in ast.walk(c)}
                for node in ast.walk(stmt):  # self.norm(a + b), anywhere in the statement
                    if id(node) in deferred:
                        continue
                    call = _norm_call(node, self.self_name)
                    if call is not None and call[0] in self.norms and _is_sum(call[1]):
                        self._replace(call[1], call[0])
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                target, value = stmt.targets[0].id, stmt.value
                if _is_sum(value) and k + 1 < len(body):  # v = a + b; v = self.norm(v)
                    nxt = body[k + 1]
                    call = _norm_call(nxt.value, self.self_name) if isinstance(nxt, ast.Assign) else None
                    if call is not None and call[0] in self.norms and len(nxt.targets) == 1 \
                            and isinstance(nxt.targets[0], ast.Name) and nxt.targets[0].id == target \
                            and isinstance(call[1], ast.Name) and call[1].id == target:
                        self._replace(value, call[0])
                self._forget_stores(value)  # (a := ...) inside the value
                self.origins[target] = self._origin(value)
                continue
            self._forget_stores(stmt)  # any other binding: a value the rewrite does not follow

    def _forget_stores(self, node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
                self.origins[sub.id] = frozenset([_UNKNOWN])
            elif isinstance(sub, ast.alias):  # import a.b as c binds c, import a.b binds a
                self.origins[sub.asname or sub.name.split(".")[0]] = frozenset([_UNKNOWN])


def _norm_calls(tree: ast.AST, self_name: str, path: str) -> int:
    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.Call) and _self_path(node.func, self_name) == path)


def _unwrap(forward) -> Tuple[Optional[object], Optional[object], str]:
    """``(function, wrapper or None, why not)``: ``forward`` itself, or, for a wrapper made with ``functools.wraps``
    that holds the function it wraps in its closure (transformers' gradient-checkpointing wrapper of
    ``GradientCheckpointingLayer.forward``), that function and the wrapper (made again around the rewrite)."""
    wrapper = None
    if inspect.isfunction(forward) and inspect.isfunction(getattr(forward, "__wrapped__", None)):
        wrapper, forward = forward, forward.__wrapped__
        cells = wrapper.__closure__ or ()
        holding = [c for c in cells if _cell(c) is forward]
        if len(holding) != 1 or hasattr(forward, "__wrapped__"):
            return None, None, "its forward is wrapped in a way the rewrite cannot reproduce"
    if not inspect.isfunction(forward):
        return None, None, "its forward is not a Python function"
    if forward.__code__.co_freevars:
        return None, None, "its forward is a closure (super() or a nested function's variables)"
    return forward, wrapper, ""


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _parse(cls: type) -> Tuple[Optional[ast.FunctionDef], Optional[object], Optional[object], str]:
    """``(function tree, forward, its wrapper, why not)`` of ``cls.forward``."""
    forward, wrapper, why = _unwrap(getattr(cls, "forward", None))
    if forward is None:
        return None, None, None, why
    try:
        source = textwrap.dedent(inspect.getsource(forward))
        lines, first = inspect.getsourcelines(forward)
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None, None, None, "the source of its forward is not available"
    fn = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(fn, ast.FunctionDef) or fn.decorator_list or not (fn.args.posonlyargs + fn.args.args):
        return None, None, None, "its forward is decorated or is no plain method"
    if any(isinstance(node, _REFUSED_NODES) for node in ast.walk(ast.Module(body=fn.body, type_ignores=[]))):
        return None, None, None, "its forward has a loop, a try, a nested function or a scope statement"
    if any(isinstance(node, ast.Name) and node.id == _OMEGAS for node in ast.walk(fn)) or \
            any(a.arg == _OMEGAS for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs):
        return None, None, None, f"its forward uses the name {_OMEGAS}"
    self_name = (fn.args.posonlyargs + fn.args.args)[0].arg
    if any(isinstance(node, ast.Name) and node.id == self_name and not isinstance(node.ctx, ast.Load)
           for node in ast.walk(fn)):
        return None, None, None, f"its forward rebinds {self_name}"
    # the text read is the code that runs: not edited since the import, no private name (mangled in a class body,
    # not in the function compiled again)
    code = next(c for c in compile(tree, "<admin_torch.fused_sums>", "exec").co_consts if inspect.iscode(c))
    if _code_names(code) != _code_names(forward.__code__):
        return None, None, None, "the source of its forward is not the code it runs (edited since its import, or " \
                                 "private names)"
    ast.increment_lineno(tree, first - 1)
    return fn, forward, wrapper, ""


def _code_names(code) -> tuple:
    """The names and constants (but strings: a docstring is dedented) of a code object and of those inside it."""
    return (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
            tuple(c for c in code.co_consts if not isinstance(c, str) and not inspect.iscode(c)),
            tuple(_code_names(c) for c in code.co_consts if inspect.iscode(c)))


class Rewritten(NamedTuple):
    """A class's forward with Admin sums: ``fn(omegas, self, *args, **kwargs)``; ``wrapper``: the class's wrapper
    of its forward (None if none), ``inner``: the function it wraps."""

    fn: object
    wrapper: Optional[object]
    inner: Optional[object]


#: per class (weakly: a class made at run time is not kept alive), per (norms, stream, LayerNorm paths): the rewrite
_CACHE: "weakref.WeakKeyDictionary[type, Dict[tuple, Tuple[Optional[Rewritten], str]]]" = weakref.WeakKeyDictionary()


def rewrite(module: nn.Module, norms: Sequence[str], stream_args: Tuple[int, ...]) -> Tuple[Optional[Rewritten], str]:
    """The forward of ``type(module)`` with the sum entering each of ``norms`` (paths below ``module``, in order)
    replaced by ``omegas[i].add_scaled(f, x)``, as a function ``(omegas, self, *args, **kwargs)``; or
    ``(None, why)`` where that cannot be proved to be the Admin function (see the module docstring). A forward
    wrapped by its class (transformers' gradient checkpointing) is rewritten inside: `FusedForward` wraps the
    rewrite the same way.

    ``stream_args``: the forward's arguments that are the residual stream (after ``self``): ``(0,)`` for a layer
    (its input; its LayerNorms' outputs are the stream too), ``(1,)`` for an output module called as ``(f, x)``.
    Made once per class, norms and stream (the structure the rewrite relies on belongs to the class).
    """
    # the proof also reads which submodules are LayerNorms (their outputs are the stream): part of the key
    key = (tuple(norms), tuple(stream_args),
           frozenset(n for n, m in module.named_modules() if n in norms or isinstance(m, _NORM_TYPES)))
    cache = _CACHE.setdefault(type(module), {})
    if key in cache:
        return cache[key]
    fn, forward, wrapper, why = _parse(type(module))
    if fn is not None:
        self_name = (fn.args.posonlyargs + fn.args.args)[0].arg
        for path in norms:
            if _norm_calls(fn, self_name, path) != 1:
                fn, why = None, f"its forward does not call {path} exactly once"
                break
    if fn is not None:
        rewriter = _Rewriter(fn, module, norms, tuple(stream_args))
        rewriter.walk(fn.body)
        missing = [p for p in norms if p not in rewriter.found]
        if missing:
            fn, why = None, f"no sum x + f(x) that provably enters {missing[0]}"
    if fn is None:
        cache[key] = (None, why)
        return cache[key]
    parent = {id(child): node for node in ast.walk(fn) for child in ast.iter_child_nodes(node)}
    for i, path in enumerate(norms):
        node, (f, x) = rewriter.found[path]
        call = ast.Call(func=ast.Attribute(value=ast.Subscript(value=ast.Name(_OMEGAS, ast.Load()),
                                                               slice=ast.Constant(i), ctx=ast.Load()),
                                           attr="add_scaled", ctx=ast.Load()),
                        args=[f, ast.Name(x, ast.Load())], keywords=[])
        holder = parent[id(node)]
        for field, value in ast.iter_fields(holder):
            if value is node:
                setattr(holder, field, ast.copy_location(call, node))
            elif isinstance(value, list):
                value[:] = [ast.copy_location(call, node) if v is node else v for v in value]
    args = fn.args
    for a in args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]:
        a.annotation = None  # evaluated at definition otherwise: nothing the rewrite needs
    fn.returns = None
    (args.posonlyargs if args.posonlyargs else args.args).insert(0, ast.arg(_OMEGAS))
    fn.name = forward.__name__
    tree = ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[]))
    namespace: Dict[str, object] = {}
    # the class's own file and lines: a traceback through the rewritten forward points at the code it came from
    exec(compile(tree, inspect.getsourcefile(forward) or "<admin_torch.fused_sums>", "exec"),
         forward.__globals__, namespace)
    new = namespace[fn.name]
    new.__defaults__, new.__kwdefaults__ = forward.__defaults__, forward.__kwdefaults__
    new.__qualname__ = forward.__qualname__ + " (Admin sums)"
    cache[key] = (Rewritten(new, wrapper, forward), "")
    return cache[key]


_ABSENT = object()


class _MissingResidualInput(TypeError, RuntimeError):
    """A converted module called with None for its residual stream (``input_tensor``): a missing argument, hence
    TypeError (as Python's own); also a RuntimeError, what the hooks raised before."""


class FusedForward:
    """The forward of a module whose sums `rewrite` made Admin's, set as the instance's ``forward``: calls the
    rewritten function with the module and its omegas, inside the class's own wrapper of its forward if it has one
    (transformers' gradient checkpointing keeps working). Held by the module it serves, so copied and pickled with
    it (the function is made again after unpickling, from the class's forward).

    Args:
        module: the module.
        norms: the paths of its sums' norms.
        omegas: one [`OmegaResidual`][admin_torch.OmegaResidual] per norm.
        stream_args: see `rewrite`.
    """

    def __init__(self, module: nn.Module, norms: Sequence[str], omegas: Sequence[OmegaResidual],
                 stream_args: Tuple[int, ...]):
        self.module, self.norms, self.omegas, self.stream_args = module, tuple(norms), list(omegas), tuple(stream_args)
        self._names = list(inspect.signature(type(module).forward).parameters)[1:]
        self.call = self._make()

    def _make(self):
        """``(*args, **kwargs) -> output``: the rewritten function bound to the module and its omegas."""
        rewritten, why = rewrite(self.module, self.norms, self.stream_args)
        if rewritten is None:
            raise RuntimeError(f"admin_torch: {type(self.module).__name__}'s sums cannot be rewritten ({why}): "
                               "convert a stock copy of the model again")
        fn = functools.partial(rewritten.fn, self.omegas)
        self.__dict__["_outer"], self.__dict__["_cls"] = [], type(self.module)
        if rewritten.wrapper is None:
            return functools.partial(fn, self.module)
        # the class's wrapper again, around the rewrite: its closure with the wrapped function replaced
        w = rewritten.wrapper
        cells = tuple(types.CellType(fn if _cell(c) is rewritten.inner else _cell(c)) for c in w.__closure__)
        # transformers' wrapper checkpoints only as the outermost forward (``type(self).forward is <itself>``); the
        # instance's forward always is one (no class wrapper calls it): `__call__` keeps that cell the class's
        # forward, also after the class is subclassed and wrapped again (FSDP2's ``FSDP<Layer>``)
        self.__dict__["_outer"] = [new for new, old in zip(cells, w.__closure__) if _cell(old) is w]
        wrapper = types.FunctionType(w.__code__, w.__globals__, w.__name__, w.__defaults__, cells)
        wrapper.__kwdefaults__ = w.__kwdefaults__
        return functools.partial(wrapper, self.module)

    def __call__(self, *args, **kwargs):
        for i in self.stream_args:  # never a silently different function: the stream is a tensor
            if (args[i] if len(args) > i else kwargs.get(self._names[i], _ABSENT)) is None:
                raise _MissingResidualInput(
                    f"admin_torch: converted {type(self.module).__name__} called without its residual input: "
                    f"{self._names[i]} (argument {i + 1}, or {self._names[i]}=) is required, a tensor")
        call = self.call
        if type(self.module) is not self._cls:  # subclassed since (FSDP2): the wrapper's outermost test follows
            self._cls = type(self.module)
            for cell in self._outer:
                cell.cell_contents = self._cls.forward
        return call(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        """The class forward's signature (what HuggingFace reads of ``module.forward``)."""
        return inspect.signature(type(self.module).forward.__get__(self.module))

    @property
    def __code__(self):
        """The class forward's code, as a bound method gives it (``torch.export`` reads its name, file and line)."""
        return type(self.module).forward.__code__

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("call", "_outer", "_cls")}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __getattr__(self, name):
        if name == "call":  # unpickled: made again on first use (the module may not be unpickled yet)
            self.__dict__["call"] = call = self._make()
            return call
        raise AttributeError(name)


class _Installed:
    """The handle of an installed `FusedForward`: ``remove()`` gives the module its class's forward back (as a
    hook's ``RemovableHandle`` removes the hook)."""

    def __init__(self, module: nn.Module, forward: FusedForward):
        self.module, self.forward = module, forward

    def remove(self) -> None:
        if vars(self.module).get("forward") is self.forward:
            del self.module.forward


def install(module: nn.Module, norms: Sequence[str], omegas: Sequence[OmegaResidual],
            stream_args: Tuple[int, ...] = (0,)) -> Optional[_Installed]:
    """Give ``module`` Admin's sums (``omegas[i]`` for the sum entering ``norms[i]``) in its own forward, in place;
    returns a handle whose ``remove()`` undoes it, or None where `rewrite` refuses (nothing changed) or the
    instance already has a ``forward`` of its own or a ``__call__`` other than PyTorch's."""
    if len(norms) != len(omegas) or not all(isinstance(o, OmegaResidual) for o in omegas):
        raise ValueError(f"omegas: one OmegaResidual per norm ({len(norms)}), got {omegas!r}")
    if "forward" in vars(module) or type(module).__call__ is not nn.Module.__call__:
        return None
    if rewrite(module, norms, stream_args)[0] is None:
        return None
    forward = FusedForward(module, norms, omegas, stream_args)
    module.forward = forward
    return _Installed(module, forward)
