"""Model file formats: TorchScript (``torchscript.py``) and torch.export programs (``exported.py``).

Each format module knows how to load (with its checks), save, run and time a model of its kind;
``registry.FORMATS`` is the table the run looks a file's format up in. ``program_check`` holds the
TorchScript operator checks, ``aoti`` the AOTInductor packaging of a ``.pt2`` program.
"""
