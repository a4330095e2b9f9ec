"""``cxr-ray listen``: a real C-STORE SCP on 127.0.0.1 with a real (random-init) model, fed by dcmtk's
echoscu / storescu and by pynetdicom, forwarding its SRs to a real receiving SCP in the test.

Checked: C-ECHO; an X-ray gets its SR at the receiver with the same class and score as screening the same
bytes directly, the source's references and its patient identifiers (which the logs never show); other SOP
classes are refused at negotiation (and 0x0122 if one still arrives); a corrupt instance is answered 0xC000
with its error code and the SCP serves the next one; without --forward-to the SR goes back to the caller; with heatmaps on, a flagged instance's SC follows its SR;
instances sent on concurrent associations share backend calls (serve's batcher), a bad one among them failing alone."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _screen_testing import PYTHON, make_artifact, subprocess_env
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from cxr_ray.cli import build_parser
from cxr_ray.dicomnet.listen import (
    CANNOT_UNDERSTAND,
    COMPREHENSIVE_SR,
    DX_PRESENTATION_STORAGE,
    MAX_BATCH_SIZE,
    SOP_CLASS_NOT_SUPPORTED,
    Destination,
    Listener,
    Screener,
)
from cxr_ray.dicomnet.sr import read_result
from cxr_ray.errors import UsageError
from cxr_ray.serve.config import ServeArgs

ECHOSCU, STORESCU, DCIODVFY = shutil.which("echoscu"), shutil.which("storescu"), shutil.which("dciodvfy")
needs_dcmtk = pytest.mark.skipif(not (ECHOSCU and STORESCU), reason="dcmtk (echoscu, storescu) not installed")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PATIENT_ID, PATIENT_NAME = "PID-LISTEN-4711", "Doe^Jane"

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_xray(path: Path, *, sop_class: str = DX_PRESENTATION_STORAGE, modality: str = "DX", seed: int = 0,
              corrupt: bool = False) -> Path:
    """A small MONOCHROME2 radiograph as DICOM Part 10 (``corrupt``: its pixel data cut short)."""
    pixels = np.random.default_rng(seed).integers(0, 4096, (96, 80), dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = modality, PATIENT_ID, PATIENT_NAME
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19600101", "F", "20260105", "101500"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "1", "A1", "", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    data = pixels.tobytes()
    ds.PixelData = data[: len(data) // 3] if corrupt else data
    ds.save_as(path, enforce_file_format=True)
    return path


class Receiver:
    """A storage SCP for SRs (what a PACS would be): keeps what it receives."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.received: list[pydicom.Dataset] = []
        self.callers: list[str] = []
        self._arrived = threading.Condition()
        ae = AE(ae_title="RECEIVER")
        ae.add_supported_context(COMPREHENSIVE_SR)
        ae.add_supported_context(SECONDARY_CAPTURE)  # the heatmap SCs of --heatmaps flagged
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        with self._arrived:
            self.received.append(dataset)
            self.callers.append(str(event.assoc.requestor.ae_title).strip())
            self._arrived.notify_all()
        return 0x0000

    def wait_for(self, n: int, timeout: float = 60.0) -> list[pydicom.Dataset]:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.received) < n and time.monotonic() < deadline:
                self._arrived.wait(deadline - time.monotonic())
        assert len(self.received) >= n, f"{len(self.received)} SR(s) arrived, expected {n}"
        return self.received[:n]


@pytest.fixture(scope="module")
def screener(tmp_path_factory):
    screener = Screener(make_artifact(tmp_path_factory.mktemp("listen-model") / "model"), backend="onnxruntime")
    yield screener
    screener.close()


@pytest.fixture()
def node(screener):
    """(listener port, listener, receiver): an SCP that forwards its SRs to the receiver."""
    receiver = Receiver()
    listener = Listener(screener, forward_to=Destination("127.0.0.1", receiver.port, "RECEIVER"))
    port = _free_port()
    listener.start("127.0.0.1", port)
    yield port, listener, receiver
    listener.stop()
    receiver.server.shutdown()


