import sys

from cxr_ray.cli import main

sys.exit(main())
