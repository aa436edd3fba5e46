"""``python bench/_measure_child.py RESULT_JSON ARGV...``: run ARGV, write its wall time, peak RSS
and CPU time (its own and that of the children it waited for).

Why a launcher: ``ru_maxrss`` of a child forked (or vforked) straight from the benchmark includes
the benchmark's own resident memory (Linux keeps the pre-exec peak), which would hide the child's
real figure behind the tens of megabytes the corpus takes in the parent. This launcher is a small
Python process (about 10 MB), so the figure it reports is the child's own peak, floored at that.
It imports nothing but the standard library on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> int:
    result_path, argv = sys.argv[1], sys.argv[2:]
    started = time.perf_counter()
    process = subprocess.Popen(argv)
    _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    with open(result_path, "w") as out:
        json.dump(
            {
                "returncode": process.returncode,
                "seconds": seconds,
                "max_rss_kib": usage.ru_maxrss,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
            },
            out,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
