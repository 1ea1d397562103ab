"""The bounded Jinja sandbox prompt templates render in (worldgen/prompts.py renders with it).

Templates may come from world configs posted over HTTP, so beyond Jinja's sandbox (no attribute escapes):

- no string, list or number a template builds may exceed `Limits.template_chars` (characters, items or
  digits); every place a template creates something big is checked *before* it is built (operators, `~`,
  literals, calls, filters, a block's output), so a `{{ 'x' * 10**9 }}` allocates nothing, and what a
  list or dict holds is counted over the render, so a loop cannot pile up strings in one either;
- the rendered text may not exceed `template_chars` either, counted while it is generated;
- a render stops after `Limits.template_seconds`: loops, calls, filters and operators check the clock
  (cooperative checks rather than an asynchronous exception from a watchdog: nothing can land late in
  unrelated code).

A check that fails raises `OverLimit`; `set_template_limits` sets the process's limits (a server passes its
settings).
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import Namespace, _PassArg
from jinja2.visitor import NodeTransformer

from worldgen.limits import DEFAULT_LIMITS, Limits, current_limits


# ---- bounds: what a render may build, and for how long ---------------------------------------------------
class _Budget:
    """The limits of the render running in a thread; `deadline` is a time.monotonic() (inf: no render)."""

    __slots__ = ("chars", "seconds", "deadline", "held")

    def __init__(self, limits: Limits, deadline: float = math.inf):
        self.chars = limits.template_chars
        self.seconds = limits.template_seconds
        self.deadline = deadline
        self.held: dict[int, tuple[Any, int]] = {}  # see _hold


class _Local(threading.local):
    # Renders run in any thread (Ray actor threads, Serve replicas), each with its own budget; outside a
    # render (Jinja folding constants while it compiles) the class attribute holds: sizes, no deadline.
    budget = _Budget(DEFAULT_LIMITS)


_local = _Local()
_limits = DEFAULT_LIMITS


def set_template_limits(limits: Limits) -> None:
    """Bound every later render in this process by `limits.template_chars` and `limits.template_seconds`
    (a server passes its settings; the default is `DEFAULT_LIMITS`)."""
    global _limits
    _limits = limits
    _Local.budget = _Budget(limits)


def template_limits() -> Limits:
    return _limits


class OverLimit(Exception):
    """A check failed inside a render; render_prompt turns it into a LimitExceeded naming the template."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


def _step(size: int = 0, what: str = "") -> None:
    """The check every hook makes before it builds something of about `size` characters (or items, or
    digits): the size against `template_chars`, the clock against the render's deadline."""
    budget = _local.budget
    if size > budget.chars:
        raise OverLimit(
            "template_chars", f"{what} would build about {size:,} characters or items, over {budget.chars:,}"
        )
    if time.monotonic() > budget.deadline:
        raise OverLimit("template_seconds", f"ran longer than {budget.seconds:g} s")


def _shape(value: Any) -> tuple[int, int, int]:
    """(characters, items, depth) of `str(value)` or its JSON, about: quotes, separators and brackets
    counted, escapes not (they grow a string by a bounded factor, and the result is checked again). The walk
    stops once past `template_chars`, so it costs at most that many steps, even for a list that holds itself
    or shares sublists (`[a, a]` nested 40 times prints 2^40 copies). Breadth first: the depth comes free."""
    limit = _local.budget.chars
    chars = items = depth = 0
    level = [value]
    while level and chars <= limit:
        depth += 1
        items += len(level)
        below: list[Any] = []
        for v in level:
            kind = type(v)  # exact types first: this loop runs on every measured value
            if kind is str or kind is bytes:
                chars += len(v) + 4
            elif kind is int:
                chars += v.bit_length() * 3 // 10 + 3
            elif kind is dict:
                chars += 2
                below += v.keys()
                below += v.values()
            elif kind is list or kind is tuple:
                chars += 2
                below += v
            elif kind is float:
                chars += 24
            else:
                chars += _other_size(v, below)
            if chars > limit:
                break
        level = below
    return chars, items, depth


def _other_size(v: Any, below: list[Any]) -> int:
    """_shape's slower path: subclasses (bool, Markup...), sets, namespaces and objects of the context."""
    if isinstance(v, (str, bytes)):
        return len(v) + 4
    if isinstance(v, int):
        return _digits(v) + 2
    if isinstance(v, Mapping):
        below += v.keys()
        below += v.values()
        return 2
    if isinstance(v, (list, tuple, set, frozenset)):
        below += v
        return 2
    if isinstance(v, Namespace):  # prints as "<Namespace {...}>"; its attributes are in a private dict
        below.append(object.__getattribute__(v, "_Namespace__attrs"))
        return 13
    return 8  # floats, None, and the context's own objects (their str() is the world's business)


