"""Importing and using mindpet writes nothing outside the paths it is given, leaves the MindSpore context alone and
never exits the process.

A child process (tests/helpers/side_effect_child.py) runs with a read-only HOME and a read-only working directory,
imports mindpet, fine-tunes a tiny LoRA layer with checkpoints, resumes and loads. Root ignores file permissions, so
when the suite runs as root the child runs without the capabilities that let it (``setpriv``), in directories owned
by ``nobody``. Checked: its report (Python-level writes outside the output
directory seen by an audit hook, exit calls, import output, context diffs) and file-tree snapshots of HOME and the
working directory before and after.
"""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = os.path.join(ROOT, 'tests', 'helpers', 'side_effect_child.py')
NOBODY = 65534
# Root without these capabilities is bound by permission bits like any user.
SETPRIV = ['setpriv', '--bounding-set=-dac_override,-dac_read_search,-fowner', '--']


def _snapshot(top):
    found = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            found[os.path.relpath(path, top)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    found['.'] = os.lstat(top).st_mtime_ns
    return found


@pytest.mark.slow
def test_import_and_use_write_only_into_the_given_directory():
    base = tempfile.mkdtemp(prefix='mindpet-side-effects-')
    try:
        os.chmod(base, 0o755)
        home, cwd, out = (os.path.join(base, name) for name in ('home', 'cwd', 'out'))
        for path in (home, cwd, out):
            os.mkdir(path)
        with open(os.path.join(home, '.bashrc'), 'w', encoding='utf-8') as handle:
            handle.write('# untouched\n')
        prefix = []
        if os.geteuid() == 0 and shutil.which('setpriv'):
            prefix = SETPRIV
            # Not the child's own files, so it cannot chmod them back either.
            for path in (home, cwd, os.path.join(home, '.bashrc')):
                os.chown(path, NOBODY, NOBODY)
        for path in (home, cwd):
            os.chmod(path, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        before = {path: _snapshot(path) for path in (home, cwd)}
        env = {k: v for k, v in os.environ.items() if not k.startswith('MS_COMPILER_CACHE')}
        env.update(HOME=home, PYTHONPATH=ROOT, GLOG_v='3', XDG_CACHE_HOME=os.path.join(home, '.cache'))
        proc = subprocess.run(prefix + [sys.executable, '-B', CHILD, out], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and 'CHILD_DONE' in proc.stdout, proc.stderr[-3000:]
        with open(os.path.join(out, 'report.json'), encoding='utf-8') as handle:
            report = json.load(handle)

        assert {path: _snapshot(path) for path in (home, cwd)} == before, "something was written to HOME or cwd"
        assert [w for w in report['writes_outside'] if w['by_mindpet']] == []
        assert report['exit_calls'] == []
        assert report['import_output'] == ''
        assert report['context_changed_by_import'] == {}
        assert report['context_changed_by_use'] == {}
        assert report['environ_changed_by_import'] == []
        assert report['logging_handlers_added'] == 0
        assert report['resumed_step'] == 4
        assert {'ckpt/DELTA_CKP-2_1.ckpt', 'ckpt/DELTA_CKP-2_2.ckpt', 'adapter.safetensors'} <= \
            set(report['files_in_out'])
    finally:
        for directory, dirs, _ in os.walk(base):
            for name in dirs:
                os.chmod(os.path.join(directory, name), 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_library_source_has_no_exit_calls_or_import_time_prints():
    """No sys.exit/os._exit/exit()/quit() anywhere in mindpet or tk, and no print() at module level (the
    ``if __name__ == '__main__':`` block of a program entry such as mindpet/cli.py runs only as a program)."""
    offenders = []
    for package in ('mindpet', 'tk'):
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith('.py'):
                    continue
                path = os.path.join(directory, name)
                with open(path, encoding='utf-8') as handle:
                    for number, line in enumerate(handle, 1):
                        if re.match(r"if __name__ == ['\"]__main__['\"]:", line):
                            break
                        code = line.split('#', 1)[0]
                        if re.search(r'\b(sys\.exit|os\._exit|exit|quit)\s*\(', code) and 'def ' not in code:
                            offenders.append(f'{path}:{number}: {line.strip()}')
                        if re.match(r'print\s*\(', code):
                            offenders.append(f'{path}:{number}: {line.strip()}')
    assert offenders == []
