"""``ray job submit`` entry point for training; same flags as ``cxr-ray train``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/train.py --data s3://cxr/labels.csv --arch densenet121 --mode finetune \\
            --pretrained imagenet --epochs 20 --num-workers 4 --use-gpu \\
            --out s3://models/covid-densenet --storage-path s3://models/runs

Inside a job Ray sets ``RAY_ADDRESS`` (and ``RAY_JOB_ID``), so this joins the
cluster with ``ray.init(address="auto")``; run by hand without them it starts
a local Ray. Re-submitting the same command resumes from the last checkpoints
(use shared --storage-path, e.g. s3://, on a multi-node cluster). The JSON
summary is printed on stdout (``ray job logs``); exit status as the CLI's.
"""

from __future__ import annotations

import os
import sys

# `python jobs/train.py` puts jobs/ on sys.path, not the repository root that
# `--working-dir .` ships: make the package importable either way.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def main(argv: list[str] | None = None) -> int:
    import ray

    from cxr_ray.cli import main as cli_main

    if not ray.is_initialized() and (os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID")):
        ray.init(address="auto")
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
