"""The dashboard's widgets: each renders one part of a `Snapshot` and holds no cluster logic."""
