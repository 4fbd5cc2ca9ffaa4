"""One module per circuit format (``eap``, ``acdc``, ``auto_circuit``, ``native``), each mapping
a tool's names onto :class:`~subnet_interp.analysis.Circuit`'s. They import
``analysis.circuits`` for the graph description and the ``Circuit`` class; the public names are
re-exported by ``si.analysis.circuit_formats`` (see its docstring for what each reads).
"""
