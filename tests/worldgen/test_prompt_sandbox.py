"""Prompt templates are bounded: what a template builds, what it renders and how long it runs (issue 10).

Each attack renders under small limits (10,000 characters, half a second) and prints only a length, so the
check that fires is the one at the point of creation (its message says which), not the count of the rendered
text; and its sizes stay small enough (a doubling runs `n` = DOUBLINGS times) that with its check broken it fails
in a few megabytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from worldgen.errors import ConfigError
from worldgen.limits import DEFAULT_LIMITS, LimitExceeded, Limits
from worldgen.prompt_sandbox import set_template_limits, template_limits
from worldgen.prompts import render_prompt

CHARS = 10_000
SECONDS = 0.5
DOUBLINGS = 20  # 2**20: a million times the start, far over CHARS


@pytest.fixture(autouse=True)
def small_limits():
    set_template_limits(Limits(template_chars=CHARS, template_seconds=SECONDS))
    yield
    set_template_limits(DEFAULT_LIMITS)


def refused(template: str, limit: str = "template_chars", **context) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as info:
        render_prompt(template, context)
    assert info.value.limit == limit, info.value
    return info.value


BIG_LIST = "{% set s = 'x' * 5000 %}{% set l = [s, s, s, s, s] %}"

# (template, what the message names: the check that must fire)
MEMORY_ATTACKS = {
    # operators
    "str * int": ("{{ ('x' * 10**7) | length }}", "'*'"),
    "int * str": ("{{ (10**7 * 'x') | length }}", "'*'"),
    "list * int": ("{{ ([1, 2] * 10**7) | length }}", "'*'"),
    "bytes * int": ("{{ ('x'.encode() * 10**7) | length }}", "'*'"),
    "int ** huge": ("{{ (10 ** (10 ** 6)) is number }}", "'**'"),
    "int squared in a loop": (
        "{% set ns = namespace(x=10**100) %}{% for i in range(12) %}{% set ns.x = ns.x * ns.x %}{% endfor %}"
        "{{ ns.x > 0 }}",
        "'*'",
    ),
    "str + str doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range("
        + str(DOUBLINGS)
        + ") %}{% set ns.s = ns.s + ns.s %}{% endfor %}"
        "{{ ns.s | length }}",
        "'+'",
    ),
    "% width": ("{{ ('%9999999d' % 1) | length }}", "'%'"),
    "% star width": ("{{ ('%*d' % (10**7, 1)) | length }}", "'%'"),
    "% precision": ("{{ ('%.9999999f' % 1.5) | length }}", "'%'"),
    "% repeated field": ("{% set s = 'x' * 5000 %}{{ ('%(a)s%(a)s%(a)s' % {'a': s}) | length }}", "'%'"),
    # ~ concatenation, namespace attributes, top-level set, macro arguments
    "~ doubling through namespace()": (
        "{% set ns = namespace(s='x') %}{% for i in range("
        + str(DOUBLINGS)
        + ") %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
        "{{ ns.s | length }}",
        "'~'",
    ),
    "~ doubling by top-level sets": (
        "{% set s = 'xx' %}" + "{% set s = s ~ s %}" * DOUBLINGS + "{{ s | length }}",
        "'~'",
    ),
    "~ doubling through macro arguments": (
        "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% else %}{{ s | length }}{% endif %}{% endmacro %}"
        "{{ f('x', n) }}",
        "'~'",
    ),
    # str methods
    "str.ljust": ("{{ 'x'.ljust(10**7) | length }}", "ljust"),
    "str.rjust": ("{{ 'x'.rjust(10**7) | length }}", "rjust"),
    "str.center": ("{{ 'x'.center(10**7) | length }}", "center"),
    "str.zfill": ("{{ '1'.zfill(10**7) | length }}", "zfill"),
    "str.expandtabs": ("{{ ('\t' * 100).expandtabs(10**5) | length }}", "expandtabs"),
    "str.replace": ("{{ ('x' * 1000).replace('x', 'y' * 1000) | length }}", "replace"),
    "str.replace of ''": ("{{ ('x' * 1000).replace('', 'y' * 100) | length }}", "replace"),
    "str.translate": ("{{ ('a' * 1000).translate({97: 'b' * 1000}) | length }}", "translate"),
    "str.join": ("{{ ('x' * 1000).join(range(1000) | map('string')) | length }}", "join"),
    "str.format width": ("{{ '{:9999999}'.format(1) | length }}", "str.format"),
    "str.format nested width": ("{{ '{:{}}'.format(1, 10**7) | length }}", "str.format"),
    "str.format repeated field": ("{{ '{0}{0}{0}'.format('x' * 5000) | length }}", "str.format"),
    "str.format_map": ("{{ '{a}{a}{a}'.format_map({'a': 'x' * 5000}) | length }}", "str.format"),
    # filters
    "|center": ("{{ 'x' | center(10**7) | length }}", "filter 'center'"),
    "|indent": ("{{ ('x\n' * 1000) | indent(1000) | length }}", "filter 'indent'"),
    "|indent by a string": ("{{ ('x\n' * 1000) | indent('y' * 1000) | length }}", "filter 'indent'"),
    "|wordwrap": ("{{ ('x ' * 1000) | wordwrap(1, wrapstring='y' * 1000) | length }}", "filter 'wordwrap'"),
    "|replace": ("{{ ('x' * 1000) | replace('x', 'y' * 1000) | length }}", "filter 'replace'"),
    "|format": ("{{ '%9999999d' | format(1) | length }}", "filter 'format'"),
    "|join": ("{{ range(1000) | join('y' * 1000) | length }}", "filter 'join'"),
    "|join of a lazy sequence": ("{{ range(5000) | map('string') | join('xx') | length }}", "filter 'join'"),
    "|batch fill": ("{{ [1] | batch(10**7, 0) | list | length }}", "filter 'batch'"),
    "|slice": ("{{ [1] | slice(10**7) | list | length }}", "filter 'slice'"),
    "|tojson indent": ("{{ [[[1, 2], [3]], [4]] | tojson(10**6) | length }}", "filter 'tojson'"),
    "|sum of lists": ("{{ range(5000) | batch(1) | sum(start=[]) | length }}", "filter 'sum'"),
    # containers: literals, list and dict methods, dict()
    "list literal doubling": (
        "{% set ns = namespace(a=[1]) %}{% for i in range("
        + str(DOUBLINGS)
        + ") %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}"
        "{{ ns.a | length }}",
        "a literal",
    ),
    "dict literal doubling": (
        "{% set ns = namespace(a={}) %}{% for i in range("
        + str(DOUBLINGS)
        + ") %}{% set ns.a = {'l': ns.a, 'r': ns.a} %}"
        "{% endfor %}{{ ns.a | length }}",
        "a literal",
    ),
    "list.extend doubling": (
        "{% set l = [1] %}{% for i in range("
        + str(DOUBLINGS)
        + ") %}{{ l.extend(l) or '' }}{% endfor %}{{ l | length }}",
        "calling extend",
    ),
    "list.append nesting": (
        "{% set ns = namespace(a=[1]) %}{% for i in range(" + str(DOUBLINGS) + ") %}{% set n = [] %}"
        "{{ n.append(ns.a) or n.append(ns.a) or '' }}{% set ns.a = n %}{% endfor %}{{ ns.a | length }}",
        "calling append",
    ),
    "list.append of fresh strings in a loop": (
        "{% set l = [] %}{% for i in range(1000) %}{{ l.append('x' * 2000 ~ i) or '' }}{% endfor %}"
        "{{ l | length }}",
        "calling append",
    ),
    "dict.update in a loop": (
        "{% set d = {} %}{% for i in range(1000) %}{{ d.update({i: 'x' * 2000 ~ i}) or '' }}{% endfor %}"
        "{{ d | length }}",
        "calling update",
    ),
    "dict() nesting": (
        "{% set ns = namespace(d={}) %}{% for i in range("
        + str(DOUBLINGS)
        + ") %}{% set ns.d = dict(l=ns.d, r=ns.d) %}{% endfor %}"
        "{{ ns.d | length }}",
        "calling dict",
    ),
    # printing a container (here `l`, a literal of 5 strings of 5,000 characters)
    "printing a list": (BIG_LIST + "{{ l }}", "output"),
    "~ of a list": (BIG_LIST + "{{ (l ~ '') | length }}", "'~'"),
    "|string of a list": (BIG_LIST + "{{ l | string | length }}", "filter 'string'"),
    "|format of a list": (BIG_LIST + "{{ l | format | length }}", "filter 'format'"),
    "|replace by a list": (BIG_LIST + "{{ 'ab' | replace('a', l) | length }}", "filter 'replace'"),
    "|join by a list": (BIG_LIST + "{{ [1, 2] | join(l) | length }}", "filter 'join'"),
    "% of a list": (BIG_LIST + "{{ ('%s' % l) | length }}", "'%'"),
    "str.format of a list": (BIG_LIST + "{{ '{}'.format(l) | length }}", "str.format"),
    "is lower of a list": (BIG_LIST + "{{ l is lower }}", "test 'lower'"),
    "a list as a missing key": (BIG_LIST + "{{ {}[l] }}", "a subscript"),
    "a list as template names": (BIG_LIST + "{% include l %}", "a template name"),
    # shared namespaces, block captures
    "printing shared namespaces": (
        "{% set ns = namespace(t=namespace(s='x')) %}{% for i in range("
        + str(DOUBLINGS)
        + ") %}{% set n = namespace() %}"
        "{% set n.a = ns.t %}{% set n.b = ns.t %}{% set ns.t = n %}{% endfor %}{{ ns.t }}",
        "output",
    ),
    "{% set %} block capture": (
        "{% set s %}{% for i in range(1000) %}{{ 'x' * 5000 }}{% endfor %}{% endset %}{{ s | length }}",
        "a block",
    ),
    "{% filter %} block": (
        "{% filter length %}{% for i in range(1000) %}{{ 'x' * 5000 }}{% endfor %}{% endfilter %}",
        "a block",
    ),
    "macro body": (
        "{% macro m() %}{% for i in range(1000) %}{{ 'x' * 5000 }}{% endfor %}{% endmacro %}{{ m() | length }}",
        "a block",
    ),
}


# tracemalloc is measured in a fresh process: stopping it while another thread allocates crashes CPython 3.11
# (gh-128679), and by now this test process holds Ray's and Serve's threads.
PEAK_SCRIPT = """
import json, sys, tracemalloc
from worldgen.limits import LimitExceeded, Limits
from worldgen.prompt_sandbox import set_template_limits
from worldgen.prompts import render_prompt

