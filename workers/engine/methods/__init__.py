"""Compression methods, one package each: quantize, prune, distill.

In each package ``torchscript.py`` holds the entry for TorchScript models (named in
``modelpress.spec.REGISTRY``) and ``exported.py`` the entry for torch.export (``.pt2``) programs
(named in ``methods.registry``). ``training`` (fine-tuning, accuracy) is shared by methods and the run.
"""
