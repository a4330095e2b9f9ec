"""``ray job submit`` entry point for screening; same flags as ``cxr-ray screen``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/screen.py --model s3://models/covid --input s3://archive/ --output s3://results/run1

Inside a job Ray sets ``RAY_ADDRESS``, so the job joins the cluster
(``ray.init(address="auto")``); run by hand without it, it starts a local Ray.
The summary JSON is printed on stdout (``ray job logs`` shows it); the exit
status is the CLI's: 0 complete, 1 incomplete or failed, 2 bad usage.
"""

from __future__ import annotations

import os
import sys

# `python jobs/screen.py` puts jobs/ on sys.path, not the repository root that
# `--working-dir .` ships: make the package importable either way.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def main(argv: list[str] | None = None) -> int:
    from cxr_ray.cli import main as cli_main

    return cli_main(["screen", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
