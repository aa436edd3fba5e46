"""One side of ``bench_search --against``: started with a source tree's ``emailops`` first on the
path, it runs each search or count it reads on stdin (a JSON line) and prints its milliseconds."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime

from emailops.search.service import SearchOptions, Sort, count, search
from emailops.store.database import create_index_engine, reading


def main() -> None:
    url, account = sys.argv[1], sys.argv[2]
    engine = create_index_engine(url)
    with reading(engine) as conn:
        for line in sys.stdin:
            job = json.loads(line)
            options = SearchOptions(sort=Sort(job["sort"]), limit=50, now=datetime.fromisoformat(job["now"]))
            function = count if job["kind"] == "count" else search
            started = time.perf_counter()
            function(conn, account, job["query"], options)
            print(json.dumps((time.perf_counter() - started) * 1000), flush=True)


if __name__ == "__main__":
    main()
