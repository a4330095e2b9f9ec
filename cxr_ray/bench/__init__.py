"""``cxr-ray bench SUITE``: one module per suite, each with ``add_parser(subparsers)`` and ``run(args)``.

Suites are listed in :data:`cxr_ray.commands.bench.SUITES`; their modules import what they measure at the top. Each prints one
JSON document and says which clock it used.
"""
