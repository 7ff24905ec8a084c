"""Capture: collectors, the bounded queue, and the durable raw segment log (layers 1-2)."""
