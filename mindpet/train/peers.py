"""Noticing a lost worker of a data-parallel run (``mindpet finetune`` under msrun).

When one worker process dies (killed, out of memory, a crash), the others block in their next collective operation
until MindSpore's cluster timeout and then end with long tracebacks that do not say what happened. Each worker of a
run therefore registers itself in a small shared directory (its rank, host and process id) and watches the others
from a daemon thread: when a worker on the same host has gone without having finished, the survivors print one line
naming the lost rank and end with exit code 1 within about a second. Workers on other hosts cannot be watched this
way; there MindSpore's own timeout (msrun ``--cluster_time_out``) applies.

The registry directory is keyed by the job (the scheduler port msrun sets, ``MS_SCHED_PORT``, and the msrun process
that started the workers), under the system's temporary directory, and removed by the last worker that finishes.
"""
import json
import os
import socket
import sys
import tempfile
import threading

RUNNING, DONE = 'running', 'done'


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PeerWatch:
    """Register this worker and watch the other ranks of the job (see the module docstring).

    Args:
        rank (int): this worker's rank.
        group_size (int): number of workers.
        job (str): a name unique to the job (default: from ``MS_SCHED_HOST``/``MS_SCHED_PORT``).
        interval (float): seconds between two looks at the other workers.
        on_lost (callable | None): called with the message instead of printing it and ending the process
            (for tests).

    Example:
        >>> watch = PeerWatch(rank, group_size).start()  # doctest: +SKIP
        >>> ...  # train
        >>> watch.finish()  # doctest: +SKIP
    """

    def __init__(self, rank, group_size, job=None, interval=0.5, on_lost=None):
        self.rank = int(rank)
        self.group_size = int(group_size)
        if job is None:
            # The workers msrun starts on one host share its process as their parent: with the scheduler's port
            # that names this job (a later job reusing the port has another parent).
            job = f"{os.environ.get('MS_SCHED_PORT', 'local')}-{os.getppid()}"
        self.directory = os.path.join(tempfile.gettempdir(), f"mindpet-workers-{job}")
        self.interval = interval
        self.on_lost = on_lost
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread = None

    def _path(self, rank):
        return os.path.join(self.directory, f"rank_{rank}.json")

    def _write(self, state):
        os.makedirs(self.directory, exist_ok=True)
        tmp = self._path(self.rank) + f".{os.getpid()}.tmp"
        with open(tmp, 'w', encoding='utf-8') as handle:
            json.dump({'rank': self.rank, 'pid': os.getpid(), 'host': self.host, 'state': state}, handle)
        os.replace(tmp, self._path(self.rank))

    def _read(self, rank):
        try:
            with open(self._path(rank), encoding='utf-8') as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def lost(self):
        """``(rank, pid)`` of a worker on this host that registered, has not finished, and whose process is gone;
        None when every worker is fine."""
        for rank in range(self.group_size):
            if rank == self.rank:
                continue
            entry = self._read(rank)
            if not entry or entry.get('state') != RUNNING or entry.get('host') != self.host:
                continue
            if not _alive(int(entry['pid'])):
                return rank, int(entry['pid'])
        return None

    def start(self):
        """Register this worker and start watching the others. Returns ``self``."""
        if self.group_size < 2:
            return self
        self._write(RUNNING)
        self._thread = threading.Thread(target=self._watch, name='mindpet-peer-watch', daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(self.interval):
            found = self.lost()
            if found is None:
                continue
            rank, pid = found
            message = (f"mindpet finetune: error: worker rank {rank} (pid {pid}) was lost: its process ended "
                       f"before the run finished; rank {self.rank} stops too")
            if self.on_lost is not None:
                self.on_lost(message)
                return
            print(message, file=sys.stderr, flush=True)
            # The main thread is blocked inside a collective operation that never returns: end the process.
            os._exit(1)  # pylint: disable=protected-access

    def finish(self):
        """Stop watching and mark this worker finished (so its normal exit is not taken for a loss)."""
        self._stop.set()
        if self.group_size < 2:
            return
        self._write(DONE)
        entries = [self._read(rank) for rank in range(self.group_size)]
        if all(entry and entry.get('state') == DONE for entry in entries):
            for rank in range(self.group_size):
                try:
                    os.remove(self._path(rank))
                except OSError:
                    pass
            try:
                os.rmdir(self.directory)
            except OSError:
                pass


__all__ = ['PeerWatch']
