"""Upstream compatibility: the tested version ranges, named lookups of upstream internals, and contact points."""
