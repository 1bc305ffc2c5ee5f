"""TFDS download path (experiments/common/tfds_download.py) with the network replaced.

Only 127.0.0.1 is ever contacted: an autouse guard refuses every other address and name.
CIFAR-10 is prepared for real from a tiny archive in its binary format, served on
127.0.0.1, and read back through ``cifar.load_split``; failed and impossible
transfers (HTTP error, closed port, unknown host, hanging DNS, missing module) end in one
``DataMissingError`` line within seconds, for the image, LM and translation readers.
"""

import hashlib
import http.server
import io
import socket
import tarfile
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.download import checksums, downloader
from tensorflow_datasets.core.download import util as download_util
from tensorflow_datasets.image_classification import cifar as tfds_cifar

from experiments.common import tfds_download
from experiments.data import cifar
from experiments.data.text import char_lm, parallel

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
LOCAL = "127.0.0.1"
_PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def only_localhost(monkeypatch):
    """Refuse every address but 127.0.0.1, and drop proxy settings, for the whole test."""
    for var in _PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in (LOCAL, "localhost"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(LOCAL, *args, **kwargs)

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] != LOCAL:
            raise AssertionError(f"test tried to reach {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)


def _cifar_archive(images_per_file: int = 3):
    """cifar-10-binary.tar.gz in the real layout, and the {(label, HWC image bytes)} of its
    train split (five data_batch files) and test split."""
    rng = np.random.default_rng(0)
    buffer, examples = io.BytesIO(), {"train": set(), "test": set()}
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("batches.meta.txt", "\n".join(f"class{i}" for i in range(10)).encode() + b"\n")
        files = [(f"data_batch_{i}.bin", "train") for i in range(1, 6)]
        for name, split in files + [("test_batch.bin", "test")]:
            records = []
            for _ in range(images_per_file):
                label = int(rng.integers(0, 10))
                chw = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
                records.append(bytes([label]) + chw.tobytes())
                examples[split].add((label, chw.transpose(1, 2, 0).tobytes()))
            add(name, b"".join(records))
    return buffer.getvalue(), examples


@pytest.fixture
def serve():
    """serve(body, status) -> URL on 127.0.0.1 that answers every GET with ``body``."""
    servers = []

    def start(body: bytes, status: int = 200, name: str = "cifar-10-binary.tar.gz") -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer((LOCAL, 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://{LOCAL}:{server.server_port}/{name}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _point_cifar10_at(monkeypatch, url: str, body: bytes) -> None:
    """The real cifar10 builder, downloading ``url`` and checking it against ``body``."""
    real_info = tfds_cifar.Cifar10._cifar_info.fget
    monkeypatch.setattr(tfds_cifar.Cifar10, "_cifar_info",
                        property(lambda self: real_info(self)._replace(url=url)))
    monkeypatch.setattr(tfds_cifar.Cifar10, "url_infos", {url: checksums.UrlInfo(
        size=tfds_utils.Size(len(body)), checksum=hashlib.sha256(body).hexdigest(),
        filename=url.rsplit("/", 1)[1])})


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        return sock.getsockname()[1]


def _assert_one_line(error: BaseException, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


def test_download_hosts_come_from_the_builders_checksums(monkeypatch, tmp_path):
    # Reading url_infos is what needed importlib_resources in a fresh install.
    url_infos = tfds.builder("cifar10", data_dir=str(tmp_path)).url_infos
    assert CIFAR_URL in url_infos
    assert tfds_download.download_hosts(url_infos) == [("www.cs.toronto.edu", 443)]
    hosts = tfds_download.download_hosts(
        tfds.builder("wmt14_translate/fr-en", data_dir=str(tmp_path)).url_infos)
    assert ("www.statmt.org", 80) in hosts
    assert tfds_download.download_hosts({"gs://bucket/x": None, "/local/file": None}) == []
    # Through a proxy the connection goes to the proxy, unless NO_PROXY exempts the host.
    monkeypatch.setenv("HTTPS_PROXY", f"http://{LOCAL}:3128")
    assert tfds_download.download_hosts(url_infos) == [(LOCAL, 3128)]
    monkeypatch.setenv("NO_PROXY", ".toronto.edu")
    assert tfds_download.download_hosts(url_infos) == [("www.cs.toronto.edu", 443)]


def test_cifar10_downloads_from_localhost_and_loads(monkeypatch, tmp_path, serve):
    body, examples = _cifar_archive()
    _point_cifar10_at(monkeypatch, serve(body), body)
    train = cifar.load_split("cifar10", "train", data_dir=str(tmp_path))
    test = cifar.load_split("cifar10", "test", data_dir=str(tmp_path), download=False)
    assert train.images.shape == (15, 32, 32, 3) and train.images.dtype == np.uint8
    assert len(test) == 3
    for split, data in (("train", train), ("test", test)):
        read = {(int(label), image.tobytes()) for label, image in zip(data.labels, data.images)}
        assert read == examples[split]  # every pixel and label, in TFDS's stored order
    assert tfds.builder("cifar10", data_dir=str(tmp_path)).is_prepared()


def test_a_failed_transfer_ends_in_one_line(monkeypatch, tmp_path, serve):
    body, _ = _cifar_archive(images_per_file=1)
    _point_cifar10_at(monkeypatch, serve(b"gone", status=404), body)
    start = time.monotonic()
    with pytest.raises(cifar.DataMissingError) as info:
        cifar.load_split("cifar10", "train", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    _assert_one_line(info.value, "downloading and preparing it failed (DownloadError:",
                     "HTTP code: 404", "point --data_dir (or TFDS_DATA_DIR", str(tmp_path))
    assert not tfds.builder("cifar10", data_dir=str(tmp_path)).is_prepared()


def test_a_transfer_that_does_not_match_its_checksum_ends_in_one_line(monkeypatch, tmp_path,
                                                                      serve):
    body, _ = _cifar_archive(images_per_file=1)
    _point_cifar10_at(monkeypatch, serve(body[:-10]), body)
    with pytest.raises(cifar.DataMissingError) as info:
        cifar.load_split("cifar10", "train", data_dir=str(tmp_path))
    _assert_one_line(info.value, "NonMatchingChecksumError", "fix that cause and rerun")


@pytest.mark.parametrize("unreachable", ["closed port", "unknown host", "proxy"])
def test_offline_fails_fast_before_any_transfer(monkeypatch, tmp_path, unreachable):
    url = (f"http://{LOCAL}:{_closed_port()}/cifar-10-binary.tar.gz"
           if unreachable == "closed port" else CIFAR_URL)
    if unreachable == "proxy":
        monkeypatch.setenv("HTTPS_PROXY", f"http://{LOCAL}:{_closed_port()}")
    body, _ = _cifar_archive(images_per_file=1)
    _point_cifar10_at(monkeypatch, url, body)
    transfers = []
    monkeypatch.setattr(downloader._Downloader, "_sync_download",
                        lambda self, url, *args, **kwargs: transfers.append(url))
    start = time.monotonic()
    with pytest.raises(cifar.DataMissingError) as info:
        cifar.load_split("cifar10", "train", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    cause = {"closed port": "the download would fail: cannot reach 127.0.0.1:",
             "unknown host": "the download would fail: cannot reach www.cs.toronto.edu:443 "
                             "(gaierror",
             "proxy": "the download would fail through the proxy: cannot reach 127.0.0.1:"}
    fix = {"closed port": f"or rerun where {LOCAL} is reachable",
           "unknown host": "or rerun where www.cs.toronto.edu is reachable",
           "proxy": "or fix the proxy setting (HTTP_PROXY/HTTPS_PROXY) or rerun where "
                    "www.cs.toronto.edu is reachable"}
    _assert_one_line(info.value, cause[unreachable], fix[unreachable],
                     "point --data_dir (or TFDS_DATA_DIR, when that is empty) at a folder")
    assert transfers == []


def test_a_hanging_name_lookup_is_cut_off_by_the_preflight_deadline(monkeypatch):
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    start = time.monotonic()
    try:
        reason = tfds_download.unreachable_reason([("www.cs.toronto.edu", 443)], timeout_s=0.5)
    finally:
        release.set()
    assert time.monotonic() - start < 2
    assert reason == "cannot reach www.cs.toronto.edu:443 (no answer within 0.5 s)"
    assert tfds_download.PREFLIGHT_TIMEOUT_S < 10


def test_a_reachable_host_passes_the_preflight(serve):
    port = int(serve(b"").rsplit(":", 1)[1].split("/")[0])
    assert tfds_download.unreachable_reason([("www.cs.toronto.edu", 443), (LOCAL, port)]) is None


def test_a_module_missing_from_the_install_says_to_install_it(monkeypatch, tmp_path):
    def url_infos(cls):
        raise ModuleNotFoundError("No module named 'importlib_resources'")

    monkeypatch.setattr(tfds_cifar.Cifar10, "url_infos", property(url_infos))
    with pytest.raises(cifar.DataMissingError) as info:
        cifar.load_split("cifar10", "train", data_dir=str(tmp_path))
    _assert_one_line(info.value, "importlib_resources", "pip install -r requirements.txt")
    assert "reachable" not in str(info.value)  # the network is not the problem


def _read_lm(data_dir: str, download: bool):
    return char_lm.read_tfds_text("tiny_shakespeare", "train", data_dir=data_dir,
                                  download=download)


def _read_translation(data_dir: str, download: bool):
    return parallel.read_tfds_parallel("wmt14_translate/fr-en", "train", "fr", "en",
                                       data_dir=data_dir, download=download)


TEXT_READERS = [
    pytest.param(_read_lm, "tiny_shakespeare", "raw.githubusercontent.com", "--data_dir",
                 "--config.data.text_file", id="lm"),
    pytest.param(_read_translation, "wmt14_translate/fr-en", "data.statmt.org",
                 "--config.data.tfds_data_dir", "--config.data.dir", id="translation"),
]


@pytest.mark.parametrize("read, name, host, dir_setting, alternative", TEXT_READERS)
def test_text_readers_reach_the_transfer_and_fail_in_one_line(monkeypatch, tmp_path, read, name,
                                                               host, dir_setting, alternative):
    # The hosts "answer", the transfer itself fails: everything before it imports and runs.
    monkeypatch.setattr(tfds_download, "unreachable_reason", lambda hosts: None)
    transfers = []

    def failing_transfer(self, url, *args, **kwargs):
        transfers.append(url)
        raise download_util.DownloadError(f"stub transfer of {url} failed")

    monkeypatch.setattr(downloader._Downloader, "_sync_download", failing_transfer)
    start = time.monotonic()
    with pytest.raises(tfds_download.DataMissingError) as info:
        read(str(tmp_path), True)
    assert time.monotonic() - start < 10
    url_infos = tfds.builder(name, data_dir=str(tmp_path)).url_infos
    assert transfers and set(transfers) <= set(url_infos)  # the dataset's real sources
    _assert_one_line(info.value, "stub transfer of", f"point {dir_setting} (or TFDS_DATA_DIR",
                     alternative)
    assert isinstance(info.value, FileNotFoundError)  # what lm.py / translation.py catch


@pytest.mark.parametrize("read, name, host, dir_setting, alternative", TEXT_READERS)
def test_text_readers_fail_fast_offline_and_when_downloading_is_off(tmp_path, read, name, host,
                                                                    dir_setting, alternative):
    start = time.monotonic()
    with pytest.raises(tfds_download.DataMissingError) as info:
        read(str(tmp_path), True)
    assert time.monotonic() - start < 10
    _assert_one_line(info.value, "the download would fail: cannot reach", "gaierror",
                     f"point {dir_setting}", "is reachable", alternative)
    with pytest.raises(tfds_download.DataMissingError) as info:
        read(str(tmp_path), False)
    _assert_one_line(info.value, "downloading is off",
                     f"set --config.data.tfds_download=true where {host}")
