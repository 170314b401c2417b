"""Build and development helpers of the repository (not installed with the package)."""
