"""The library's structure (issue 12): no import cycle between mindpet's modules, one definition of the
PET-parameter predicates and of the method vocabulary, and a command line that answers --help/--version without
loading MindSpore."""
import ast
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, 'mindpet')


def _modules():
    """``module name -> path`` of every module of the mindpet package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == '__init__':
                    parts = parts[:-1]
                found['.'.join(parts)] = path
    return found


def _imports(path, module, modules, in_functions=False):
    """The mindpet modules ``module`` imports: by default when it is imported (statements outside functions; a
    function's imports run when it is called), with ``in_functions`` also those of its functions. Names resolve to
    the modules that exist (``from a.b import c`` is ``a.b.c`` when that is a module, else ``a.b``); importing
    ``a.b.c`` also imports ``a`` and ``a.b``, which count unless they are ``module``'s own packages (those are
    being imported anyway), while an explicit ``from a import x`` counts as an import of ``a``."""
    tree = ast.parse(open(path, encoding='utf-8').read(), path)
    is_package = path.endswith('__init__.py')
    targets = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not in_functions:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    anchor = module.split('.') if is_package else module.split('.')[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = '.'.join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f'{base}.{alias.name}'
                    targets.add(full if full in modules else base)
            elif isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body)
            else:
                visit([child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)])

    visit(tree.body)
    edges = {target for target in targets if target in modules and target != module}
    for target in targets:
        parts = target.split('.')
        for i in range(1, len(parts)):
            name = '.'.join(parts[:i])
            if name in modules and name != module and not module.startswith(name + '.'):
                edges.add(name)
    return edges


@pytest.mark.parametrize('in_functions', [False, True], ids=['module-level', 'with-function-level'])
def test_imports_between_mindpet_modules_form_no_cycle(in_functions):
    """Module-level imports must be acyclic (else an import order fails); the deferred imports inside functions
    are checked too, so that no module reaches back up to one that uses it."""
    modules = _modules()
    graph = {name: _imports(path, name, modules, in_functions) for name, path in modules.items()}
    assert graph['mindpet.tuners.base'] >= {'mindpet.tuners.config', 'mindpet.tuners.inject'}   # edges are found
    state, stack = {}, []

    def visit(name):
        state[name] = 'open'
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 'open':
                cycle = stack[stack.index(target):] + [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 'done'

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported first (before any other mindpet module) works: no module relies on another one having
    been imported before it."""
    names = sorted(_modules())
    code = ("import importlib, sys, json\n"
            "failed = {}\n"
            "for name in json.loads(sys.argv[1]):\n"
            "    for key in [k for k in sys.modules if k == 'mindpet' or k.startswith('mindpet.')]:\n"
            "        del sys.modules[key]\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as ex:  # noqa: BLE001\n"
            "        failed[name] = repr(ex)\n"
            "print(json.dumps(failed))\n")
    done = subprocess.run([sys.executable, '-c', code, json.dumps(names)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, GLOG_v='3'), timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


def _definitions(pattern):
    """``path:line`` of every line of mindpet/ matching ``pattern``."""
    hits = []
    for name, path in _modules().items():
        for number, line in enumerate(open(path, encoding='utf-8'), 1):
            if re.search(pattern, line):
                hits.append(f'{os.path.relpath(path, ROOT)}:{number}')
    return hits


def test_one_definition_of_the_pet_parameter_predicates_and_prefixes():
    for pattern in (r"^def is_delta\(", r"^def is_state\(", r"^def is_pet_param\(", r"^DELTA_PREFIX = ",
                    r"^STATE_PREFIX = "):
        assert _definitions(pattern) == [_definitions(pattern)[0]] and \
            _definitions(pattern)[0].startswith('mindpet/naming.py'), pattern
    # Nobody tests a parameter name against the prefix strings themselves.
    literals = _definitions(r"['\"]mindpet_(delta|state)_['\"]")
    assert len(literals) == 2 and all(hit.startswith('mindpet/naming.py:') for hit in literals), literals
    assert _definitions(r"def (is_delta_or_state|is_state_param)\(") == []


def test_one_method_vocabulary():
    from mindpet.naming import METHOD_ALIASES, VARIANTS, canonical_method, delta_marker
    from mindpet.tuners import available_methods
    from mindpet.graph.freeze_utils import freeze_modes
    methods = available_methods()
    assert 'prefix_tuning' in methods and 'prefixtuning' not in methods
    # The MindPet 1.0.4 spelling is an alias mapped in one place, onto a registry name.
    assert set(METHOD_ALIASES.values()) <= set(methods) and set(VARIANTS.values()) <= set(methods)
    assert freeze_modes() == sorted(set(methods) | set(METHOD_ALIASES) | set(VARIANTS))
    assert canonical_method('PrefixTuning') == 'prefix_tuning' == canonical_method('prefix_tuning')
    assert delta_marker('prefix_tuning') == 'mindpet_delta_prefixtuning_' and delta_marker('lora') == \
        'mindpet_delta_lora_'
    # No second list of method names in the library.
    assert _definitions(r"'prefixtuning'") == ['mindpet/naming.py:' + str(_naming_alias_line())]
    assert _definitions(r"^DELTA_LIST\b") == []


def _naming_alias_line():
    for number, line in enumerate(open(os.path.join(PACKAGE, 'naming.py'), encoding='utf-8'), 1):
        if line.startswith('METHOD_ALIASES'):
            return number
    return None


CLI_PROBE = """
import json, sys
from mindpet.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as ex:
    code = ex.code
loaded = sorted(m for m in sys.modules if m == 'mindspore' or m.startswith('mindspore.'))
sys.stdout.flush()
print('@@PROBE ' + json.dumps({'code': code, 'mindspore': loaded[:3]}))
"""


def _probe(*argv):
    done = subprocess.run([sys.executable, '-c', CLI_PROBE, *argv], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, GLOG_v='3'), timeout=300, check=False)
    line = [l for l in done.stdout.splitlines() if l.startswith('@@PROBE ')]
    assert line, done.stdout[-1000:] + done.stderr[-2000:]
    return json.loads(line[-1][len('@@PROBE '):]), done.stdout


@pytest.mark.parametrize('argv', [['--help'], ['--version'], ['finetune', '--help'], ['merge', '--help']],
                         ids=lambda a: ' '.join(a))
def test_help_and_version_do_not_import_mindspore(argv):
    result, out = _probe(*argv)
    assert result == {'code': 0, 'mindspore': []}
    if argv == ['--help']:
        for verb in ('merge', 'inspect', 'finetune', 'evaluate', 'generate'):
            assert verb in out
    if argv == ['--version']:
        from mindpet.version import __version__
        assert f'mindpet {__version__}' in out


def test_a_verb_that_needs_mindspore_loads_it(tmp_path):
    """The probe sees MindSpore when it is loaded: a verb doing real work imports it."""
    import mindspore as ms
    path = str(tmp_path / 'one.ckpt')
    ms.save_checkpoint([{'name': 'w', 'data': ms.Tensor([1.0, 2.0])}], path)
    result, out = _probe('inspect', path)
    assert result['code'] == 0 and result['mindspore'] and "w" in out
