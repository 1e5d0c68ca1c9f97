"""The only package that imports ray: Ray Data scoring, Ray tasks for proxies, Ray Train."""
