"""doc/lifecycle.md: its python snippets run in order as one script, and print what the page says they print."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, 'doc', 'lifecycle.md')


def _snippets(doc=DOC):
    text = open(doc, encoding='utf-8').read()
    return re.findall(r'```python\n(.*?)```', text, flags=re.S)


def test_lifecycle_snippets_run_and_print_what_the_page_says(tmp_path):
    blocks = _snippets()
    assert len(blocks) >= 8
    run_snippets(blocks, tmp_path)


def run_snippets(blocks, tmp_path):
    """Run a page's python snippets in order as one script in ``tmp_path``; check the printed lines."""
    script = tmp_path / 'snippets.py'
    script.write_text('\n'.join(blocks), encoding='utf-8')
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v='3', MS_COMPILER_CACHE_ENABLE='0')
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.strip()]
    # Every '# ...' comment right after a print(...) in the page is a line of the output (up to '...').
    expected = []
    for block in blocks:
        lines = block.splitlines()
        for i, line in enumerate(lines[:-1]):
            if (line.lstrip().startswith(('print(', 'trainable, total')) or 'print(err)' in line) \
                    and lines[i + 1].lstrip().startswith('# '):
                expected.append(lines[i + 1].lstrip()[2:])
    assert expected
    for want in expected:
        prefix = want.split('[...]')[0]
        assert any(line.startswith(prefix) for line in printed), (want, printed)


def test_the_methods_table_lists_every_registered_method():
    """Every method get_pet_model knows has a row naming its config class and YAML type, and the page does not
    say a registered method is unregistered."""
    from mindpet.tuners.registry import available_methods, get_method  # pylint: disable=import-outside-toplevel
    text = open(DOC, encoding='utf-8').read()
    section = text.split('## Methods', 1)[1].split('\n## ', 1)[0]
    rows = [line for line in section.splitlines() if line.startswith('| [')]
    for method in available_methods():
        config_class = get_method(method)[0].__name__
        assert any(f'`{config_class}`' in row and f'(`{method}`)' in row for row in rows), method
    assert 'not registered' not in text
