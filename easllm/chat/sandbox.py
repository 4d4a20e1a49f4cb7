"""A Jinja2 sandbox for chat templates, which are untrusted input (a GGUF file carries its own).

Jinja's `ImmutableSandboxedEnvironment` already stops attribute escapes (`__class__`, `__globals__`)
and mutation; `BoundedSandbox` also bounds what a hostile template can cost:

- **time**: a render that runs past `RENDER_SECONDS` stops at its next function or filter call
  or at the next step of any `for` loop (loops are rewritten to iterate through a timed filter);
- **output**: more than `MAX_OUTPUT_CHARS` of rendered text stops the render;
- **allocation**: `'x' * n`, `n ** m`, `'%999999999s' % x`, `'{:>999999999}'.format(x)` and
  filters or methods called with huge numbers (`center(10**9)`) are refused before they allocate.

Each refusal raises `jinja2.SecurityError`, which the template turns into a clear 400.
"""

from __future__ import annotations

import contextvars
import functools
import operator
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_SECONDS = 2.0
MAX_OUTPUT_CHARS = 32 * 1024 * 1024  # ~8M tokens: more than any context, less than a memory bomb
MAX_NUMBER_ARG = 1_000_000  # no real chat template passes a width or count near this
HUGE_WIDTH = re.compile(r"[%{:<>^=+\- #0]\d{7,}")  # a format width of a million or more

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("template_deadline", default=None)


def _check_time() -> None:
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise SecurityError(f"the chat template ran for more than {RENDER_SECONDS:g} s")


def _check_args(args: Iterable[Any]) -> None:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_NUMBER_ARG:
            raise SecurityError(f"the chat template passed {arg} to a function (limit {MAX_NUMBER_ARG})")
        if isinstance(arg, str) and HUGE_WIDTH.search(arg):
            raise SecurityError("the chat template formats with a huge width")


def _guard_filter(f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)  # keeps Jinja's pass_context / pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        _check_args([*args, *kwargs.values()])
        return f(*args, **kwargs)

    return guarded


TIMED_ITER = "easllm_timed_iter"


def _timed_iter(items: Any) -> Any:
    for item in items:
        _check_time()
        yield item


class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _guard_filter(f) for name, f in self.filters.items()}
        self.filters[TIMED_ITER] = _timed_iter

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Every `for` loop iterates through the timed filter, so a loop without calls is bounded too."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, TIMED_ITER, [], [], None, None, lineno=loop.lineno)
        return tree

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        _check_args([*args, *kwargs.values()])
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`'{:>999999999}'.format(x)`: the width is in the string the method is bound to."""
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and HUGE_WIDTH.search(owner):
            raise SecurityError("the chat template formats with a huge width")
        return super().wrap_str_format(value)

    def call_binop(self, context: Context, op: str, left: Any, right: Any) -> Any:
        _check_time()
        if op == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
                if sized and len(seq) * times > MAX_OUTPUT_CHARS:
                    raise SecurityError("the chat template builds a huge sequence")
            return operator.mul(left, right)
        if op == "**":
            if isinstance(right, int) and abs(right) > 1024:
                raise SecurityError("the chat template raises to a huge power")
            return operator.pow(left, right)
        if isinstance(left, str) and HUGE_WIDTH.search(left):
            raise SecurityError("the chat template formats with a huge width")
        return super().call_binop(context, op, left, right)  # "%": the sandbox's safe formatting


def render_bounded(parts: Iterable[str]) -> str:
    """Join a template's output (`Template.generate(...)`) within the time and size bounds."""
    token = _deadline.set(time.monotonic() + RENDER_SECONDS)
    try:
        out: list[str] = []
        size = 0
        for part in parts:
            size += len(part)
            if size > MAX_OUTPUT_CHARS:
                raise SecurityError(f"the chat template rendered more than {MAX_OUTPUT_CHARS} characters")
            _check_time()
            out.append(part)
        return "".join(out)
    finally:
        _deadline.reset(token)
