"""Checks of the project itself: generated protos, package boundaries, lint and types."""
