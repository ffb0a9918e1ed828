"""Graph analysis: the channels that must be pruned together, and reading program graphs.

``channels`` builds channel groups from a canonical TorchScript graph (``workers.engine.torchscript_graph``),
``slicing`` cuts the chosen channels out of every tensor of a group, ``proof`` checks a slicing
against a masked reference, and ``program_graph`` reads tensors and module paths of a ``.pt2``
program's graph.
"""
