"""Ray Serve HTTP endpoint: screen one X-ray on demand with the batch job's artifact.

``cxr_ray.serve.app:app_builder`` is the ``import_path`` of ``deploy/serve.yaml``;
:class:`~cxr_ray.serve.config.ServeArgs` are its typed arguments. Importing this
package starts nothing and imports neither Ray nor torch.
"""

from cxr_ray.serve.config import AutoscalingArgs, DeploymentArgs, ServeArgs

__all__ = ["AutoscalingArgs", "DeploymentArgs", "ServeArgs"]
