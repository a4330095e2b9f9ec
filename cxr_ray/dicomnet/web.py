"""DICOMweb inputs and outputs through ``dicomweb-client``: QIDO-RS listing, WADO-RS retrieval, STOW-RS.

Addressing
    ``dicomweb://HOST[:PORT]/PATH?QUERY`` is the DICOMweb service at
    ``http://HOST:PORT/PATH`` (``dicomweb+https://`` for HTTPS). The query is
    a QIDO-RS study search (``ModalitiesInStudy=CR,DX&StudyDate=20260101-20261231``).
    Each listed instance is named ``dicomweb://HOST:PORT/PATH/studies/S/series/R/instances/I``
    (no query): the screening row's ``path``, what the read stage retrieves,
    and what resume digests (so resume skips instances by their SOP Instance UID).

Listing (:func:`list_instances`)
    Studies are searched page by page (``limit`` / ``offset``), and for each
    study its instances, page by page, so the listing holds one page at a
    time, like an S3 listing. ``ModalitiesInStudy`` is not sent with the
    study search but as the instance search's ``Modality`` (a list match):
    some archives (Orthanc 1.10 among them) apply ``limit`` / ``offset``
    before matching ``ModalitiesInStudy``, so its pages after the first came
    back empty and studies were silently lost. Matching it per instance is
    right on every archive, and it also keeps the study's other series (a
    report, an SR this tool wrote back) out of the listing. The cost: one
    instance search per study that other filters match.

Failures
    A QIDO page or a WADO retrieval that times out, cannot connect or gets
    429 / 5xx is tried again with exponential backoff (:data:`ATTEMPTS` tries
    in all), then raises :class:`DicomwebError` with a one-line message that
    names the request (the query, or the instance). Other HTTP errors (401,
    404) fail at once.

Auth
    :class:`DicomwebAuth` (HTTP basic or bearer) is read from environment
    variables the command line names (:func:`auth_from_env`), never from the
    command line; its ``repr`` hides the secret.
"""

from __future__ import annotations

import functools
import io
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session, create_session_from_user_pass

from cxr_ray.errors import CxrRayError, UsageError

SCHEMES = {"dicomweb": "http", "dicomweb+http": "http", "dicomweb+https": "https"}
PAGE_SIZE = 200  # QIDO-RS results per request (studies, then instances of a study)
ATTEMPTS = 4  # tries of one request before DicomwebError
BACKOFF_S = 0.5  # first wait; doubled after each failed try
TIMEOUT_S = 30.0  # per request (connect and read)
_PATH = re.compile(r"^(?P<root>.*?)/studies/(?P<study>[^/]+)(?:/series/(?P<series>[^/]+)(?:/instances/(?P<instance>[^/]+))?)?/?$")
T = TypeVar("T")


class DicomwebError(CxrRayError):
    """A DICOMweb request failed (after retries where retrying can help); the message names it."""


@dataclass(frozen=True)
class DicomwebAuth:
    """HTTP basic (``user`` + ``secret``) or bearer (``secret`` only) credentials."""

    kind: str  # "basic" | "bearer"
    secret: str = field(repr=False)
    user: str | None = None

    def __repr__(self) -> str:
        return f"DicomwebAuth(kind={self.kind!r}, user={'set' if self.user else None})"


def auth_from_env(user_env: str | None = None, password_env: str | None = None,
                  token_env: str | None = None) -> DicomwebAuth | None:
    """Credentials from the environment variables named by ``--dicomweb-*-env`` (None: no auth)."""

    def value(flag: str, name: str) -> str:
        found = os.environ.get(name)
        if not found:
            raise UsageError(f"{flag} {name}: that environment variable is unset or empty "
                             "(the secret itself is never passed on the command line)")
        return found

    if token_env and (user_env or password_env):
        raise UsageError("give either --dicomweb-token-env or --dicomweb-user-env/--dicomweb-password-env, not both")
    if token_env:
        return DicomwebAuth("bearer", value("--dicomweb-token-env", token_env))
    if bool(user_env) != bool(password_env):
        raise UsageError("HTTP basic auth needs both --dicomweb-user-env and --dicomweb-password-env")
    if user_env and password_env:
        return DicomwebAuth("basic", value("--dicomweb-password-env", password_env),
                            value("--dicomweb-user-env", user_env))
    return None


def is_dicomweb(uri: str) -> bool:
    return str(uri).split("://", 1)[0].lower() in SCHEMES and "://" in str(uri)


@dataclass(frozen=True)
class Location:
    """A parsed ``dicomweb://`` URI: the service, an optional study/series/instance, the query."""

    scheme: str  # the URI scheme as given (kept in the instance names)
    netloc: str
    root: str  # the service path, e.g. "/dicom-web"
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    query: tuple[tuple[str, str], ...] = ()

    @property
    def base_url(self) -> str:
        return f"{SCHEMES[self.scheme]}://{self.netloc}{self.root}"

    @property
    def service(self) -> str:
        """The service as a ``dicomweb://`` URI (no query), e.g. for messages."""
        return f"{self.scheme}://{self.netloc}{self.root}"

    def instance_uri(self, study: str, series: str, instance: str) -> str:
        return f"{self.service}/studies/{study}/series/{series}/instances/{instance}"


