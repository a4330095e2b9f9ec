"""CNN architectures: the registry (plain data, by name), building one (``build``), inheriting weights
(``transfer``, ``weights``), and the artifact a trained one lives in (``card``, ``artifact``).

Only the registry is imported here, so ``import cxr_ray.models`` does not load torch.
"""

from cxr_ray.models.registry import ArchSpec, get_arch, list_archs

__all__ = ["ArchSpec", "get_arch", "list_archs"]
