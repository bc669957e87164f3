"""The "With get_pet_model" sections of the method pages (doc/<method>.md): their python snippets run (one script,
in a scratch directory) and print what the pages say they print."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = ['dora', 'ia3', 'adapter', 'low_rank_adapter', 'bitfit', 'prompt_tuning', 'prefix_tuning']
HEADING = '## With `get_pet_model`'


def _section_snippets(page, heading=HEADING):
    text = open(os.path.join(ROOT, 'doc', page + '.md'), encoding='utf-8').read()
    assert heading in text, page
    section = text.split(heading, 1)[1].split('\n## ', 1)[0]
    blocks = re.findall(r'```python\n(.*?)```', section, flags=re.S)
    assert blocks, page
    return blocks


def _expected_lines(blocks):
    """Every '# ...' comment right after a print(...) (or print_trainable_parameters) line is a line of output."""
    expected = []
    for block in blocks:
        lines = block.splitlines()
        for line, following in zip(lines, lines[1:]):
            printing = line.lstrip().startswith(('print(', 'trainable, total')) or 'print(err)' in line
            if printing and following.lstrip().startswith('# '):
                expected.append(following.lstrip()[2:])
    return expected


def check_page_sections(tmp_path, pages, heading=HEADING):
    """Run the python snippets of section ``heading`` of each page as one script; every '# ...' line after a print
    must start a printed line ('[...]' ends a prefix). Returns the number of expected lines."""
    scripts, expected = [], []
    for page in pages:
        blocks = _section_snippets(page, heading)
        scripts.append(f'# ----- doc/{page}.md\n' + '\n'.join(blocks))
        expected += _expected_lines(blocks)
    script = tmp_path / 'methods.py'
    script.write_text('\n'.join(scripts), encoding='utf-8')
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v='3', MS_COMPILER_CACHE_ENABLE='0')
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.strip()]
    for want in expected:
        prefix = want.split('[...]')[0]
        assert any(line.startswith(prefix) for line in printed), (want, printed)
    return len(expected)


def test_method_pages_get_pet_model_snippets_run_and_print_what_they_say(tmp_path):
    assert check_page_sections(tmp_path, PAGES) >= len(PAGES)