def _size(value: Any) -> int:
    """Characters `str(value)` takes, about (see _shape); strings and numbers, the common case, without a walk."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int):
        return _digits(value)
    return 24 if isinstance(value, float) else _shape(value)[0]


def _digits(n: int) -> int:
    return n.bit_length() * 3 // 10 + 1


_NUMBER = re.compile(r"\d+")
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")  # "{:{}}": a width given by an argument


def _format_size(fmt: str | bytes, args: Any, percent: bool = True) -> int:
    """Worst case of `fmt % args` (`percent`) or `fmt.format(*args)` (a tuple): each field prints the biggest
    argument, every number in the format may be a width or a precision, and with `%*d` or `{:{}}` so may
    every int argument."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    values = args if isinstance(args, tuple) else (args,)
    widths = sum(int(n) if len(n) < 10 else 10**10 for n in _NUMBER.findall(text))
    if ("*" in text) if percent else _NESTED_FIELD.search(text):
        widths += sum(abs(v) for v in values if isinstance(v, int))
    fields = text.count("%" if percent else "{")
    return len(text) + fields * max(map(_size, values), default=0) + widths


def _format_filter_size(value: Any, *args: Any, **kwargs: Any) -> int:
    _step(_size(value), "filter 'format'")  # str(value) comes first
    return _format_size(str(value), tuple(kwargs.values()) or args)


def _binop_size(operator: str, left: Any, right: Any) -> int:
    """What `left <operator> right` builds, before it is built (only the growing operators are intercepted)."""
    if operator == "%":
        return _format_size(left, right) if isinstance(left, (str, bytes)) else 0
    if operator == "**":
        # digits of left ** right; |left| <= 1 stays small whatever the exponent
        big = isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
        return left.bit_length() * right * 3 // 10 if big else 0
    if operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            return _digits(left) + _digits(right)
        seq, times = (left, right) if isinstance(right, int) else (right, left)
        return _size(seq) * times if isinstance(seq, _SEQUENCES) and isinstance(times, int) else 0
    # "+"
    return _size(left) + _size(right) if isinstance(left, _SEQUENCES) else 0


_SEQUENCES = (str, bytes, list, tuple)
_CONTAINERS = (str, bytes, list, tuple, dict, set, frozenset)


def _ticking(iterable: Iterable[Any]) -> Iterator[Any]:
    """Iterate with a clock check per item: a loop body or a lazy filter chain cannot outrun the deadline."""
    for item in iterable:
        _step()
        yield item


def _checked(value: Any, what: str) -> Any:
    """A call's or a filter's result: its length checked (a string may grow by a bounded factor, e.g.
    escaping, so no estimate caught it), and a lazy one made to tick."""
    if isinstance(value, _CONTAINERS):
        _step(len(value), what)
    elif isinstance(value, Iterator):
        return _ticking(value)
    return value


def _replace_size(s: Any, old: Any, new: Any, count: int | None = -1) -> int:
    size, old_size = _size(s), _size(old)
    times = size + 1 if not old_size else size // old_size
    if count is not None and count >= 0:
        times = min(times, count)
    return size + times * max(_size(new) - old_size, 0)


def _translate_size(s: Any, table: Any) -> int:
    longest = max(map(_size, table.values()), default=1) if isinstance(table, Mapping) else 1
    return len(s) * max(longest, 1)


# str (and bytes) methods that build more than their inputs: what they build, from their arguments
_TEXT_METHODS: dict[str, Callable[..., int]] = {
    "center": lambda s, width, *fill: max(len(s), width),
    "ljust": lambda s, width, *fill: max(len(s), width),
    "rjust": lambda s, width, *fill: max(len(s), width),
    "zfill": lambda s, width: max(len(s), width),
    "expandtabs": lambda s, tabsize=8: len(s) * max(tabsize, 1),
    "replace": _replace_size,
    "translate": _translate_size,
    "join": lambda s, items: _size(items) + len(s) * len(items),
}


# the methods of list, dict and set that store their arguments
_STORING = frozenset({"append", "extend", "insert", "update", "setdefault", "add"})


def _hold(container: Any, added: int, what: str) -> None:
    """A list, dict or set a template stores `added` characters' worth into: what it holds is kept for the
    render (walked the first time, then summed), so appending fresh strings in a loop stops at
    template_chars, and so does nesting (`l.append(l2)` twice doubles what `l` prints)."""
    budget = _local.budget
    held = budget.held.get(id(container))
    size = (held[1] if held and held[0] is container else _size(container)) + added
    _step(size, what)
    budget.held[id(container)] = (container, size)  # holding `container` keeps its id from being reused


