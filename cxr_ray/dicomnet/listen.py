"""``cxr-ray listen``: a DICOM C-STORE SCP that screens each pushed X-ray and stores its SR onward.

A plain process, no Ray: pynetdicom runs one handler thread per association,
and the model is loaded once per process and shared by them (one model thread
owns the backend, as in :class:`cxr_ray.serve.predictor.CxrPredictor`: torch ran
slower when called from several threads). Instances are batched as serve batches
requests (:class:`~cxr_ray.engines.batching.OpportunisticBatcher`): those that
arrive on concurrent associations while the model runs go into its next call. On a cluster, run it as a plain
process (a systemd unit or a container next to the Ray head); it is not a Ray
actor or Serve deployment, because a DICOM node needs a fixed host and port that
modalities and the PACS are configured with, which Serve's HTTP proxy does not
give a raw TCP protocol.

* Accepted: :data:`SCREENED_SOP_CLASSES` (CR, DX for presentation / for
  processing) and Verification (C-ECHO). Any other abstract syntax is rejected
  at association negotiation; a C-STORE of another class that still arrives
  is answered ``0x0122`` (SOP class not supported).
* Each instance goes through the project's own decode (same guards, same error
  codes), the same backend and decision as ``serve``, and
  :func:`cxr_ray.dicomnet.results.sr_for` for the Comprehensive SR.
* A bad instance is answered ``0xC000`` (cannot understand) with its error code
  in Error Comment and in the log; the SCP goes on with the next one.
* Destination of the SR (:class:`Destination`): ``--forward-to HOST:PORT:AET``
  when given (the configured node, as MONAI Deploy / Orthanc route results);
  else back to the calling AE, at its IP address, on ``--reply-port``, with
  its calling AE title.
* With a heatmap method (``--heatmaps flagged``), a flagged instance's overlay
  also goes to the same destination as a Secondary Capture
  (:func:`cxr_ray.dicomnet.results.sc_for`, as ``screen`` writes it), after its SR.
* Logs name an instance by a digest of its SOP Instance UID, never by patient
  identifiers: only the SR carries those (copied from the source).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.events import EventHandlerType

from cxr_ray.dicomnet.results import sc_for, sr_for
from cxr_ray.engines.batching import OpportunisticBatcher
from cxr_ray.engines.load import load_backend
from cxr_ray.errors import DecodeError, UsageError
from cxr_ray.explain.methods import Explainer, check_supported
from cxr_ray.explain.overlay import overlay_rgb
from cxr_ray.io.inputs import InputPolicy, load_input
from cxr_ray.models.artifact import load_card, load_model, localize
from cxr_ray.preprocess import preprocess

log = logging.getLogger(__name__)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1.1"
SCREENED_SOP_CLASSES = (CR_IMAGE_STORAGE, DX_PRESENTATION_STORAGE, DX_PROCESSING_STORAGE)
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000  # PS3.4 C-STORE "Error: cannot understand" (0xCxxx)
PROCESSING_FAILURE = 0x0110
MAX_BATCH_SIZE = 16  # serve's default (cxr_ray.serve.config.ServeArgs.max_batch_size; a test holds them equal)


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``HOST:PORT:AET`` (``--forward-to``)."""
        host, _, rest = text.rpartition(":")
        host, _, port = host.rpartition(":")
        if not host or not port.isdigit() or not rest:
            raise UsageError(f"--forward-to {text!r}: expected HOST:PORT:AET, e.g. pacs.local:104:ORTHANC")
        return cls(host, int(port), rest)


def instance_digest(sop_instance_uid: str) -> str:
    """What the logs call an instance: its UID's digest (UIDs can identify a patient's study)."""
    return hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:16]


