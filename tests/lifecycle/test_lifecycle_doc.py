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