def _storescu(port: int, path: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([STORESCU, *options, "-aet", "MODALITY", "-aec", "CXRRAY", "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=120)


def _scu_store(port: int, path: Path, sop_class: str = DX_PRESENTATION_STORAGE, ae_title: str = "MODALITY"):
    """(rejected presentation contexts, status of the C-STORE or None where ``sop_class`` was refused)."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)  # so the association stands when ``sop_class`` is refused
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRRAY")
    assert assoc.is_established
    try:
        if sop_class not in [c.abstract_syntax for c in assoc.accepted_contexts]:
            return assoc.rejected_contexts, None
        return assoc.rejected_contexts, assoc.send_c_store(pydicom.dcmread(path))
    finally:
        assoc.release()


def _direct(screener: Screener, path: Path) -> dict:
    return screener.screen(path.read_bytes(), "direct")


def _same_result(sr: pydicom.Dataset, source: Path, screener: Screener) -> None:
    said, row = read_result(sr), _direct(screener, source)
    header = pydicom.dcmread(source, stop_before_pixels=True)
    assert said["predicted_label"] == row["predicted_label"]
    assert said["score"] == pytest.approx(row["score"], abs=1e-6)
    assert said["flagged"] == row["flagged"] and said["threshold"] == pytest.approx(row["threshold"])
    assert said["model_version"] == screener.card.version
    assert said["source_sop_instance_uid"] == header.SOPInstanceUID
    assert sr.StudyInstanceUID == header.StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == header.SeriesInstanceUID
    assert sr.PatientID == header.PatientID and str(sr.PatientName) == str(header.PatientName)


@needs_dcmtk
def test_echoscu_is_answered(node):
    port, _, _ = node
    done = subprocess.run([ECHOSCU, "-aet", "MODALITY", "-aec", "CXRRAY", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_dcmtk
def test_storescu_dx_gets_its_sr_at_the_forward_node(node, screener, tmp_path, caplog):
    port, listener, receiver = node
    source = make_xray(tmp_path / "dx.dcm")
    with caplog.at_level(logging.INFO):
        done = _storescu(port, source)
        assert done.returncode == 0, done.stdout + done.stderr
        (sr,) = receiver.wait_for(1)
    assert sr.SOPClassUID == COMPREHENSIVE_SR and receiver.callers == ["CXRRAY"]
    _same_result(sr, source, screener)
    assert listener.counts["screened"] == 1 and listener.counts["sr_sent"] == 1
    logs = caplog.text
    assert "screened" in logs
    assert PATIENT_ID not in logs and "Doe" not in logs  # identifiers: in the SR only
    if DCIODVFY:
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        checked = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


@needs_dcmtk
def test_real_sample_as_dx_and_as_secondary_capture(node, screener, real_data_dir, tmp_path):
    """The RSNA samples are Secondary Capture (refused: not what the model screens); the same pixels
    as a DX instance (JPEG baseline, a real X-ray) are screened."""
    port, listener, receiver = node
    original = real_data_dir / "rsna-pneumonia-sample.dcm"
    assert pydicom.dcmread(original, stop_before_pixels=True).SOPClassUID == SECONDARY_CAPTURE
    rejected, status = _scu_store(port, original, SECONDARY_CAPTURE)
    assert status is None and rejected and rejected[0].abstract_syntax == SECONDARY_CAPTURE
    ds = pydicom.dcmread(original)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_PRESENTATION_STORAGE
    ds.Modality = "DX"
    source = tmp_path / "rsna-as-dx.dcm"  # a temporary relabelled copy, never inside the project
    ds.save_as(source, enforce_file_format=True)
    done = _storescu(port, source, "--propose-jpeg8")  # sent as stored, JPEG baseline
    assert done.returncode == 0, done.stdout + done.stderr
    (sr,) = receiver.wait_for(1)
    _same_result(sr, source, screener)


def test_other_sop_classes_are_refused(node, tmp_path):
    port, listener, _ = node
    ct = make_xray(tmp_path / "ct.dcm", sop_class=CT_IMAGE_STORAGE, modality="CT")
    rejected, status = _scu_store(port, ct, CT_IMAGE_STORAGE)
    assert status is None
    assert [c.abstract_syntax for c in rejected] == [CT_IMAGE_STORAGE]
    assert rejected[0].result == 0x03  # rejected: abstract syntax not supported (PS3.8 9.3.3.2)
    # one that still arrives (another AE's negotiation rules): 0x0122, nothing screened
    answer = listener.receive(CT_IMAGE_STORAGE, ct.read_bytes(), "127.0.0.1", "MODALITY")
    assert answer.Status == SOP_CLASS_NOT_SUPPORTED and listener.counts["screened"] == 0


def test_corrupt_instance_fails_and_the_next_is_screened(node, screener, tmp_path, caplog):
    port, listener, receiver = node
    bad = make_xray(tmp_path / "bad.dcm", corrupt=True)
    with caplog.at_level(logging.WARNING):
        _, status = _scu_store(port, bad)
    assert status is not None and 0xC000 <= status.Status <= 0xCFFF and status.Status == CANNOT_UNDERSTAND
    code = str(status.ErrorComment).rsplit(": ", 1)[-1]
    assert code in caplog.text and PATIENT_ID not in caplog.text
    good = make_xray(tmp_path / "good.dcm", seed=5)
    _, status = _scu_store(port, good)
    assert status is not None and status.Status == 0x0000
    (sr,) = receiver.wait_for(1)
    _same_result(sr, good, screener)
    assert listener.counts == {"screened": 1, "refused": 0, "failed": 1, "sr_sent": 1, "sr_failed": 0}


def test_without_forward_to_the_sr_goes_back_to_the_caller(screener, tmp_path):
    receiver = Receiver()
    listener = Listener(screener, reply_port=receiver.port)
    port = _free_port()
    listener.start("127.0.0.1", port)
    try:
        source = make_xray(tmp_path / "cr.dcm", sop_class="1.2.840.10008.5.1.4.1.1.1", modality="CR", seed=2)
        _, status = _scu_store(port, source, "1.2.840.10008.5.1.4.1.1.1", ae_title="RECEIVER")
        assert status is not None and status.Status == 0x0000
        (sr,) = receiver.wait_for(1)
        _same_result(sr, source, screener)
    finally:
        listener.stop()
        receiver.server.shutdown()


def test_destination_rules(screener):
    assert Destination.parse("pacs.local:104:ORTHANC") == Destination("pacs.local", 104, "ORTHANC")
    for bad in ("pacs.local:104", "pacs:x:AET", ":104:AET"):
        with pytest.raises(UsageError, match="HOST:PORT:AET"):
            Destination.parse(bad)
    with pytest.raises(UsageError, match="--forward-to"):
        Listener(screener)


@needs_dcmtk
def test_cli_listens_screens_and_stops_on_sigterm(screener, tmp_path):
    """`cxr-ray listen` as a user runs it: one JSON line when listening, SR forwarded, counts on SIGTERM."""
    receiver = Receiver()
    port = _free_port()
    artifact = screener.artifact
    cmd = [PYTHON, "-m", "cxr_ray", "listen", "--model", artifact, "--port", str(port), "--backend", "onnxruntime",
           "--forward-to", f"127.0.0.1:{receiver.port}:RECEIVER", "--max-batch-size", "4"]
    proc = subprocess.Popen(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        started = json.loads(proc.stdout.readline())
        assert started == {"listening": f"127.0.0.1:{port}", "ae_title": "CXRRAY",
                           "sr_to": f"127.0.0.1:{receiver.port}:RECEIVER"}
        done = _storescu(port, make_xray(tmp_path / "dx.dcm", seed=9))
        assert done.returncode == 0, done.stdout + done.stderr
        receiver.wait_for(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        receiver.server.shutdown()
    assert proc.returncode == 0, stderr[-3000:]
    stopped = json.loads(stdout.strip().splitlines()[-1])
    assert stopped["sr_sent"] == 1 and stopped["batches"] == 1 and stopped["max_batch"] == 1
    assert PATIENT_ID not in stderr and "Doe" not in stderr


def test_cli_needs_a_destination(tmp_path):
    done = subprocess.run([PYTHON, "-m", "cxr_ray", "listen", "--model", str(tmp_path)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--forward-to" in done.stderr


@needs_dcmtk
def test_heatmaps_flagged_sends_the_sc_after_the_sr(tmp_path_factory, tmp_path):
    artifact = make_artifact(tmp_path_factory.mktemp("listen-sc-model") / "model")
    screener = Screener(artifact, backend="onnxruntime", heatmap_method="gradcam")
    receiver = Receiver()
    listener = Listener(screener, forward_to=Destination("127.0.0.1", receiver.port, "RECEIVER"))
    port = _free_port()
    listener.start("127.0.0.1", port)
    try:
        source = make_xray(tmp_path / "dx.dcm", seed=3)
        assert _direct(screener, source)["flagged"] is True  # this model flags it: an SC is due
        done = _storescu(port, source)
        assert done.returncode == 0, done.stdout + done.stderr
        sr, sc = receiver.wait_for(2)
        _same_result(sr, source, screener)
    finally:
        listener.stop()
        receiver.server.shutdown()
        screener.close()
    header = pydicom.dcmread(source, stop_before_pixels=True)
    assert sc.SOPClassUID == SECONDARY_CAPTURE and sc.StudyInstanceUID == header.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (header.SeriesInstanceUID, sr.SeriesInstanceUID)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert (sc.Rows, sc.Columns, sc.PhotometricInterpretation) == (header.Rows, header.Columns, "RGB")
    assert sc.PatientID == PATIENT_ID and str(sc.PatientName) == PATIENT_NAME  # the source's, for the PACS
    assert screener.card.version in sc.SeriesDescription
    assert listener.counts["sc_sent"] == 1 and listener.counts["sc_failed"] == 0 and listener.counts["sr_sent"] == 1


def test_max_batch_size_defaults_like_serve():
    parser, _ = build_parser()
    args = parser.parse_args(["listen", "--model", "m", "--forward-to", "127.0.0.1:104:PACS"])
    assert args.max_batch_size == MAX_BATCH_SIZE == ServeArgs.model_fields["max_batch_size"].default
    with pytest.raises(SystemExit):
        parser.parse_args(["listen", "--model", "m", "--max-batch-size", "0"])


class HeldBackend:
    """The real backend, its first call held until the other instances of the test are queued behind it:
    the model is busy while they arrive, whatever the machine's speed (nothing waits on a clock)."""

    def __init__(self, screener: Screener, instances: int) -> None:
        self.backend, self.screener, self.instances = screener.backend, screener, instances
        self.first = True

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if self.first:  # on the model thread; the handler threads queue in the batcher meanwhile
            self.first = False
            deadline = time.monotonic() + 120  # a bound only, so a broken batcher fails the test, not hangs it
            while self.screener.queued < self.instances - len(batch) and time.monotonic() < deadline:
                time.sleep(0.01)
        return self.backend.predict(batch)


@pytest.fixture()
def batching_node(screener):
    """(listener port, listener, receiver, its screener): a fresh screener of the module's model, 8 per batch."""
    batched = Screener(screener.artifact, backend="onnxruntime", max_batch_size=8)
    receiver = Receiver()
    listener = Listener(batched, forward_to=Destination("127.0.0.1", receiver.port, "RECEIVER"))
    port = _free_port()
    listener.start("127.0.0.1", port)
    yield port, listener, receiver, batched
    listener.stop()
    receiver.server.shutdown()
    batched.close()


def _send_concurrently(port: int, paths: list[Path]) -> list:
    """One association per instance, all at once: the statuses, in ``paths`` order."""
    with ThreadPoolExecutor(len(paths)) as pool:
        return [status for _, status in pool.map(lambda path: _scu_store(port, path), paths)]


def _check_srs(receiver: Receiver, sources: list[Path], screener: Screener) -> None:
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in sources}
    srs = receiver.wait_for(len(sources))
    assert sorted(read_result(sr)["source_sop_instance_uid"] for sr in srs) == sorted(by_uid)
    for sr in srs:  # each SR says what screening its own instance alone says
        _same_result(sr, by_uid[read_result(sr)["source_sop_instance_uid"]], screener)


def test_concurrent_associations_share_backend_calls(batching_node, tmp_path):
    port, listener, receiver, batched = batching_node
    sources = [make_xray(tmp_path / f"dx{i}.dcm", seed=10 + i) for i in range(4)]
    batched.backend = HeldBackend(batched, len(sources))
    statuses = _send_concurrently(port, sources)
    assert [s.Status for s in statuses] == [0x0000] * 4
    stats = batched.stats  # before the direct screenings below add their own calls
    assert stats["batches"] == 2 and stats["max_batch"] > 1, stats  # 4 instances, 2 backend calls
    _check_srs(receiver, sources, batched)
    assert listener.counts["screened"] == 4 and listener.counts["sr_sent"] == 4


def test_a_bad_instance_among_concurrent_ones_fails_alone(batching_node, tmp_path, caplog):
    port, listener, receiver, batched = batching_node
    good = [make_xray(tmp_path / f"dx{i}.dcm", seed=20 + i) for i in range(3)]
    bad = make_xray(tmp_path / "bad.dcm", corrupt=True)
    batched.backend = HeldBackend(batched, len(good))  # the bad one fails in its decode, never queues
    with caplog.at_level(logging.WARNING):
        statuses = _send_concurrently(port, [good[0], bad, good[1], good[2]])
    assert [s.Status for s in statuses] == [0x0000, CANNOT_UNDERSTAND, 0x0000, 0x0000]
    code = str(statuses[1].ErrorComment).rsplit(": ", 1)[-1]
    assert code in caplog.text and PATIENT_ID not in caplog.text
    stats = batched.stats
    assert stats["batches"] == 2 and stats["max_batch"] > 1, stats
    _check_srs(receiver, good, batched)
    assert listener.counts == {"screened": 3, "refused": 0, "failed": 1, "sr_sent": 3, "sr_failed": 0}
