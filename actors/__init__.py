"""Ray actor classes: the model host (one per model identity) and, later, the world driver."""
