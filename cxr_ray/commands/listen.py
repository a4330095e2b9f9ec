"""``cxr-ray listen``: a DICOM C-STORE SCP (pynetdicom) that screens pushed X-rays, until Ctrl-C.

A plain process, no Ray (why: :mod:`cxr_ray.dicomnet.listen`). Prints one JSON
line (address, AE title, where SRs go) once it listens, and one with the counts
(``batches``, ``max_batch``: backend calls and the most instances in one) when it stops.
"""

from __future__ import annotations

import argparse
import json
import logging

from cxr_ray.commands.foreground import wait_until_stopped
from cxr_ray.commands.options import add_engine_options, add_shared, positive_int
from cxr_ray.engines.registry import BACKEND_NAMES
from cxr_ray.engines.request import engine_options
from cxr_ray.errors import UsageError
from cxr_ray.models.registry import EXPLAIN_METHODS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "listen",
        help="DICOM node: screen X-rays pushed by C-STORE, store the SR onward",
        description=(
            "A C-STORE SCP for CR and DX instances (and C-ECHO). Each instance is screened with the model; "
            "its Comprehensive SR is stored by C-STORE to --forward-to, else back to the calling AE's address "
            "on --reply-port. Other SOP classes are refused. Runs until Ctrl-C."
        ),
    )
    add_shared(parser, "model")
    parser.add_argument("--ae-title", default="CXRRAY", help="this node's AE title (default CXRRAY)")
    parser.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--forward-to", default=None, metavar="HOST:PORT:AET",
                        help="store every SR at this DICOM node (e.g. the PACS)")
    parser.add_argument("--reply-port", type=int, default=None,
                        help="without --forward-to: store each SR back at the caller's address on this port, "
                        "to its calling AE title")
    parser.add_argument("--backend", default="auto", choices=BACKEND_NAMES, help="inference backend")
    parser.add_argument("--device", default=None, help="backend device, e.g. cuda:0 (default: the backend's choice)")
    # 16: serve's default (cxr_ray.dicomnet.listen.MAX_BATCH_SIZE; not imported here, so --help stays fast)
    parser.add_argument("--max-batch-size", type=positive_int, default=16,
                        help="instances arriving on concurrent associations while the model runs go into its next "
                        "call, as serve batches requests; at most this many (default 16, as serve)")
    parser.add_argument("--heatmaps", default="none", choices=("none", "flagged"),
                        help="flagged: also store each flagged instance's heatmap overlay as a Secondary Capture, "
                        "after its SR, at the same node")
    parser.add_argument("--heatmap-method", default="gradcam", choices=EXPLAIN_METHODS,
                        help="explanation for --heatmaps (default gradcam)")
    add_shared(parser, "s3_endpoint")
    add_engine_options(parser)


def run(args: argparse.Namespace) -> int:
    from cxr_ray.dicomnet.listen import Destination, Listener, Screener

    forward_to = Destination.parse(args.forward_to) if args.forward_to else None
    if forward_to is None and args.reply_port is None:  # before the model loads, not after
        raise UsageError("listen: give --forward-to HOST:PORT:AET, or --reply-port to send SRs back to the caller")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # pynetdicom's INFO lines echo request attributes; its warnings and errors are enough here.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines name the source study's UID
    listener = Listener(
        Screener(args.model, backend=args.backend, device=args.device, s3_endpoint=args.s3_endpoint,
                 heatmap_method=args.heatmap_method if args.heatmaps == "flagged" else None,
                 max_batch_size=args.max_batch_size, engine_options=engine_options(args)),
        ae_title=args.ae_title, forward_to=forward_to, reply_port=args.reply_port,
    )
    listener.start(args.host, args.port)
    sr_to = (f"{forward_to.host}:{forward_to.port}:{forward_to.ae_title}" if forward_to
             else f"caller:{args.reply_port}")
    print(json.dumps({"listening": f"{args.host}:{args.port}", "ae_title": args.ae_title, "sr_to": sr_to}),
          flush=True)
    try:
        wait_until_stopped()
    finally:
        listener.stop()
        listener.screener.close()
        print(json.dumps({"stopped": True, **listener.counts, **listener.screener.stats}), flush=True)
    return 0
