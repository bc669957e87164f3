"""Client side of the tests' fork servers (tests/helpers/crash_zygote.py, tests/helpers/adapter_writer.py): a
server process that has imported MindSpore once and forks workers on request, spoken to one line at a time."""
import os
import queue
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ForkServerClient:
    """Start ``script`` in its own session; its stdout is read in a thread so that reads can time out (a hung
    worker must not hang the suite). stderr goes to ``log_path``."""

    def __init__(self, script, log_path):
        env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v='3', MS_COMPILER_CACHE_ENABLE='0')
        self.log = open(log_path, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
        self.proc = subprocess.Popen([sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=ROOT, env=env, start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def read(self, timeout):
        return self.lines.get(timeout=timeout)

    def expect(self, keyword, timeout):
        """The value after ``keyword`` on the next line starting with it (other output of a worker is skipped)."""
        deadline = time.time() + timeout
        while True:
            line = self.read(max(deadline - time.time(), 0.01))
            if line.startswith(keyword + ' ') or line == keyword:
                return line[len(keyword):].strip()

    def send(self, text):
        self.proc.stdin.write(text + '\n')
        self.proc.stdin.flush()

    def close(self):
        try:
            self.send('quit')
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: the server and any worker it forked
            self.proc.wait()
        self.log.close()
