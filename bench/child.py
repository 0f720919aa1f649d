"""One case in its own process, so that its peak RSS is its own: ``python -m bench.child '<job as JSON>'``.

Prints one line ``RESULT <json>`` on stdout: the outcome, the RSS before the clock started and the peak RSS of the
whole process (which includes the traffic it loaded: the same for every case on the same slice).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from bench.cases import CASES, Job, peak_rss_mib, rss_at_start


def main(argv: list[str]) -> int:
    job = Job(**json.loads(argv[0]))
    _, run = CASES[job.case]
    outcome = run(job)
    result: dict[str, Any] = {**dataclasses.asdict(outcome), "peak_rss_mib": outcome.peak_rss_mib or peak_rss_mib(),
                              "rss_start_mib": rss_at_start[0] if rss_at_start else None}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
