"""Estimators for cluster policies (waiting times of queued requests)."""