results = {}
for key, (template, chars, seconds, context) in json.load(sys.stdin).items():
    set_template_limits(Limits(template_chars=chars, template_seconds=seconds))
    render_prompt("{{ 1 }}", {})  # Jinja's own first-use allocations, out of the measure
    tracemalloc.start()
    try:
        render_prompt(template, context)
        error, limit = None, None
    except LimitExceeded as err:
        error, limit = str(err), err.limit
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    results[key] = {"peak": peak, "error": error, "limit": limit}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def peaks() -> dict[str, dict]:
    """Each attack rendered once under tracemalloc in one fresh process: its peak, its error and the limit hit."""
    cases = {
        key: (template, CHARS, SECONDS, {"n": DOUBLINGS}) for key, (template, _) in MEMORY_ATTACKS.items()
    }
    cases["100 MB string"] = ("{{ ('x' * 10**8) | length }}", DEFAULT_LIMITS.template_chars, SECONDS, {})
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("key", MEMORY_ATTACKS.keys())
def test_a_template_cannot_build_anything_over_template_chars(key, peaks):
    result = peaks[key]
    assert result["limit"] == "template_chars", result
    assert MEMORY_ATTACKS[key][1] in result["error"], result["error"]
    print(f"peak {result['peak']:,}")
    assert result["peak"] < 1_000_000  # refused before it was built: compiling the template costs more
    assert "prompt template" in result["error"] and "limit 'template_chars'" in result["error"]


