"""Run a script with cProfile in every thread, timing each function in CPU time
(time.thread_time), not wall time: where a threaded consumer spends its CPU,
waits left out. For bench.py's profile scenario; the brief said py-spy or
cProfile, and py-spy's --gil view charges a thread for the time after it
released the GIL in C (a psycopg2 or socket wait), which this one does not.

    python bench/cpu_profile.py OUT.pstats SCRIPT [ARG...]

cProfile's own cost (about a microsecond per call) is in the figures too: read
them as shares, not as the script's speed.
"""

import atexit
import cProfile
import os
import pstats
import runpy
import sys
import threading
import time

profiles = []
lock = threading.Lock()


def _start_in_thread(frame, event, arg):
    """threading.setprofile's hook: on a new thread's first event, a profiler of its own."""
    sys.setprofile(None)
    profiler = cProfile.Profile(timer=time.thread_time)
    with lock:
        profiles.append(profiler)
    profiler.enable()


def _dump(path):
    stats = None
    with lock:
        found = list(profiles)
    for profiler in found:
        try:
            profiler.disable()  # only stops the current thread's; the others' are stopped
            profiler.create_stats()
        except Exception:
            continue
        if not getattr(profiler, "stats", None):
            continue
        if stats is None:
            stats = pstats.Stats(profiler)
        else:
            stats.add(profiler)
    if stats is not None:
        stats.dump_stats(path)


def main():
    out, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    threading.setprofile(_start_in_thread)
    main_profiler = cProfile.Profile(timer=time.thread_time)
    profiles.append(main_profiler)
    atexit.register(_dump, out)
    main_profiler.enable()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
