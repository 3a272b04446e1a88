"""Training data on `gs://` (what launch/tpu_vm.sh passes): what reads it, and the one line when nothing here can.

Without a network: a local stand-in of Cloud Storage's JSON API serves the objects that array_record's own GCS
client asks for, and the check for a reader of the rest runs before any request.
"""

from __future__ import annotations

import http.server
import importlib.util
import re
import threading
import urllib.parse
from collections.abc import Iterator

import pytest
from array_record.python import array_record_data_source, array_record_module

from mae_jax import input_pipeline
from tests.conftest import tiny_train_config


class CloudStorageStandIn(http.server.ThreadingHTTPServer):
    """Cloud Storage's media download as the JSON API serves it: `GET /storage/v1/b/BUCKET/o/OBJECT?alt=media`,
    the object name URL-encoded, with `Range: bytes=A-B`, `bytes=A-` or a suffix `bytes=-N` answered 206."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects, self.requests = objects, []
        super().__init__(("127.0.0.1", 0), _MediaDownload)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _MediaDownload(http.server.BaseHTTPRequestHandler):
    server: CloudStorageStandIn

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        match = re.fullmatch(r"/storage/v1/b/([^/]+)/o/([^/]+)", url.path)
        name = match and f"gs://{match[1]}/{urllib.parse.unquote(match[2])}"
        self.server.requests.append(name)
        if name not in self.server.objects or "alt=media" not in url.query:
            self.send_error(404)
            return
        blob = self.server.objects[name]
        first, last, status = 0, len(blob) - 1, 200
        if byte_range := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "")):
            start, end = byte_range.groups()
            first = int(start) if start else len(blob) - int(end)
            last = int(end) if start and end else len(blob) - 1
            status = 206
        body = blob[first : last + 1]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-goog-generation", "1")
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(blob)}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def cloud_storage(monkeypatch) -> Iterator[CloudStorageStandIn]:
    server = CloudStorageStandIn({})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # google-cloud-cpp's storage client (inside array_record) sends its requests there, without credentials
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", server.endpoint)
    yield server
    server.shutdown()
    server.server_close()


def test_the_pinned_array_record_reads_gs_objects_itself(cloud_storage: CloudStorageStandIn, tmp_path):
    """The ArrayRecord data source TFDS builds opens `gs://` paths with array_record's C++ GCS reader (since
    0.8.3): no TensorFlow file system and no local copy in between."""
    local = tmp_path / "digits.array_record-00000-of-00001"
    writer = array_record_module.ArrayRecordWriter(str(local), "group_size:1")
    for index in range(7):
        writer.write(f"record {index}".encode())
    writer.close()
    name = "gs://bucket/tfds/digits.array_record-00000-of-00001"
    cloud_storage.objects[name] = local.read_bytes()

    source = array_record_data_source.ArrayRecordDataSource([name])
    assert len(source) == 7
    assert source[5] == b"record 5" and source.__getitems__([6, 0]) == [b"record 6", b"record 0"]
    assert set(cloud_storage.requests) == {name}


@pytest.mark.parametrize("source", ["tfds", "folder", "fashion_mnist"])
def test_a_gs_data_dir_with_no_reader_for_it_is_one_line_before_any_request(source: str, monkeypatch):
    """Without TensorFlow and gcsfs, etils cannot list `gs://`: the run stops at start with what to install or
    how to do without, before the source is opened (which is when TFDS or the folder listing would go out)."""
    dataset = tiny_train_config(**{"dataset.source": source, "dataset.data_dir": "gs://bucket/data"}).dataset

    def opened(dataset):
        raise AssertionError(f"{dataset.source} was opened on {dataset.data_dir} before any check")

    monkeypatch.setitem(input_pipeline.SOURCES, source, opened)
    real_find_spec = importlib.util.find_spec
    missing = {"gcsfs", "tensorflow"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name in missing else real_find_spec(name, *args)
    )
    with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
        input_pipeline.make_source(dataset)
    message = str(error.value)
    assert "\n" not in message and "gs://bucket/data" in message
    assert ".[gcs]" in message and "gcsfuse" in message and "local disk" in message

    missing = {"gcsfs"}  # TensorFlow's file system is enough too: the source is opened
    with pytest.raises(AssertionError, match="was opened on gs://bucket/data"):
        input_pipeline.make_source(dataset)
