"""The lowest layer: experiment schema and loading, the registry and family
declarations, message keys, seeding and errors. Imports neither torch nor Flower."""
