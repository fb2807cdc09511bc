"""The bottom layer: per-forward context, the sentinel-safe experts kernel, shared routing primitives,
collectives, strict configs and registries. Nothing here knows a model family or a routing method."""
