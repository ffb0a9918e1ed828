"""Graph analysis: reading a TorchScript graph and finding the channels that must be pruned together.

``torchscript_graph`` freezes, canonicalises and rewrites TorchScript graphs (shared by the methods);
the channel analysis builds channel groups from a canonical graph, ``slicing`` cuts the chosen
channels out of every tensor of a group, and ``proof`` checks a slicing against a masked reference.
"""