def test_a_big_string_is_refused_before_it_is_allocated(peaks):
    result = peaks["100 MB string"]
    assert result["limit"] == "template_chars", result
    assert result["peak"] < 5_000_000  # 100 MB if built


def test_the_rendered_text_is_counted():
    refused("{% for i in range(1000) %}{{ 'x' * 5000 }}{% endfor %}")
    err = refused("{% for i in range(100000) %}x{% endfor %}")  # template text: no expression at all
    assert "rendered more than 10,000 characters" in str(err)
    # up to the limit is fine
    assert len(render_prompt("{{ 'x' * 10000 }}", {})) == CHARS
    assert len(render_prompt("{% for i in range(100) %}{{ 'x' * 100 }}{% endfor %}", {})) == CHARS


def test_what_prompts_use_still_works():
    context = {"items": ["a", "b", "c"], "n": 3, "d": {"k": "v"}}
    cases = {
        "{{ '%05d|%-3s|%.2f' % (n, 'a', 1.5) }}": "00003|a  |1.50",
        "{{ '[{:>4}]{}'.format('a', n) }}": "[   a]3",
        "{{ 'a' | center(5) }}x": "a  x",
        "{{ items | join(', ') }}": "a, b, c",
        "{{ items | map('upper') | join }}": "ABC",
        "{{ (items + ['d']) | length }} {{ [0] * 3 }} {{ 2 ** 10 }}": "4 [0, 0, 0] 1024",
        "{% for x in items %}{{ loop.index }}/{{ loop.length }} {% else %}none{% endfor %}": "1/3 2/3 3/3",
        "{% for x in [] %}{{ x }}{% else %}none{% endfor %}": "none",
        "{{ d | tojson(2) }}": '{\n  "k": "v"\n}',
        "{{ [[1], [2]] | sum(start=[]) }} {{ [1, 2] | sum }}": "[1, 2] 3",
        "{% set ns = namespace(s='') %}{% for x in items %}{% set ns.s = ns.s ~ x %}{% endfor %}{{ ns.s }}": "abc",
        "{% set l = [] %}{{ l.append(n) or l }} {{ dict(a=1) }}": "[3] {'a': 1}",
        "{{ 'ab'.replace('a', 'xy') }} {{ 'a\tb'.expandtabs(2) }} {{ '-'.join(items) }}": "xyb a b a-b-c",
        "{{ ('x\ny') | indent(2, first=true) }}": "x\n  y",
    }
    for template, expected in cases.items():
        assert render_prompt(template, context) == expected, template


