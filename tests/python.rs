//! The Python client (`examples/python`) against a real lockd and Redis.
