"""The HTTP server face."""
