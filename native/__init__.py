"""Compiled hot loops (Cython), each called through one small Python function of its service."""
