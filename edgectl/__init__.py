"""edgectl: the reference fleet controller (its own program, on the controller's side of the
fleet protocol)."""
