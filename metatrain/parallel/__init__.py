"""Sharding: the device mesh and the logical-to-mesh axis rules (see `mesh`)."""

from metatrain.parallel.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    LogicalRules,
    MeshConfig,
    batch_sharding,
    build_mesh,
    check_fits,
    mesh_axes_of,
    param_bytes_per_device,
    param_shardings,
    sharding_context,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "LogicalRules",
    "MeshConfig",
    "batch_sharding",
    "build_mesh",
    "check_fits",
    "mesh_axes_of",
    "param_bytes_per_device",
    "param_shardings",
    "sharding_context",
]