def parse(uri: str) -> Location:
    """Split a ``dicomweb://`` URI; a :class:`UsageError` naming what is wrong otherwise."""
    parts = urlsplit(str(uri))
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or not parts.netloc:
        raise UsageError(f"{uri}: not a DICOMweb URI (valid: dicomweb://HOST[:PORT]/PATH?QUERY, dicomweb+https://...)")
    path = parts.path.rstrip("/")
    match = _PATH.match(path)
    root = match.group("root") if match else path
    group = match.group if match else (lambda _name: None)
    return Location(scheme, parts.netloc, root, study=group("study"), series=group("series"),
                    instance=group("instance"), query=tuple(parse_qsl(parts.query, keep_blank_values=False)))


@functools.lru_cache(maxsize=16)
def client(base_url: str, auth: DicomwebAuth | None = None) -> DICOMwebClient:
    """One ``DICOMwebClient`` (one HTTP session, kept alive) per service and credentials, per process."""
    if auth is not None and auth.kind == "basic":
        session = create_session_from_user_pass(auth.user or "", auth.secret)
    else:
        session = create_session()
    headers = {"Authorization": f"Bearer {auth.secret}"} if auth is not None and auth.kind == "bearer" else None
    web = DICOMwebClient(base_url, session=session, headers=headers, timeout=TIMEOUT_S)
    web.set_http_retry_params(retry=False)  # one retry policy, ours (it also covers timeouts and 5xx)
    return web


def _retriable(exc: BaseException) -> bool:
    if isinstance(exc, (requests.Timeout, requests.ConnectionError)):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(exc, requests.HTTPError) and status is not None and (status >= 500 or status == 429)


def _reason(exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if status is not None else type(exc).__name__


def with_retries(call: Callable[[], T], what: str, *, attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S) -> T:
    """``call()``, tried again after timeouts, connection errors, 429 and 5xx; then :class:`DicomwebError`."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - sorted into retriable or not just below
            if not _retriable(exc):
                raise DicomwebError(f"{what}: failed ({_reason(exc)})") from None
            if attempt == attempts:
                raise DicomwebError(f"{what}: failed after {attempts} attempts ({_reason(exc)})") from None
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _value(record: dict[str, Any], tag: str) -> str | None:
    values = record.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


def _pages(search: Callable[[int, int], list[dict]], what: str, page_size: int) -> Iterator[dict]:
    offset = 0
    while True:
        page = with_retries(functools.partial(search, page_size, offset), f"{what} (offset {offset})")
        yield from page
        if len(page) < page_size:
            return
        offset += len(page)


def _search_instances(web: DICOMwebClient, study: str, series: str | None, filters: dict, limit: int,
                      offset: int) -> list[dict]:
    return web.search_for_instances(study_instance_uid=study, series_instance_uid=series, search_filters=filters,
                                    limit=limit, offset=offset, fields=["SeriesInstanceUID", "SOPInstanceUID"])


def list_instances(uri: str, auth: DicomwebAuth | None = None, *, page_size: int = PAGE_SIZE) -> Iterator[str]:
    """Instance URIs matched by ``uri`` (a study search, or one study / series / instance), streamed."""
    where = parse(uri)
    if where.instance:
        yield uri
        return
    web = client(where.base_url, auth)
    filters = dict(where.query)
    what = f"QIDO-RS {where.service}?{'&'.join(f'{k}={v}' for k, v in where.query)}"
    modalities = filters.pop("ModalitiesInStudy", None)  # matched per instance: see the module docstring
    wanted = {"Modality": modalities} if modalities else {}
    if where.study:
        studies: Iterator[str | None] = iter([where.study])
    else:
        studies = (_value(s, "0020000D") for s in _pages(
            lambda limit, offset: web.search_for_studies(search_filters=filters, limit=limit, offset=offset,
                                                         fields=["StudyInstanceUID"]), what, page_size))
    for study in studies:
        if not study:
            continue
        search = functools.partial(_search_instances, web, study, where.series, wanted)
        instances = _pages(search, f"{what} (instances of a study)", page_size)
        for record in instances:
            series, instance = _value(record, "0020000E"), _value(record, "00080018")
            if series and instance:
                yield where.instance_uri(study, series, instance)


def retrieve_instance(uri: str, auth: DicomwebAuth | None = None) -> bytes:
    """WADO-RS: one instance as Part-10 bytes, in the transfer syntax the archive stored.

    ``dicomweb-client`` parses what it receives; the dataset is written back
    to Part-10 bytes so that the one decode (and its guards) sees the same
    kind of input as for files (the size limit is the caller's, on these bytes).
    """
    where = parse(uri)
    if not (where.study and where.series and where.instance):
        raise UsageError(f"{uri}: not one DICOMweb instance (.../studies/S/series/R/instances/I)")
    web = client(where.base_url, auth)
    study, series, instance = where.study, where.series, where.instance
    dataset = with_retries(lambda: web.retrieve_instance(
        study, series, instance, media_types=(("application/dicom", "*"),)),
        f"WADO-RS {where.service} instance {posix_tail(uri)}")
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def store_instances(uri: str, datasets: Sequence[pydicom.Dataset], auth: DicomwebAuth | None = None) -> None:
    """STOW-RS ``datasets`` to the service of ``uri``; :class:`DicomwebError` when the archive refuses any."""
    where = parse(uri)
    web = client(where.base_url, auth)
    response = with_retries(lambda: web.store_instances(list(datasets)), f"STOW-RS {where.service}")
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        raise DicomwebError(f"STOW-RS {where.service}: {len(failed)} of {len(datasets)} instances refused")


def posix_tail(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]
