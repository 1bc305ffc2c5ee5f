"""Open a TFDS dataset as a random-access source, downloading and preparing it when allowed.

Shared by the image (``experiments/data/cifar.py``), language-model (``text/char_lm.py``) and
translation (``text/parallel.py``) data paths. Every failure is one ``DataMissingError`` line
that says how to provide the data.

Before TFDS's download-and-prepare, a pre-flight opens a TCP connection (short timeout, DNS
included) to the hosts of the dataset's download URLs, read from the builder's TFDS checksums
file: offline, TFDS itself retries every URL with back-off for minutes before it gives up.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request

# Seconds the pre-flight waits for the download hosts, all hosts in parallel, DNS included.
PREFLIGHT_TIMEOUT_S = 3.0

_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}


class DataMissingError(FileNotFoundError):
    """The dataset is not prepared under the data dir and could not be downloaded."""


def resolve_data_dir(data_dir: str | None) -> str | None:
    """``data_dir`` if given, else ``$TFDS_DATA_DIR``, else None (TFDS's default,
    ~/tensorflow_datasets)."""
    return data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (TFDS messages run over many lines)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0].strip()}" if text else type(error).__name__


def download_hosts(url_infos, *, through_proxy: bool = True) -> list[tuple[str, int]]:
    """The (host, port) pairs a download of these URLs connects to, sorted.

    url_infos: the builder's ``url_infos`` ({url: UrlInfo}) or None. Non-network URLs
    (gs://, local paths) are skipped. With ``through_proxy``, a URL that goes through a
    proxy (``HTTP(S)_PROXY``, ``NO_PROXY``) counts as its proxy's host.
    """
    proxies = urllib.request.getproxies() if through_proxy else {}
    hosts = set()
    for url in url_infos or ():
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            continue
        proxy = proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname):
            parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        hosts.add((parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme, 80)))
    return sorted(hosts)


def unreachable_reason(hosts: list[tuple[str, int]],
                       timeout_s: float = PREFLIGHT_TIMEOUT_S) -> str | None:
    """None if at least one of ``hosts`` accepts a TCP connection within ``timeout_s``,
    else one line naming the hosts and the first failure.

    Each host is tried in a daemon thread, so a DNS lookup that hangs past the deadline
    neither delays the answer nor the exit of the process.
    """
    if not hosts:
        return None
    failures: dict[tuple[str, int], str] = {}
    reached, settled = threading.Event(), threading.Event()
    lock = threading.Lock()

    def connect(host: str, port: int) -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                reached.set()
        except OSError as error:
            with lock:
                failures[(host, port)] = _one_line(error)
        finally:
            with lock:
                if reached.is_set() or len(failures) == len(hosts):
                    settled.set()

    for host in hosts:
        threading.Thread(target=connect, args=host, daemon=True).start()
    settled.wait(timeout_s)
    if reached.is_set():
        return None
    names = ", ".join(f"{h}:{p}" for h, p in hosts[:3]) + (" ..." if len(hosts) > 3 else "")
    with lock:
        first = next(iter(failures.values()), f"no answer within {timeout_s:g} s")
    return f"cannot reach {names} ({first})"


def _message(name: str, data_dir: str | None, cause: str, fix: str, data_dir_setting: str,
             alternative: str | None) -> str:
    where = data_dir or "~/tensorflow_datasets (the TFDS default)"
    other = f"; or {alternative}" if alternative else ""
    return (f"TFDS dataset {name!r} is not prepared in {where} and {cause}: point "
            f"{data_dir_setting} (or TFDS_DATA_DIR, when that is empty) at a folder that holds "
            f"a prepared {name}, or {fix}{other}. No fake data is used instead.")


def open_source(name: str, split: str, *, data_dir: str | None, download: bool,
                data_dir_setting: str, download_setting: str, alternative: str | None = None):
    """``tfds`` random-access data source of ``name``/``split`` (array_record), prepared on
    first use when ``download`` is true and the download hosts answer.

    data_dir: TFDS data dir (None or "": ``$TFDS_DATA_DIR``, then ~/tensorflow_datasets).
    data_dir_setting, download_setting: the user's names for these two settings (e.g.
      ``--data_dir``, ``--config.data.download``), for the error line.
    alternative: another way to give the experiment its data, added to the error line.
    Raises DataMissingError (one line) when the data is neither there nor obtainable.
    """
    data_dir = resolve_data_dir(data_dir)

    def missing(cause: str, fix: str) -> DataMissingError:
        return DataMissingError(
            _message(name, data_dir, cause, fix, data_dir_setting, alternative))

    try:
        return _open(name, split, data_dir, download, download_setting, missing)
    except ImportError as error:  # the install lacks what TFDS (or its download path) imports
        raise missing(f"preparing it needs a module that is not installed "
                      f"({_one_line(error)})",
                      "install it: pip install -r requirements.txt") from error


def _open(name, split, data_dir, download, download_setting, missing):
    """``open_source`` up to ImportError, which passes through."""
    import tensorflow_datasets as tfds  # local: text-file paths must not need TFDS

    where = data_dir or "~/tensorflow_datasets"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except ImportError:
        raise
    except Exception as error:  # unknown name, unreadable dir, ...: TFDS raises many types
        raise DataMissingError(
            f"cannot open TFDS dataset {name!r} in {where} ({_one_line(error)}); check the "
            f"dataset name and the data dir.") from error

    def read():
        try:
            return builder.as_data_source(split=split)
        except ImportError:
            raise
        except Exception as error:
            raise DataMissingError(
                f"cannot read split {split!r} of TFDS dataset {name!r} in {where} "
                f"({_one_line(error)}); check the split name, and that the prepared copy has "
                f"array_record files.") from error

    if _is_prepared(builder):
        return read()
    try:
        # Read first even when unprepared: a stand-in (tfds.testing.mock_data) serves
        # unprepared builders, and must not lead to a download.
        return builder.as_data_source(split=split)
    except Exception as error:
        not_there = error
    if not download:
        raise missing("downloading is off",
                      f"set {download_setting}=true where {_host_names(builder)} "
                      f"is reachable") from not_there
    _preflight_download_and_prepare(builder, missing)
    return read()


def _is_prepared(builder) -> bool:
    # TFDS's is_prepared() logs a warning for a version folder that does not exist.
    return builder.data_path.exists() and builder.is_prepared()


def _host_names(builder) -> str:
    hosts = download_hosts(builder.url_infos, through_proxy=False)
    return " or ".join(host for host, _ in hosts[:2]) or "the dataset's download hosts"


def _preflight_download_and_prepare(builder, missing) -> None:
    """Checks that a download host (or the proxy) answers, then runs TFDS's
    download-and-prepare; ``missing(cause, fix)`` builds the error. ImportError passes
    through."""
    targets = download_hosts(builder.url_infos)
    reason = unreachable_reason(targets)
    if reason:
        proxied = targets != download_hosts(builder.url_infos, through_proxy=False)
        raise missing(
            f"the download would fail{' through the proxy' if proxied else ''}: {reason}",
            f"{'fix the proxy setting (HTTP_PROXY/HTTPS_PROXY) or ' if proxied else ''}"
            f"rerun where {_host_names(builder)} is reachable")
    try:
        builder.download_and_prepare(file_format="array_record")
    except ImportError:  # reported by the caller, with the install fix
        raise
    except Exception as error:  # network, permissions, disk, checksum: all end here
        raise missing(f"downloading and preparing it failed ({_one_line(error)})",
                      "fix that cause and rerun") from error