class Screener:
    """One model, loaded once: Part-10 bytes -> the screening row ``sr_for`` wants.

    Each instance decodes in its association's handler thread (a bad one fails alone), then waits in one
    :class:`OpportunisticBatcher` with the instances of the other associations: whatever queued while the
    model ran goes into its next ``backend.predict`` call, as in serve. The batcher needs an event loop and
    pynetdicom's handlers are threads, so the loop runs in a daemon thread of its own; the backend still
    runs on the model thread, which keeps the loop free to queue the next batch meanwhile.
    """

    def __init__(self, model: str, *, backend: str = "auto", device: str | None = None,
                 s3_endpoint: str | None = None, heatmap_method: str | None = None,
                 max_batch_size: int = MAX_BATCH_SIZE, engine_options: dict[str, Any] | None = None) -> None:
        """``engine_options``: :data:`~cxr_ray.engines.request.ENGINE_OPTION_NAMES` for ``load_backend``
        (``--verify-labels``, ``--max-prob-diff``, ...)."""
        # Built first: a bad max_batch_size is refused before the model loads.
        self._batcher = OpportunisticBatcher(self._predict_batch, max_batch_size=max_batch_size)
        artifact = self.artifact = str(localize(model, s3_endpoint))
        self.card = load_card(artifact)
        self.heatmap_method = heatmap_method
        if heatmap_method is not None:  # refused before the model loads, like screen's --heatmaps
            check_supported(self.card.arch, heatmap_method)
            if self.card.positive_index is None:
                raise UsageError(f"--heatmaps flagged: model {self.card.name!r} has no positive class, "
                                 "so no instance is ever flagged")
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-listen-model")
        self.backend = self._model_thread.submit(load_backend, artifact, backend, device=device,
                                                 s3_endpoint=s3_endpoint, **(engine_options or {})).result()
        self.explainer = None if heatmap_method is None else self._model_thread.submit(
            lambda: Explainer(load_model(artifact)[0], self.card, heatmap_method)).result()
        self.config = self.card.preprocess_config
        self.reading = InputPolicy(target_size=self.config.image_size)
        self._stats = {"batches": 0, "max_batch": 0}  # backend calls, and the most instances one carried
        self._state = threading.Lock()  # guards _stats and _closed (the loop thread vs the handler threads)
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="cxr-listen-batcher", daemon=True)
        self._loop_thread.start()

    @property
    def stats(self) -> dict[str, int]:
        """``batches`` (backend calls) and ``max_batch`` (the most instances in one), for the stop line."""
        with self._state:
            return dict(self._stats)

    @property
    def queued(self) -> int:
        """Instances waiting for the model (decoded, not yet in a batch)."""
        return self._batcher.queued

    def screen(self, data: bytes, name: str) -> dict[str, Any]:
        """Raises :class:`DecodeError` for an input the decode refuses."""
        # serve's CPU decode path (and screening's): the same read, guards, error codes, preprocessing.
        image = load_input("request", self.reading, data=data, name=name).image
        pixels = preprocess(image.pixels, self.config).astype(np.float32, copy=False)
        with self._state:  # no submission once close() began: its future would never be answered
            if self._closed:
                raise RuntimeError("listen is stopping: instance not screened")
            pending = asyncio.run_coroutine_threadsafe(self._batcher.submit(pixels), self._loop)
        try:
            return pending.result()
        except concurrent.futures.CancelledError:  # close() cancelled it while queued
            raise RuntimeError("listen stopped before this instance was screened") from None

    async def _predict_batch(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """On the loop thread: the batch's one ``backend.predict``, on the model thread."""
        batch = np.stack(images)
        probs = await asyncio.get_running_loop().run_in_executor(self._model_thread, self.backend.predict, batch)
        with self._state:
            self._stats["batches"] += 1
            self._stats["max_batch"] = max(self._stats["max_batch"], len(images))
        decisions = self.card.decide(probs)
        return [{
            "predicted_label": decisions.labels[i],
            "score": None if decisions.scores is None else float(decisions.scores[i]),
            "flagged": None if decisions.flagged is None else bool(decisions.flagged[i]),
            "threshold": float(self.card.threshold),
            "model_name": self.card.name,
            "model_version": self.card.version,
        } for i in range(len(images))]

    def capture(self, data: bytes, row: dict[str, Any], name: str) -> pydicom.Dataset | None:
        """The heatmap SC of a flagged instance (None: heatmaps off, or not flagged); raises on failure."""
        if self.explainer is None or self.heatmap_method is None or row["flagged"] is not True:
            return None
        pixels = load_input("request", InputPolicy(), data=data, name=name).image.pixels  # the stored size
        heatmap = self._model_thread.submit(self.explainer.explain, pixels, self.card.positive_index).result().heatmap
        return sc_for(data, overlay_rgb(pixels, heatmap), row, self.heatmap_method)

    def close(self) -> None:
        """Stops the batch loop (instances still waiting fail: answered as processing failures), then the
        model thread."""
        with self._state:
            if self._closed:
                return
            self._closed = True
        asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()
        self._model_thread.shutdown(wait=False)


async def _cancel_other_tasks() -> None:
    """The batcher's consumer and queued submissions, so that the loop stops with no task pending."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def send_sr(sr: pydicom.Dataset, destination: Destination, calling_ae: str) -> int:
    """C-STORE ``sr`` (an SR or SC: its own SOP class is proposed) to ``destination`` on an association of
    its own; returns the status (-1: none)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(str(sr.SOPClassUID), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return -1
    try:
        status = assoc.send_c_store(sr)
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


class Listener:
    """The SCP: screens C-STOREd X-rays, sends their SRs to ``forward_to`` or back to the caller."""

    def __init__(self, screener: Screener, *, ae_title: str = "CXRRAY", forward_to: Destination | None = None,
                 reply_port: int | None = None) -> None:
        if forward_to is None and reply_port is None:
            raise UsageError("listen: give --forward-to HOST:PORT:AET, or --reply-port to send SRs back to the caller")
        self.screener, self.ae_title = screener, ae_title
        self.forward_to, self.reply_port = forward_to, reply_port
        self.counts = {"screened": 0, "refused": 0, "failed": 0, "sr_sent": 0, "sr_failed": 0}
        if screener.heatmap_method is not None:
            self.counts |= {"sc_sent": 0, "sc_failed": 0}
        self._lock = threading.Lock()
        self._server: Any = None

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def destination(self, caller_address: str, caller_ae: str) -> Destination:
        if self.forward_to is not None:
            return self.forward_to
        assert self.reply_port is not None
        return Destination(caller_address, self.reply_port, caller_ae)

    def receive(self, sop_class: str, data: bytes, caller_address: str, caller_ae: str) -> pydicom.Dataset:
        """One instance (Part-10 bytes) -> the C-STORE response status."""
        status = pydicom.Dataset()
        if sop_class not in SCREENED_SOP_CLASSES:
            self._count("refused")
            status.Status = SOP_CLASS_NOT_SUPPORTED
            return status
        try:
            header = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), stop_before_pixels=True)
            digest = instance_digest(str(header.SOPInstanceUID))
        except Exception:  # noqa: BLE001 - any unreadable header is this instance's failure, not the SCP's
            digest = "unreadable-header"
        try:
            row = self.screener.screen(data, f"instance {digest}")
        except DecodeError as exc:
            self._count("failed")
            log.warning("listen: instance %s not screened: %s", digest, exc.code)
            status.Status = CANNOT_UNDERSTAND
            status.ErrorComment = f"cxr-ray decode error: {exc.code}"[:64]
            return status
        except Exception as exc:  # noqa: BLE001 - a backend failure must not end the SCP
            self._count("failed")
            log.error("listen: instance %s failed in the model: %s", digest, type(exc).__name__)
            status.Status = PROCESSING_FAILURE
            return status
        self._count("screened")
        log.info("listen: instance %s screened: %s score=%s", digest, row["predicted_label"], row["score"])
        self._deliver(sr_for(data, row), digest, caller_address, caller_ae)
        try:
            capture = self.screener.capture(data, row, f"instance {digest}")
        except Exception as exc:  # noqa: BLE001 - the instance was screened; its SC is extra
            self._count("sc_failed")
            log.warning("listen: SC for instance %s not built: %s", digest, type(exc).__name__)
        else:
            if capture is not None:
                self._deliver(capture, digest, caller_address, caller_ae, kind="sc")
        status.Status = SUCCESS
        return status

    def _deliver(self, sr: pydicom.Dataset, digest: str, caller_address: str, caller_ae: str,
                 kind: str = "sr") -> None:
        """The instance was received and screened either way: a failed SR (SC) delivery is logged and counted."""
        target = self.destination(caller_address, caller_ae)
        try:
            code = send_sr(sr, target, self.ae_title)
        except Exception as exc:  # noqa: BLE001 - network errors of one delivery
            code, why = -1, type(exc).__name__
        else:
            why = f"status 0x{code:04X}" if code >= 0 else "association refused or no status"
        if code == SUCCESS:
            self._count(f"{kind}_sent")
            log.info("listen: %s for instance %s stored at %s:%d (%s)", kind.upper(), digest, target.host,
                     target.port, target.ae_title)
        else:
            self._count(f"{kind}_failed")
            log.warning("listen: %s for instance %s not stored at %s:%d: %s", kind.upper(), digest, target.host,
                        target.port, why)

    # ---- pynetdicom --------------------------------------------------------
    def _on_store(self, event: Any) -> pydicom.Dataset:
        requestor = event.assoc.requestor
        data = bytes(event.encoded_dataset(include_meta=True))
        return self.receive(str(event.request.AffectedSOPClassUID), data, requestor.address,
                            str(requestor.ae_title).strip())

    def application_entity(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        for sop_class in SCREENED_SOP_CLASSES:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        return ae

    def start(self, host: str, port: int, *, block: bool = False) -> Any:
        """Serve on ``host:port``; with ``block=False`` returns the server (``.shutdown()`` stops it)."""
        handlers: list[EventHandlerType] = [(evt.EVT_C_STORE, self._on_store)]
        self._server = self.application_entity().start_server((host, port), block=block, evt_handlers=handlers)
        return self._server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


__all__ = ["Destination", "Listener", "Screener", "SCREENED_SOP_CLASSES", "send_sr"]
