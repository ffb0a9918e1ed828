"""Checks of an uploaded TorchScript archive that read only its zip directory (no torch, no unpickling).

The API runs them before a job is queued, so a file that cannot be a TorchScript model
is refused at once with a reason.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

EXPORT_HINT = "export the model with torch.jit.script(model).save('model.pt')"


class ArchiveRejected(ValueError):
    """The file is not a TorchScript archive; ``str()`` says why and how to fix it."""


def check_torchscript_archive(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise ArchiveRejected(
            "not a TorchScript archive: no zip directory found, so the file is truncated or not a "
            f"TorchScript model; {EXPORT_HINT}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ArchiveRejected(f"the zip archive is damaged ({error}); upload the complete file again") from None
    roots = {name.split("/", 1)[0] for name in names}
    has_code = any("/code/" in name for name in names)
    has_constants = any(name.endswith("/constants.pkl") for name in names)
    if len(roots) != 1 or not has_code or not has_constants:
        raise ArchiveRejected(
            "the file is a zip archive but not TorchScript (no code/ and constants.pkl): probably a "
            f"torch.save() checkpoint or state_dict; {EXPORT_HINT}"
        )
