"""The project itself: its params (`params.yaml`), files, console, reports, tools and lineage.
Imports nothing else from `tasks`.
"""
