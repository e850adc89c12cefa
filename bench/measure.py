"""Run one command and print its wall time and peak RSS as JSON: `python -m bench.measure CMD...`.

A separate small process on purpose: a child forked from the benchmark itself (which has torch loaded) would inherit
its resident size in ru_maxrss, so the command is started from here, where the parent is a bare interpreter.
"""

import json
import os
import subprocess
import sys
import time

if __name__ == "__main__":
    started = time.perf_counter()
    proc = subprocess.Popen(sys.argv[1:], stdout=sys.stderr)
    _, status, usage = os.wait4(proc.pid, 0)
    print(json.dumps({"seconds": round(time.perf_counter() - started, 2),
                      "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
                      "returncode": os.waitstatus_to_exitcode(status)}))
