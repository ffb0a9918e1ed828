"""What a client controls besides the model: a spec nested to exhaust the parser, a file name carrying
CR/LF, a data file that lies in its zip directory. Each gets a clear answer (422 naming the field, or
a sanitized name), never a 500, while the API's memory stays bounded; each next to the genuine case."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from modelpress.stack import Stack
from tests.conftest import ApiClient
from tests.models import SmallConvNet, scripted_bytes

QUICK = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}
DEEP = 20_000


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    torch.manual_seed(0)
    return scripted_bytes(SmallConvNet())


def _api_memory(stack: Stack) -> int:
    api = psutil.Process(stack.processes["api"].pid)
    return sum(process.memory_info().rss for process in [api, *api.children(recursive=True)])


# ----------------------------------------------------------------------------- nesting


@pytest.mark.parametrize("as_file", [False, True], ids=["form-field", "file-part"])
def test_a_spec_nested_20000_deep_is_a_422_naming_spec(api: ApiClient, model_bytes: bytes, as_file: bool) -> None:
    deep = json.dumps(QUICK)[:-1] + ', "quantize": ' + "[" * DEEP + "]" * DEEP + "}"
    assert len(deep) < 64 * 1024  # inside the spec's size limit: only the depth is wrong
    parts = {"model": ("m.pt", model_bytes, "application/octet-stream")}
    if as_file:
        response = api.session.post(
            api.url("/v1/jobs"), files={**parts, "spec": ("spec.json", deep.encode())}, timeout=60
        )
    else:
        response = api.session.post(api.url("/v1/jobs"), files=parts, data={"spec": deep}, timeout=60)

    assert response.status_code == 422, response.text
    assert "nested more than 32 levels deep" in response.json()["errors"]["spec"][0]
    # Positive control: the same request with the spec as it should be is accepted.
    assert api.submit(model_bytes, QUICK).status_code == 202


# ----------------------------------------------------------------------------- file names


def test_a_crlf_in_an_rfc2231_filename_is_dropped_and_the_download_works(api: ApiClient, model_bytes: bytes) -> None:
    boundary = b"modelpress-boundary"
    body = b"".join(
        [
            b"--" + boundary + b"\r\n",
            b'Content-Disposition: form-data; name="model"; '
            b"filename*=UTF-8''..%2Fdir%2Fevil%0D%0AX-Injected%3A%201%00.pt\r\n",
            b"Content-Type: application/octet-stream\r\n\r\n",
            model_bytes,
            b"\r\n",
            b"--" + boundary + b"\r\n",
            b'Content-Disposition: form-data; name="spec"\r\n\r\n',
            json.dumps(QUICK).encode(),
            b"\r\n",
            b"--" + boundary + b"--\r\n",
        ]
    )
    response = api.session.post(
        api.url("/v1/jobs"),
        data=body,
        timeout=60,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"},
    )
    assert response.status_code == 202, response.text
    assert response.json()["input"]["filename"] == "evilX-Injected: 1.pt"  # no CR, LF, NUL nor folders

    job = api.wait(response.json()["id"], timeout=180)
    assert job["state"] == "succeeded", job["error"]
    download = api.session.get(api.url(job["links"]["model"]), headers={"Accept-Encoding": "identity"}, timeout=60)

    assert download.status_code == 200
    assert download.headers["Content-Disposition"] == 'attachment; filename="evilX-Injected: 1.quantize.pt"'
    assert "X-Injected" not in download.headers
    assert torch.jit.load(io.BytesIO(download.content)) is not None


# ----------------------------------------------------------------------------- the data file's zip


def _genuine_npz(path: Path) -> Path:
    np.savez(path, inputs=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    return path


def test_an_npz_that_lies_about_its_entry_count_is_refused_without_the_api_growing(
    api: ApiClient, stack: Stack, model_bytes: bytes, tmp_path: Path
) -> None:
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(liar, "w") as archive:
        for index in range(200_000):
            archive.writestr(f"a{index}.npy", b"")
    body = bytearray(liar.read_bytes())
    end = body.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", body, end + 8, 1, 1)  # the end record now says 1 entry
    assert len(zipfile.ZipFile(io.BytesIO(bytes(body))).infolist()) == 200_000  # zipfile parses them all anyway
    liar.write_bytes(body)

    before = _api_memory(stack)
    response = api.submit(model_bytes, QUICK, data=liar)

    assert response.status_code == 422, response.text
    assert "directory declares" in response.json()["errors"]["data"][0]
    assert _api_memory(stack) - before < 60 << 20


def test_an_npz_that_declares_gigabytes_is_refused(api: ApiClient, model_bytes: bytes, tmp_path: Path) -> None:
    swollen = tmp_path / "swollen.npz"
    body = bytearray(_genuine_npz(tmp_path / "genuine.npz").read_bytes())
    entry = body.find(b"PK\x01\x02")
    struct.pack_into("<LL", body, entry + 20, 1 << 30, 1 << 30)  # compressed and uncompressed: 1 GiB each
    swollen.write_bytes(body)

    response = api.submit(model_bytes, QUICK, data=swollen)

    assert response.status_code == 422, response.text
    assert f"declares {1 << 30} bytes uncompressed" in response.json()["errors"]["data"][0]


def test_an_npz_that_expands_a_thousandfold_is_refused(api: ApiClient, model_bytes: bytes, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, inputs=np.zeros((1024, 3, 32, 32), np.float32))  # 12 MB of zeros, a few KB on disk

    response = api.submit(model_bytes, QUICK, data=bomb)

    assert response.status_code == 422, response.text
    assert "refused as a zip bomb" in response.json()["errors"]["data"][0]


def test_a_genuine_npz_passes_the_bounds_and_its_job_succeeds(
    api: ApiClient, model_bytes: bytes, tmp_path: Path
) -> None:
    response = api.submit(model_bytes, QUICK, data=_genuine_npz(tmp_path / "genuine.npz"))
    assert response.status_code == 202, response.text
    job = api.wait(response.json()["id"], timeout=180)
    assert job["state"] == "succeeded", job["error"]  # the engine's own bounded read took it too


def test_the_consoles_json_fields_refuse_deep_nesting_and_take_a_shallow_value() -> None:
    from werkzeug.datastructures import MultiDict

    from service.console import form as spec_form

    tree = spec_form.controls()
    deep = MultiDict({"spec.method": "quantize", "spec.inputs": "[" * DEEP + "]" * DEEP})
    spec, errors = spec_form.spec_from_form(deep, tree)
    assert errors == {"spec.inputs": ["not valid JSON: nested more than 32 levels deep"]}

    shallow = MultiDict({"spec.method": "quantize", "spec.inputs": '[{"shape": [1, 3, 8, 8]}]'})
    spec, errors = spec_form.spec_from_form(shallow, tree)
    assert errors == {} and spec["inputs"] == [{"shape": [1, 3, 8, 8]}]