def test_a_long_render_is_stopped():
    started = time.monotonic()
    err = refused(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "template_seconds"
    )
    assert time.monotonic() - started < SECONDS + 2
    assert "ran longer than 0.5 s" in str(err)


TIME_ATTACKS = {
    "loops over a context list": (
        "{% for a in xs %}{% for b in xs %}{% for c in xs %}{% endfor %}{% endfor %}{% endfor %}"
    ),
    "exponential macro recursion": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"
    ),
    "recursive loop": "{% for x in xs recursive %}{% if loop.depth < 20 %}{{ loop(xs) }}{% endif %}{% endfor %}",
    "lazy filter chains": "{% for i in xs %}{{ xs | map('abs') | select | list | length }}{% endfor %}",
}


@pytest.mark.parametrize("template", TIME_ATTACKS.values(), ids=TIME_ATTACKS.keys())
def test_no_template_runs_past_template_seconds(template):
    started = time.monotonic()
    refused(template, "template_seconds", xs=list(range(5000)))
    assert time.monotonic() - started < SECONDS + 2


def test_limits_are_the_process_settings_and_per_thread():
    assert template_limits().template_chars == CHARS
    set_template_limits(Limits(template_chars=20_000, template_seconds=SECONDS))
    assert len(render_prompt("{{ 'x' * 20000 }}", {})) == 20_000
    set_template_limits(Limits(template_chars=CHARS, template_seconds=SECONDS))
    # a render stopped in one thread leaves the others (and this one's next render) alone
    results: dict[str, object] = {}

    def render(key: str, template: str) -> None:
        try:
            results[key] = render_prompt(template, {"xs": list(range(100000))})
        except ConfigError as err:
            results[key] = err

    slow = threading.Thread(
        target=render, args=("slow", "{% for a in xs %}{% for b in xs %}{% endfor %}{% endfor %}")
    )
    slow.start()
    for i in range(20):
        render(f"quick {i}", "{{ xs | length }}")
        assert results[f"quick {i}"] == "100000"
        time.sleep(0.02)
    slow.join()
    assert isinstance(results["slow"], LimitExceeded) and results["slow"].limit == "template_seconds"
    assert render_prompt("{% for a in xs %}{% endfor %}done", {"xs": list(range(100000))}) == "done"


FAILURES = {
    "sandbox: a class": "{{ ''.__class__.__mro__ }}",
    "sandbox: globals": "{{ cycler.__init__.__globals__ }}",
    "sandbox: str.format attribute": "{{ '{0.__class__}'.format('') }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "float overflow": "{{ 2.0 ** 100000 }}",
    "int too long to print": "{{ 10 ** 5000 }}",
    "range over the sandbox's cap": "{{ range(10**6) | length }}",
    "lipsum is gone": "{{ lipsum(10**6) }}",
    "urlize is gone": "{{ 'http://x' | urlize }}",
    "division by zero": "{{ 1 // 0 }}",
}


@pytest.mark.parametrize("template", FAILURES.values(), ids=FAILURES.keys())
def test_every_failure_is_a_config_error_naming_the_template(template):
    with pytest.raises(ConfigError) as info:
        render_prompt(template, {})
    assert not isinstance(info.value, LimitExceeded)
    assert "prompt template '" in str(info.value)