def _indent_size(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> int:
    lines = s.count("\n") + 1 if isinstance(s, str) else _size(s) + 1
    return _size(s) + lines * (len(width) if isinstance(width, str) else width)


def _wordwrap_size(
    s: Any,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> int:
    size = _size(s)
    lines = 2 * size // max(width, 1) + (s.count("\n") if isinstance(s, str) else size) + 1
    return size + lines * len(wrapstring or "\n")


def _sum_size(items: Sized, attribute: Any = None, start: Any = 0) -> int:
    # sum() of lists or tuples copies each partial result: len(items) copies of up to the whole
    if not isinstance(start, _SEQUENCES):
        return 0
    return len(items) * (_size(items) + _size(start))


def _pretty_size(value: Any, indent: int | str | None = None) -> int:
    # pretty JSON (and pprint) puts every item on a line of its own, indented by its depth
    chars, items, depth = _shape(value)
    step = len(indent) if isinstance(indent, str) else indent or 1
    return chars + items * (1 + step * depth)


# filters that build more than their inputs: what they build, from their arguments (after the one Jinja
# passes for @pass_environment and the like)
_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda value, width=80: max(_size(value), width),
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "replace": _replace_size,
    "format": _format_filter_size,
    "join": lambda value, d="", attribute=None: _size(value) + _size(d) * len(value),
    "sum": _sum_size,
    "batch": lambda value, linecount, fill_with=None: 0 if fill_with is None else linecount,
    "slice": lambda value, slices, fill_with=None: slices,
    "tojson": _pretty_size,
    "pprint": _pretty_size,
}
# filters that consume their whole input at once: given a lazy one, they get a list, so it can be measured
_WHOLE_INPUT = {"join", "sum"}
# filters that print their input as text: a container's printed size is measured first
# (and the tests `is lower`, `is upper`)
_TEXT_FILTERS = {
    "string",
    "e",
    "escape",
    "forceescape",
    "upper",
    "lower",
    "title",
    "capitalize",
    "trim",
    "striptags",
    "truncate",
    "wordcount",
    "urlencode",
    "safe",
    "xmlattr",
}


def _text_size(value: Any, *args: Any, **kwargs: Any) -> int:
    return _size(value)


def _bounded_filter(name: str, func: Callable[..., Any], kind: str = "filter") -> Callable[..., Any]:
    """`func` measured first (see _FILTER_SIZES and _TEXT_FILTERS) and its result checked."""
    passed = 1 if _PassArg.from_obj(func) else 0  # Jinja's own first argument (environment, context...)
    estimate = _FILTER_SIZES.get(name) or (_text_size if name in _TEXT_FILTERS else None)
    what = f"{kind} '{name}'"

    @functools.wraps(func)  # keeps func's jinja_pass_arg
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if name in _WHOLE_INPUT and len(args) > passed and not isinstance(args[passed], Sized):
            args = (*args[:passed], list(args[passed]), *args[passed + 1 :])
        _step(estimate(*args[passed:], **kwargs) if estimate else 0, what)
        return _checked(func(*args, **kwargs), what)

    return bounded


def _concat(parts: list[Any]) -> str:
    """`a ~ b ~ ...`, measured first (see _Bounder)."""
    _step(sum(map(_size, parts)), "'~'")
    return "".join(map(str, parts))


def _literal(value: Any) -> Any:
    """A list, tuple or dict literal: `[a, a]` nested in a loop would double what it prints each time (its
    strings and numbers were checked when they were built, so only the containers it holds are measured)."""
    items = value.values() if isinstance(value, dict) else value
    nested = [item for item in items if type(item) not in _PRINTED_SAFELY]
    if nested:
        _step(_size(nested), "a literal")
    return value


class _Buffer(list[str]):
    """A block's output (a macro's, `{% set %}...{% endset %}`, `{% filter %}`, `{% call %}`), counted as it
    is written: a loop in a block would otherwise pile up strings until the deadline."""

    __slots__ = ("chars",)

    def __init__(self) -> None:
        super().__init__()
        self.chars = 0

    def append(self, part: str) -> None:
        self._count(len(part))
        super().append(part)

    def extend(self, parts: Iterable[str]) -> None:
        parts = tuple(parts)
        self._count(sum(map(len, parts)))
        super().extend(parts)

    def _count(self, chars: int) -> None:
        self.chars += chars
        _step(self.chars, "a block")


class _CodeGenerator(CodeGenerator):
    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.buffer_class()")


def _template_name(value: Any) -> Any:
    """`{% include x %}` (import, extends): Jinja prints the names it could not find in its error."""
    _step(_size(value), "a template name")
    return value


def _output(value: Any) -> Any:
    """`{{ value }}`: a container's printed size measured before Jinja turns it into a string (a string was
    checked when it was built, and the rendered text is counted as it comes)."""
    if type(value) not in _PRINTED_SAFELY:
        _step(_size(value), "output")
    return value


# a str was checked when it was built, and str() of an int fails past 4300 digits (Python's own limit)
_PRINTED_SAFELY = frozenset({str, int, float, bool, type(None)})
_KEYS = _PRINTED_SAFELY | {slice}


_LOOP, _CONCAT, _LITERAL, _NAME = "_bounded_loop", "_bounded_concat", "_bounded_literal", "_bounded_name"


class _Bounder(NodeTransformer):
    """Rewrites a parsed template so the places Jinja's sandbox cannot intercept go through the checks:
    every `{% for %}` iterates through `_ticking`, every `~` is `_concat`, every literal `_literal`."""

    def _wrap(self, node: nodes.Expr, name: str) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = self._wrap(node.iter, _LOOP)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return self._wrap(nodes.List(node.nodes, lineno=node.lineno), _CONCAT)

    def _visit_literal(self, node: nodes.Expr) -> nodes.Expr:
        self.generic_visit(node)
        return node if getattr(node, "ctx", "load") != "load" else self._wrap(node, _LITERAL)

    visit_List = visit_Tuple = visit_Dict = _visit_literal

    def _visit_template_name(self, node: nodes.Include) -> nodes.Node:
        self.generic_visit(node)
        if not isinstance(node.template, nodes.Const):  # a constant name is as long as the source allows
            node.template = self._wrap(node.template, _NAME)
        return node

    visit_Include = visit_Import = visit_FromImport = visit_Extends = _visit_template_name


def _tojson(value: Any, indent: int | None = None) -> str:
    # Jinja's own `tojson` escapes for HTML (<, >, ', & as \u00xx); prompts are not HTML.
    return json.dumps(value, ensure_ascii=False, indent=indent, default=str)


class BoundedEnvironment(SandboxedEnvironment):
    """Jinja's sandbox with the checks above at every place a template can build something big or loop."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})  # the ones that can grow a value; - / // shrink

    code_generator_class = _CodeGenerator
    buffer_class = _Buffer

    def __init__(self, **options: Any):
        super().__init__(finalize=_output, **options)
        # lipsum(n) writes n paragraphs: unbounded, and no prompt needs it; urlize adds the (unbounded)
        # `target`/`rel` to every link it finds, and prompts are not HTML
        del self.globals["lipsum"], self.filters["urlize"]
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, func) for name, func in self.filters.items()}
        self.filters.update({_LOOP: _ticking, _CONCAT: _concat, _LITERAL: _literal, _NAME: _template_name})
        for name in ("lower", "upper"):  # str(value).islower()
            self.tests[name] = _bounded_filter(name, self.tests[name], "test")

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Bounder().visit(super()._parse(source, name, filename))

    def getitem(self, obj: Any, argument: Any) -> Any:
        # a missing key is printed in the UndefinedError's message
        if type(argument) not in _KEYS:
            _step(_size(argument), "a subscript")
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _step(_binop_size(operator, left, right), f"'{operator}'")
        return self.binop_table[operator](left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(obj, "__self__", None)
        name = getattr(obj, "__name__", type(obj).__name__)
        what = f"calling {name}"
        if isinstance(owner, (str, bytes)) and (estimate := _TEXT_METHODS.get(name)):
            if name == "join" and args and not isinstance(args[0], Sized):
                args = (list(args[0]),)
            _step(estimate(owner, *args, **kwargs), what)
        elif isinstance(owner, (list, dict, set)) and name in _STORING:
            _hold(owner, _size(args) + _size(kwargs), what)
        else:  # dict(...) stores its arguments too
            _step(_size(args) + _size(kwargs) if obj is dict else 0, what)
        return _checked(super().call(context, obj, *args, **kwargs), what)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None
        text: str = value.__self__

        def bounded(*args: Any, **kwargs: Any) -> str:
            values = [*args, *kwargs.values()]
            _step(_format_size(text, tuple(values), percent=False), "str.format")
            return _checked(fmt(*args, **kwargs), "str.format")

        return functools.update_wrapper(bounded, value)


def render_bounded(template: Any, context: Mapping[str, Any]) -> str:
    """Render under the process's limits: the budget set for this thread, the text counted as it comes."""
    limits = current_limits() or _limits  # a world's or server's limits where the work runs under them
    outer = _local.__dict__.get("budget")  # renders do not nest, but if one did it keeps its own budget
    _local.budget = _Budget(limits, time.monotonic() + limits.template_seconds)
    try:
        parts, total, chars = [], 0, limits.template_chars
        # the render function itself, not generate(): that adds a generator per chunk, only to rewrite
        # tracebacks, and render_prompt turns every failure into a ConfigError anyway
        for part in template.root_render_func(template.new_context(context)):
            total += len(part)
            if total > chars:
                raise OverLimit("template_chars", f"rendered more than {chars:,} characters")
            parts.append(part)
        return "".join(parts)
    finally:
        if outer is None:
            del _local.budget
        else:
            _local.budget = outer
