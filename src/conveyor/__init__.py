"""conveyor: drop a dataset into S3, get a model behind an authenticated HTTPS endpoint."""
