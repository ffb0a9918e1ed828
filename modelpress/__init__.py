"""Pieces shared by the API (``service``) and the workers: configuration, the spec schema,
job records and job files."""
