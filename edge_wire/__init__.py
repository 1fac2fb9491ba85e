"""edge_wire: what both processes share: the engine's frame protocol, the typed messages and
parameter ranges, and the config convention. Depends on msgspec and msgpack only."""
