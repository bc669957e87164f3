"""Noticing a lost worker of a data-parallel run (``mindpet finetune`` under msrun).

When one worker process dies (killed, out of memory, a crash), msrun kills the other workers within a second and
then waits for its scheduler, which ends after the cluster timeout with tracebacks; no line says which worker was
lost (without msrun the survivors block in their next collective operation until that timeout). Each worker of a
run therefore registers itself in a small shared directory (rank, host, process id) and starts a watcher process
(this file run as a script: standard library only, in its own session so that msrun's kill of the worker's process
group spares it) that looks at its worker and the others ten times a second:

* when its own worker has ended without finishing while every other worker still ran, that worker is the lost one:
  the watcher records it (``lost.json``, first writer wins);
* when another worker is recorded as lost, or is seen gone without having finished, the watcher prints one line
  naming the lost rank on its worker's stderr (the worker's log) and ends its worker if it still runs (SIGTERM,
  then SIGKILL): survivors end within about a second, by msrun's kill or by this one.

A thread would not do: while the worker runs a compiled graph or waits in a collective, MindSpore holds the
interpreter lock. Workers on other hosts cannot be watched this way; there the cluster timeout (msrun
``--cluster_time_out``) still applies.

The registry directory is keyed by the job (the scheduler port msrun sets, ``MS_SCHED_PORT``, and the msrun process
that started the workers), under the system's temporary directory, and removed by the last worker that finishes.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

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
        job (str | None): a name unique to the job (default: from ``MS_SCHED_PORT`` and the parent process).
        interval (float): seconds between two looks of the watcher.

    Example:
        >>> watch = PeerWatch(rank, group_size).start()  # doctest: +SKIP
        >>> ...  # train
        >>> watch.finish()  # doctest: +SKIP
    """

    def __init__(self, rank, group_size, job=None, interval=0.1):
        self.rank = int(rank)
        self.group_size = int(group_size)
        if job is None:
            # The workers msrun starts on one host share its process as their parent: with the scheduler's port
            # that names this job (a later job reusing the port has another parent).
            job = f"{os.environ.get('MS_SCHED_PORT', 'local')}-{os.getppid()}"
        self.directory = os.path.join(tempfile.gettempdir(), f"mindpet-workers-{job}")
        self.interval = float(interval)
        self.host = socket.gethostname()
        self.watcher = None

    def _path(self, rank):
        return os.path.join(self.directory, f"rank_{rank}.json")

    def register(self, state, pid=None):
        """Write this worker's entry (``state``: 'running' or 'done'; ``pid`` defaults to this process)."""
        os.makedirs(self.directory, exist_ok=True)
        tmp = self._path(self.rank) + f".{os.getpid()}.tmp"
        with open(tmp, 'w', encoding='utf-8') as handle:
            json.dump({'rank': self.rank, 'pid': pid or os.getpid(), 'host': self.host, 'state': state}, handle)
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

    def message(self, rank, pid):
        """The one line a survivor prints."""
        return (f"mindpet finetune: error: worker rank {rank} (pid {pid}) was lost: its process ended before the run "
                f"finished; rank {self.rank} stops too")

    def record_lost(self, rank, pid):
        """Record worker ``rank`` as the lost one unless another was recorded first. Returns the record."""
        path = os.path.join(self.directory, 'lost.json')
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return self.recorded_lost()
        with os.fdopen(fd, 'w', encoding='utf-8') as handle:
            json.dump({'rank': rank, 'pid': pid}, handle)
        return {'rank': rank, 'pid': pid}

    def recorded_lost(self):
        """``{'rank', 'pid'}`` of the worker recorded as lost, or None."""
        try:
            with open(os.path.join(self.directory, 'lost.json'), encoding='utf-8') as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def start(self):
        """Register this worker and start its watcher process (nothing for a single worker). Returns ``self``."""
        if self.group_size < 2:
            return self
        self.register(RUNNING)
        args = json.dumps({'rank': self.rank, 'group_size': self.group_size, 'directory': self.directory,
                           'interval': self.interval, 'target': os.getpid()})
        self.watcher = subprocess.Popen([sys.executable, '-S', os.path.abspath(__file__), args],  # pylint: disable=R1732
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
                                        start_new_session=True)
        return self

    def finish(self):
        """Mark this worker finished (its normal exit is then not taken for a loss) and stop its watcher."""
        if self.group_size < 2:
            return
        self.register(DONE)
        if self.watcher is not None and self.watcher.poll() is None:
            self.watcher.terminate()
            self.watcher.wait()
        entries = [self._read(rank) for rank in range(self.group_size)]
        if all(entry and entry.get('state') == DONE for entry in entries):
            for name in [f"rank_{rank}.json" for rank in range(self.group_size)] + ['lost.json']:
                try:
                    os.remove(os.path.join(self.directory, name))
                except OSError:
                    pass
            try:
                os.rmdir(self.directory)
            except OSError:
                pass


def _end(pid):
    os.kill(pid, signal.SIGTERM)
    for _ in range(20):
        time.sleep(0.1)
        if not _alive(pid):
            return
    os.kill(pid, signal.SIGKILL)


def _watch(rank, group_size, directory, interval, target):
    """The watcher process of worker ``target`` (rank ``rank``); see the module docstring."""
    watch = PeerWatch(rank, group_size, job='unused', interval=interval)
    watch.directory = directory
    while True:
        entry = watch._read(rank)  # pylint: disable=protected-access
        if entry is None or entry.get('state') != RUNNING:
            return                                    # finished (or the registry is gone)
        target_alive = _alive(target)
        recorded = watch.recorded_lost()
        if recorded is None:
            found = watch.lost()
            if not target_alive and found is None:
                watch.record_lost(rank, target)       # this worker ended first: it is the lost one
                return
            if found is not None:
                recorded = watch.record_lost(*found)
        if recorded is not None and recorded.get('rank') != rank:
            print(watch.message(recorded['rank'], recorded['pid']), file=sys.stderr, flush=True)
            if _alive(target):
                _end(target)
            return
        if recorded is not None or not target_alive:
            return
        time.sleep(interval)


__all__ = ['PeerWatch']

if __name__ == '__main__':
    _watch(**json.loads(sys.argv[1]))
