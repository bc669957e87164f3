"""Timing and memory primitives the benchmark workers share: medians, interleaved wall/CPU timing, peak memory."""
import resource
import statistics
import time


def median(values):
    return statistics.median(values) if values else float('nan')


def peak_rss_mb():
    """Peak resident memory of this process so far (ru_maxrss, KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mb(field):
    """A memory field of /proc/self/status (VmHWM, RssAnon, RssFile, ...) in MB, or None."""
    try:
        with open('/proc/self/status', encoding='utf-8') as fh:
            for line in fh:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def memory_snapshot():
    """This process's memory now, in MB: ``rss`` (VmRSS), ``hwm`` (VmHWM, the peak so far), ``anon`` (VmRSS -
    RssFile - RssShmem: what was allocated, without shared-library pages) and ``file`` (RssFile)."""
    fields = {name: _status_mb(name) for name in ('VmRSS', 'VmHWM', 'RssFile', 'RssShmem')}
    if fields['VmRSS'] is None:
        return dict(rss=peak_rss_mb(), hwm=peak_rss_mb(), anon=None, file=None)
    return dict(rss=fields['VmRSS'], hwm=fields['VmHWM'], file=fields['RssFile'],
                anon=fields['VmRSS'] - fields['RssFile'] - (fields['RssShmem'] or 0.0))


def memory_figures():
    """Peak RSS, and the peak without file-backed pages (shared libraries): VmHWM - RssFile - RssShmem.

    The file-backed part depends on how much of MindSpore's libraries other processes keep in the page cache
    (fault-around maps cached neighbours), which differs by ~100 MB between two virtualenvs of the same wheel;
    the anonymous part is what the framework allocated: weights, gradients, optimizer state, activations, graphs.
    """
    peak = peak_rss_mb()
    hwm, rss_file, rss_shmem = _status_mb('VmHWM'), _status_mb('RssFile'), _status_mb('RssShmem')
    anon = hwm - rss_file - (rss_shmem or 0.0) if hwm is not None and rss_file is not None else None
    return dict(peak_mb=peak, peak_anon_mb=anon, rss_file_mb=rss_file)


def interleaved(funcs, iterations, warmup=1):
    """Time each callable ``iterations`` times, alternating between them.

    Returns (wall, cpu): name -> list of seconds of wall-clock time and of CPU time of this process (all threads).
    On a shared machine wall time includes the time other processes held the cores; CPU time does not.
    """
    for _ in range(warmup):
        for fn in funcs.values():
            fn()
    wall = {name: [] for name in funcs}
    cpu = {name: [] for name in funcs}
    for _ in range(iterations):
        for name, fn in funcs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def timed(funcs, iterations):
    """Interleaved timing; name -> median seconds as {'time_s': name -> wall, 'cpu_s': name -> CPU}."""
    wall, cpu = interleaved(funcs, iterations)
    return dict(time_s={n: median(t) for n, t in wall.items()}, cpu_s={n: median(t) for n, t in cpu.items()})
