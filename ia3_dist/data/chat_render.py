"""Chat templates rendered within a budget.

A chat template is a program, and one saved in an adapter dir comes from strangers. Jinja's sandbox (the immutable
one, as transformers renders chat templates) stops attribute escapes, not cost: a template can loop 100000 x
100000 times or ask for ``'x' * 20000000``, and every render of an inference prompt or a training record runs it.
:func:`render_chat` renders as ``tok.apply_chat_template(messages, tokenize=False)`` does, but every loop
iteration, call, operator and output write counts against a per-render :class:`_Budget` of steps, seconds,
characters and list items; past it, :class:`RenderLimit`. :mod:`.template` turns that into a UsageError naming
the template.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import re
import string
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime
from typing import Any

from jinja2.utils import Namespace as _Namespace

# -- bounded chat-template rendering ---------------------------------------------------------------------------
# Jinja's sandbox stops attribute escapes, not cost: a template can loop 100000 x 100000 times, or ask for
# 'x' * 20000000, and every render of an inference prompt or a training record runs it. Each hook below charges
# the current render's :class:`_Budget` before doing the work, so no single operation can take more than the
# budget's characters or items, and no sequence of them more than its steps or seconds.

RENDER_STEPS = 50_000
"""Steps (loop iterations, calls, operators, attribute reads, output writes) of one render, plus
:data:`STEPS_PER_MESSAGE` per message (real templates take a few dozen) and one per 8 characters of input (a
filter or string method is charged a step per 64 characters it reads)."""
STEPS_PER_MESSAGE = 200
RENDER_SECONDS = 5.0
RENDER_CHARS = 1 << 20
"""Longest string one render may build or write, plus twice the characters of its input (messages, special
tokens): a template writes each message about once."""
RENDER_ITEMS = 1 << 17
"""Longest list one render may build, plus four per message."""
MAX_INT_BITS = 4096
MAX_FORMAT_WIDTH = 4096
"""Largest width or precision in a printf or str.format spec, indent or tojson indent."""


class RenderLimit(Exception):
    """A chat template went past its render budget."""


class _Budget:
    def __init__(self, n_messages: int = 0, input_chars: int = 0) -> None:
        self.steps_limit = RENDER_STEPS + STEPS_PER_MESSAGE * n_messages + input_chars // 8
        self.steps = self.steps_limit
        self.max_chars = RENDER_CHARS + 2 * input_chars
        self.max_items = RENDER_ITEMS + 4 * n_messages
        self.written = 0
        self.deadline = time.monotonic() + RENDER_SECONDS

    def tick(self, n: int = 1) -> None:
        self.steps -= n
        if self.steps < 0:
            raise RenderLimit(f"more than {self.steps_limit} steps (loop iterations, calls, filters) for "
                              f"this conversation")
        if time.monotonic() > self.deadline:
            raise RenderLimit(f"it ran longer than {RENDER_SECONDS:g} s")

    def chars(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise RenderLimit(f"{what} of {n} or more characters; the limit for this conversation is "
                              f"{self.max_chars}")

    def items(self, n: int, what: str) -> None:
        if n > self.max_items:
            raise RenderLimit(f"{what} of {n} items; the limit for this conversation is {self.max_items}")

    def value(self, v: Any, what: str) -> None:
        """``v`` no larger than the budget allows, its text (``str()``, ``repr()``, JSON) included."""
        if isinstance(v, str):
            self.chars(len(v), what)
        elif isinstance(v, int) and v.bit_length() > MAX_INT_BITS:
            raise RenderLimit(f"{what}: an integer of {v.bit_length()} bits (at most {MAX_INT_BITS})")
        elif isinstance(v, (list, tuple, dict, set, frozenset, _Namespace)):
            if isinstance(v, (list, tuple, dict, set, frozenset)):
                self.items(len(v), what)
            self.chars(self.weight(v), what)

    def weight(self, v: Any) -> int:
        """About how many characters ``str(v)`` has, counted up to just past :attr:`max_chars` and charged as
        steps: each shared reference counts every time, as its text would, so nesting cannot hide size, and a
        cycle (through a namespace) ends the count at the limit."""
        total = visited = 0
        stack = [v]
        while stack and total <= self.max_chars:
            x = stack.pop()
            visited += 1
            if isinstance(x, (str, bytes)):
                total += len(x) + 2
            elif isinstance(x, dict):
                total += 2 + 4 * len(x)
                for k, val in x.items():
                    stack += (k, val)
            elif isinstance(x, (list, tuple, set, frozenset)):
                total += 2 + 2 * len(x)
                stack.extend(x)
            elif isinstance(x, _Namespace):
                total += 16
                stack.append(x._Namespace__attrs)
            elif isinstance(x, int):
                total += x.bit_length() // 3 + 1
            else:
                total += 8
        self.tick(visited)
        return total


_CURRENT: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("ia3_dist_render_budget", default=None)


def _budget() -> _Budget:
    # None only while Jinja folds constant expressions at compile time outside compile_chat (a fresh floor budget).
    return _CURRENT.get() or _Budget()


def _cost(v: Any) -> int:
    if isinstance(v, str):
        return 1 + len(v) // 64
    try:
        return 1 + len(v)
    except TypeError:
        return 1


_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?.")
_NUMBER = re.compile(r"\d+")


def _check_printf(b: _Budget, fmt: str, args: Any) -> None:
    for width, prec in _PRINTF.findall(fmt):
        for n in (width, prec):
            if n == "*" or (n and int(n) > MAX_FORMAT_WIDTH):
                raise RenderLimit(f"a printf width or precision of {n!r} (at most {MAX_FORMAT_WIDTH})")
    b.chars(len(fmt) + b.weight(args), "a printf result")


def _check_str_format(b: _Budget, fmt: str, args: Any) -> None:
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec and ("{" in spec or any(int(n) > MAX_FORMAT_WIDTH for n in _NUMBER.findall(spec))):
            raise RenderLimit(f"a format spec {spec[:40]!r} with a nested field or a width over "
                              f"{MAX_FORMAT_WIDTH}")
    b.chars(len(fmt) + b.weight(args), "a str.format result")


def _replace_size(s: str, old: str, new: str, count: Any) -> int:
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(0, len(new) - len(old))


def _materialize(b: _Budget, it: Any) -> list[Any]:
    """An unsized iterable (a map or select filter's generator) as a list, at most the budget's items."""
    out = []
    for x in it:
        out.append(x)
        if len(out) % 1024 == 0:
            b.tick(1024)
            b.items(len(out), "a joined sequence")
    return out


# str methods that cannot return much more than they are given (upper() may triple a few characters).
_STR_SAFE = frozenset({
    "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha", "isascii", "isdecimal",
    "isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace", "istitle", "isupper", "lower",
    "lstrip", "partition", "removeprefix", "removesuffix", "rfind", "rindex", "rpartition", "rsplit", "rstrip",
    "split", "splitlines", "startswith", "strip", "swapcase", "title", "upper", "encode", "decode", "escape",
    "unescape", "striptags"})


def _check_call(b: _Budget, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a call whose result would be past the budget, before it is made; returns the (possibly
    materialized) positional arguments."""
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format in a function of its own
    owner = getattr(target, "__self__", None)
    name = getattr(target, "__name__", "")
    if isinstance(owner, (str, bytes)):
        b.tick(_cost(owner))
        if name in _STR_SAFE:
            return args
        if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
            b.chars(args[0], f"str.{name}()")
        elif name == "expandtabs":
            size = args[0] if args else kwargs.get("tabsize", 8)
            b.chars(len(owner) * max(1, size if isinstance(size, int) else 1), "str.expandtabs()")
        elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
            b.chars(_replace_size(str(owner), args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count")),
                    "str.replace()")
        elif name == "join" and len(args) == 1:
            items = args[0] if hasattr(args[0], "__len__") else _materialize(b, args[0])
            b.items(len(items), "str.join()")
            b.chars(b.weight(items) + len(owner) * len(items), "str.join()")
            return (items,)
        elif name in ("format", "format_map") and isinstance(owner, str):
            _check_str_format(b, owner, (args, kwargs))
        else:
            raise RenderLimit(f"str.{name}() is not available to chat templates here")
    elif isinstance(owner, int) and name == "to_bytes":
        b.chars(args[0] if args and isinstance(args[0], int) else 1, "int.to_bytes()")
    return args


def _check_binop(b: _Budget, op: str, left: Any, right: Any) -> None:
    b.tick()
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "*":
        if ints:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise RenderLimit(f"a product of more than {MAX_INT_BITS} bits")
            return
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and isinstance(seq, (str, bytes, list, tuple)) and n > 0:
            if isinstance(seq, (list, tuple)):
                b.items(len(seq) * n, "a repeated list")
            b.chars((len(seq) if isinstance(seq, (str, bytes)) else b.weight(seq)) * n, "a repeated string")
    elif op == "**" and ints:
        if right > 0 and abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
            raise RenderLimit(f"a power of more than {MAX_INT_BITS} bits")
    elif op == "+" and not ints:
        if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            b.items(len(left) + len(right), "a joined list")
        if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
            b.chars(len(left) + len(right), "a joined string")
        elif isinstance(left, (list, tuple)):
            b.chars(b.weight(left) + b.weight(right), "a joined list")
    elif op == "%" and isinstance(left, str):
        _check_printf(b, left, right)


_O1_FILTERS = frozenset({"length", "count", "first", "last", "default", "d", "attr", "safe", "abs", "int", "float",
                         "round", "random", "items", "selectattr", "rejectattr", "select", "reject", "map"})
_DROPPED_FILTERS = ("urlize", "wordwrap", "xmlattr")  # regex and textwrap work no chat template needs


def _filter_params(name: str, sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any],
                   b: _Budget) -> tuple[tuple[Any, ...], dict[str, Any]]:
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return args, kwargs  # the call itself raises the usual error
    a = bound.arguments
    v = a.get("value", a.get("s", a.get("iterable")))
    if name == "center":
        width = a.get("width", 80)
        b.chars(width if isinstance(width, int) else 0, "center()")
    elif name == "indent":
        width = a.get("width", 4)
        w = width if isinstance(width, int) else len(str(width))
        if w > MAX_FORMAT_WIDTH:
            raise RenderLimit(f"indent() of {w} (at most {MAX_FORMAT_WIDTH})")
        text = str(v)
        b.chars(len(text) + (text.count("\n") + 1) * w, "indent()")
    elif name == "format" and isinstance(v, str):
        _check_printf(b, v, (a.get("args"), a.get("kwargs")))
    elif name == "replace" and isinstance(a.get("old"), str) and isinstance(a.get("new"), str):
        b.chars(_replace_size(str(v), a["old"], a["new"], a.get("count")), "replace()")
    elif name == "join":
        if not hasattr(v, "__len__"):
            v = _materialize(b, v)
            bound.arguments["value"] = v
        b.items(len(v), "join()")
        b.chars(b.weight(v) + len(str(a.get("d", ""))) * len(v), "join()")
    elif name in ("batch", "slice"):
        n = a.get("linecount", a.get("slices"))
        if isinstance(n, int):
            b.items(n, f"{name}()")
    elif name == "sum" and not isinstance(a.get("start", 0), (int, float)):
        raise RenderLimit("sum() may start only from a number")
    elif name == "tojson":
        indent, seps = a.get("indent"), a.get("separators")
        if (isinstance(indent, int) and indent > 16) or (isinstance(indent, str) and len(indent) > 16):
            raise RenderLimit("tojson() indent of more than 16")
        if seps is not None and not (isinstance(seps, (list, tuple)) and all(isinstance(x, str) and len(x) <= 16
                                                                             for x in seps)):
            raise RenderLimit("tojson() separators must be two short strings")
    return (tuple(bound.args), dict(bound.kwargs)) if name == "join" else (args, kwargs)


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    offset = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0
    try:
        sig: inspect.Signature | None = inspect.signature(f)
    except (TypeError, ValueError):  # builtins such as len and abs
        sig = None

    @functools.wraps(f)
    def run(*args: Any, **kwargs: Any) -> Any:
        b = _budget()
        v = args[offset] if len(args) > offset else None
        b.tick(1 if name in _O1_FILTERS else _cost(v))
        if name not in _O1_FILTERS:
            b.value(v, f"the input of {name}()")
            if sig is not None:
                args, kwargs = _filter_params(name, sig, args, kwargs, b)
        out = f(*args, **kwargs)
        b.value(out, f"the result of {name}()")
        return out

    return run


def _counted(context: Any, it: Any) -> Iterator[Any]:
    b = _budget()
    for x in it:
        b.tick()
        yield x


_ITER_FILTER = "ia3_dist_counted"


def _emit(s: Any) -> Any:
    b = _budget()
    b.tick()
    b.written += len(s) if isinstance(s, str) else 0
    # Four times the output limit: what a macro or {% set %} block writes is written again where it is used.
    if b.written > 4 * b.max_chars:
        raise RenderLimit(f"it wrote more than {4 * b.max_chars} characters")
    return s


def _concat(parts: tuple[Any, ...]) -> str:
    b = _budget()
    b.tick(len(parts))
    b.chars(sum(len(p) if isinstance(p, str) else b.weight(p) for p in parts), "a ~ concatenation")
    return "".join(map(str, parts))


def _finalize(value: Any) -> Any:
    _budget().value(value, "an output value")
    return value


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' own: no HTML escaping, the options chat templates use.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_DATE: contextvars.ContextVar[date | None] = contextvars.ContextVar("ia3_dist_render_date", default=None)


@contextlib.contextmanager
def rendered_date(day: date | None) -> Iterator[None]:
    """``strftime_now`` renders ``day`` (at midnight) within this block; None: the clock, as transformers does."""
    token = _DATE.set(day)
    try:
        yield
    finally:
        _DATE.reset(token)


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise RenderLimit("strftime_now() takes a format of at most 256 characters")
    day = _DATE.get()
    now = datetime.now() if day is None else datetime(day.year, day.month, day.day)
    return now.strftime(fmt)


class _TemplateDict:
    """``dict`` as transformers gives it to templates: callable, ``fromkeys``, nothing else of the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


@functools.cache
def _environment() -> Any:
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import SecurityError, TemplateSyntaxError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace, pass_context

    class TemplateNamespace(Namespace):
        # As transformers': no dunder or private attributes stored on a namespace.
        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace.check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace.check_name(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"chat templates cannot store underscore-prefixed attributes ({name!r})")

    class Generation(Extension):
        # transformers' {% generation %} ... {% endgeneration %}: marks assistant text; here it only renders it.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> Any:
            return caller()

    class Generator(CodeGenerator):
        # Every write (to the output or into a {% set %} / macro buffer) passes through environment.ia3_emit, and
        # `~` through environment.ia3_concat: neither is an operator the sandbox intercepts.
        def _output_const_repr(self, group: Any) -> str:
            return f"environment.ia3_emit({super()._output_const_repr(group)})"

        def _output_child_pre(self, node: Any, frame: Any, finalize: Any) -> None:
            self.write("environment.ia3_emit(")
            super()._output_child_pre(node, frame, finalize)

        def _output_child_post(self, node: Any, frame: Any, finalize: Any) -> None:
            super()._output_child_post(node, frame, finalize)
            self.write(")")

        def start_write(self, frame: Any, node: Any = None) -> None:
            super().start_write(frame, node)
            self.write("environment.ia3_emit(")

        def end_write(self, frame: Any) -> None:
            self.write(")")
            super().end_write(frame)

        def visit_Concat(self, node: Any, frame: Any) -> None:  # noqa: N802 - Jinja's visitor name
            self.write("environment.ia3_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "**", "%"})
        code_generator_class = Generator

        def __init__(self) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols],
                             finalize=_finalize)
            self.ia3_emit = _emit
            self.ia3_concat = _concat
            filters = {**self.filters, "tojson": _tojson}
            for name in _DROPPED_FILTERS:
                filters.pop(name, None)
            self.filters = {name: _bounded_filter(name, f) for name, f in filters.items()}
            self.filters[_ITER_FILTER] = pass_context(_counted)
            self.globals.pop("lipsum", None)
            self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                                namespace=TemplateNamespace)

        def _parse(self, source: str, name: str | None, filename: str | None) -> Any:
            # Every for loop counts its iterations: a loop over a list that no range() bounded is still a step
            # each. A recursive loop would re-enter without passing the count again.
            tree = super()._parse(source, name, filename)
            for loop in list(tree.find_all(nodes.For)):
                if loop.recursive:
                    raise TemplateSyntaxError("recursive for loops are not supported", loop.lineno, name, filename)
                loop.iter = nodes.Filter(loop.iter, _ITER_FILTER, [], [], None, None, lineno=loop.lineno)
            return tree

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            b = _budget()
            b.tick()
            args = _check_call(b, __obj, args, kwargs)
            out = super().call(__context, __obj, *args, **kwargs)
            b.value(out, "a call's result")
            return out

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(_budget(), operator, left, right)
            out = super().call_binop(context, operator, left, right)
            _budget().value(out, f"the result of {operator}")
            return out

        def getattr(self, obj: Any, attribute: str) -> Any:
            _budget().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _budget().tick()
            return super().getitem(obj, argument)

    return Environment()


@functools.lru_cache(maxsize=16)
def _compiled(text: str) -> Any:
    return _environment().from_string(text)


def compile_chat(text: str) -> Any:
    """The compiled template (cached by its text); raises what Jinja raises for a bad one."""
    token = _CURRENT.set(_Budget())
    try:
        return _compiled(text)
    finally:
        _CURRENT.reset(token)


def special_tokens(tok: Any) -> dict[str, Any]:
    """What transformers passes a chat template besides the messages: the tokenizer's special tokens by name."""
    out: dict[str, Any] = {}
    for k, v in (getattr(tok, "special_tokens_map", None) or {}).items():
        if isinstance(v, str):
            out[k] = str(v)
        elif isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
            out[k] = [str(x) for x in v]
    return out


def render_chat(text: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                special: dict[str, Any], tools: list[dict[str, Any]] | None = None) -> str:
    """``text`` rendered as ``tok.apply_chat_template(messages, tools=tools, tokenize=False)`` renders it, within
    a :class:`_Budget` sized by the input; :class:`RenderLimit` past it."""
    n_in = sum(len(m.get("content") or "") for m in messages)
    if tools or any("tool_calls" in m for m in messages):
        # Schemas and calls are written out as JSON (tojson), so their JSON text is input too.
        n_in += len(json.dumps([tools, [m.get("tool_calls") for m in messages]], ensure_ascii=False))
    n_in += sum(len(v) if isinstance(v, str) else sum(map(len, v)) for v in special.values())
    b = _Budget(len(messages), n_in)
    token = _CURRENT.set(b)
    try:
        tpl = _compiled(text)
        out: list[str] = []
        size = 0
        for chunk in tpl.generate(messages=messages, tools=tools, documents=None,
                                  add_generation_prompt=add_generation_prompt, **special):
            size += len(chunk)
            b.chars(size, "an output")
            out.append(chunk)
        return "".join(out)
    finally:
        _CURRENT.reset(token)
