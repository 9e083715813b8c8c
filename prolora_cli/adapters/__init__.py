"""Adapter methods. Each module holds one method's math and its layer, with no I/O."""
