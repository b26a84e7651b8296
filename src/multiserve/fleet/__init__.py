"""Which models exist, which are loaded, and getting a request to a running worker."""
