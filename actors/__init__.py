"""The Ray layer: the Ray executor (ray_executor.py), cluster plumbing (cluster.py), the model host (one actor
per model identity) and the world driver (one actor per world). It imports the core `worldgen`, never the
reverse; serve_apps and train_jobs sit above it."""
