"""A real Orthanc PACS for the tests: Debian's ``orthanc`` + ``orthanc-dicomweb``, on loopback.

:func:`start_orthanc` writes a JSON config into a temporary directory (storage
there too, HTTP and DICOM on free ports, the DICOMweb plugin enabled, remote
HTTP access off, no authentication: only this machine's tests talk to it),
starts ``Orthanc`` and waits until ``/system`` answers. Orthanc 1.10 has no
bind-address option: its HTTP server refuses clients other than localhost
(``RemoteAccessAllowed: false``), its DICOM port listens on all interfaces
for the few seconds of a test session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ORTHANC_BIN = os.environ.get("CXR_RAY_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = os.environ.get("CXR_RAY_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"


def missing_reason() -> str | None:
    """Why Orthanc cannot run here (None: it can)."""
    if not (shutil.which(ORTHANC_BIN) or os.access(ORTHANC_BIN, os.X_OK)):
        return f"Orthanc not installed ({ORTHANC_BIN}; Debian: apt-get install orthanc orthanc-dicomweb)"
    if not os.path.isfile(DICOMWEB_PLUGIN):
        return f"Orthanc DICOMweb plugin not installed ({DICOMWEB_PLUGIN}; Debian: apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    process: subprocess.Popen
    log_path: Path
    modalities: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The ``dicomweb://`` URI of this server's DICOMweb root (no query)."""
        return f"dicomweb://127.0.0.1:{self.http_port}/dicom-web"

    def upload(self, path: str | Path, *, refused_ok: bool = False) -> dict | None:
        """Store one Part-10 file through Orthanc's REST API (not DICOMweb: the tests' setup).
        ``refused_ok``: a file Orthanc refuses (400: it cannot parse it) gives None instead of raising."""
        response = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=30)
        if refused_ok and response.status_code == 400:
            return None
        response.raise_for_status()
        return response.json()

    def clear(self) -> None:
        """Delete every patient, so each test starts from an empty archive."""
        for patient in requests.get(f"{self.url}/patients", timeout=30).json():
            requests.delete(f"{self.url}/patients/{patient}", timeout=30).raise_for_status()

    def instances(self) -> list[str]:
        return requests.get(f"{self.url}/instances", timeout=30).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def orthanc_config(directory: Path, http_port: int, dicom_port: int, modalities: dict | None = None) -> dict:
    storage = directory / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    return {
        "Name": "cxr-ray-tests",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": False,
        "StableAge": 1,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 8,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                     "StudiesMetadata": "MainDicomTags", "SeriesMetadata": "MainDicomTags"},
        "DicomModalities": modalities or {},
    }


def start_orthanc(directory: Path, *, timeout_s: float = 60.0, modalities: dict | None = None) -> Orthanc:
    """Start Orthanc with a generated config under ``directory`` and wait until it answers."""
    http_port, dicom_port = free_port(), free_port()
    config = directory / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(directory, http_port, dicom_port, modalities), indent=2))
    log_path = directory / "orthanc.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([ORTHANC_BIN, str(config)], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(http_port, dicom_port, process, log_path, modalities or {})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"{server.url}/dicom-web/studies", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s: {log_path.read_text()[-2000:]}")
