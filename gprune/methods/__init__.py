"""Pruning methods as plugins: one module per method (``gprune.methods.base`` says what a
method declares), criteria (``importance``), allocators (``allocators``) and the registry
(``registry``: ``build_method``, ``method_names``). Kept empty so that importing one of
them (e.g. the allocate stage importing ``allocators``) does not import all of them.
"""
