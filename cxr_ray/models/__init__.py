"""CNN architectures by name (registry) and how a new model inherits weights (transfer)."""

from cxr_ray.models.registry import ArchSpec, build_model, get_arch, list_archs

__all__ = ["ArchSpec", "build_model", "get_arch", "list_archs"]
